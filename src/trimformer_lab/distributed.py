"""Data-parallel evaluation: ``torchrun --nproc_per_node N -m trimformer eval ...`` (or ``accelerate
launch``) gives each process every N-th item; the records are gathered on rank 0, which writes the one
results file a single process would have written.

Each process holds the whole model (on its own GPU, or on the CPU) and runs every variant of its
items, so the full model's outputs an item's variants are compared with stay in that process. Only
the timings differ from a single-process run: the fields in `TIMING_FIELDS` (per record and in the
summary rows); `without_timings` drops them for a comparison. While running, rank r also writes its
records to ``<json>.rank<r>``; a run that was interrupted merges these files into ``<json>`` when it
starts again and resumes (with any number of processes). Part files, and the fidelity evaluation's
side files, must be visible to every process: one machine, or a shared file system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .evaluation.items import EvalItem
from .evaluation.runner import Evaluation
from .evaluation.store import ResultStore
from .evaluation.tasks import run_evaluation as run_single
from .evaluation.variants import Variant

# record fields (ttft_s, total_s, cpu_s) and summary-row fields that hold measured times
TIMING_FIELDS = frozenset({"ttft_s", "total_s", "cpu_s", "speedup", "full_ttft_s", "trimmed_ttft_s"})


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: rank, number of processes and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def load_options(self) -> dict[str, Any]:
        """`load_model` options that put this process's copy of the model straight onto its GPU."""
        return {"device_map": {"": self.device}} if self.device.type != "cpu" else {}


def setup() -> Launch:
    """Join the process group that torchrun / accelerate launch describe in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL with one GPU per process when there are
    GPUs, gloo on the CPU. A plain process (WORLD_SIZE unset or 1) gets rank 0 of 1 on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Launch()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Launch(rank, world, device)


def shard(items: dict[str, list[EvalItem]], rank: int, world: int, device: torch.device) -> dict[str, list[EvalItem]]:
    """Every `world`-th item (in task order) from the `rank`-th on, its prompt on `device`; every task
    is kept, so that each process creates the results cells in the same order."""
    out: dict[str, list[EvalItem]] = {task: [] for task in items}
    flat = [item for task_items in items.values() for item in task_items]
    for item in flat[rank::world]:
        out[item.task].append(replace(item, input_ids=item.input_ids.to(device)))
    return out


def part_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}")


def merge_cells(store: ResultStore, sources: list[dict[str, dict[str, Any]]],
                items: dict[str, list[EvalItem]]) -> None:
    """Add the records of `sources` (results files' "cells") that `store` lacks; a cell's new records
    go after its old ones, in item order (as a single process adds them)."""
    order = {task: {item.id: n for n, item in enumerate(task_items)} for task, task_items in items.items()}
    for cells in sources:
        for key, cell in cells.items():
            store.cells.setdefault(key, {**cell, "records": {}})
    for key, mine in store.cells.items():
        new = {i: r for cells in sources if key in cells for i, r in cells[key]["records"].items()
               if i not in mine["records"]}
        ranked = order.get(mine["task"], {})
        for item_id in sorted(new, key=lambda i: ranked.get(i, len(ranked))):
            mine["records"][item_id] = new[item_id]


def merge_parts(path: Path, items: dict[str, list[EvalItem]]) -> None:
    """Fold the part files an interrupted run left next to `path` into it, and remove them."""
    parts = sorted(path.parent.glob(f"{path.name}.rank*"))
    if not parts:
        return
    store = ResultStore(path)
    merge_cells(store, [ResultStore(part).cells for part in parts], items)
    store.save()
    for part in parts:
        part.unlink()


def run_evaluation(launch: Launch, kind: str, model, tokenizer, variants: list[Variant],
                   items: dict[str, list[EvalItem]], json_path: str | Path | None = None,
                   settings: dict[str, Any] | None = None, progress: bool = True, fidelity_tokens: int = 32,
                   plots: str | Path | None = "auto",
                   log: Callable[[str], None] | None = print) -> dict[str, Any] | None:
    """`evaluation.tasks.run_evaluation` over the processes of `launch`; returns the results data on
    rank 0 and None on the others. With one process it is exactly that function."""
    if launch.world == 1:
        return run_single(kind, model, tokenizer, variants, items, json_path=json_path, settings=settings,
                          progress=progress, fidelity_tokens=fidelity_tokens, plots=plots, log=log)
    path = Path(json_path) if json_path is not None else None
    if launch.rank == 0 and path is not None:
        merge_parts(path, items)
    dist.barrier()
    store = ResultStore(path)
    store.path = part_path(path, launch.rank) if path is not None else None
    mine = shard(items, launch.rank, launch.world, launch.device)
    if launch.rank == 0 and log:
        log(f"[trimformer eval] {launch.world} processes, {sum(map(len, mine.values()))} of "
            f"{sum(map(len, items.values()))} items on each (rank 0's share shown)")
    Evaluation(kind=kind, model=model, tokenizer=tokenizer, variants=variants, items=mine, store=store,
               settings=settings or {}, progress=progress and launch.rank == 0, fidelity_tokens=fidelity_tokens,
               log=log if launch.rank == 0 else None,
               side_dir=path.with_suffix(".fidelity") if path is not None else None).run()
    gathered: list[dict[str, Any]] | None = [{} for _ in range(launch.world)] if launch.rank == 0 else None
    dist.gather_object(store.cells, gathered, dst=0)
    data = None
    if launch.rank == 0:
        merged = ResultStore(path)
        merge_cells(merged, gathered, items)
        data = run_single(kind, model, tokenizer, variants, items, json_path=path, settings=settings,
                          store=merged, progress=False, fidelity_tokens=fidelity_tokens, plots=plots, log=None)
        for rank in range(launch.world):
            if path is not None:
                part_path(path, rank).unlink(missing_ok=True)
    dist.barrier()
    dist.destroy_process_group()
    return data


def without_timings(data: Any) -> Any:
    """A results file's data without the fields in `TIMING_FIELDS` (at any depth)."""
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k not in TIMING_FIELDS}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data
