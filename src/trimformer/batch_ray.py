"""`trimformer batch --ray`: the items of a batch job answered on Ray Data by a pool of model actors.

Each actor loads the model once, trims it and answers its batches greedily with `threads_per_actor` torch
threads (and as many Ray CPUs). An actor that dies mid-batch is restarted and the batch retried: Ray Data
creates the pool's actors with ``max_restarts=-1`` and ``max_task_retries=-1`` (a line's Python error
never kills its actor: it becomes that line's error record). Results stream back to the caller as they
finish, in no set order; a retried batch may send a line again, which `trimformer.batch.Output` does not
write twice. Ray is imported only here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import numpy as np

from .batch_engine import Item, Spec

BATCH_ROWS = 1       # lines per batch: a retry redoes at most one line


class ModelActor:
    """Ray Data's class UDF: {"line", "item"} rows -> {"line", "record"} rows (item and record as JSON)."""

    def __init__(self, spec: Spec):
        self.engine = spec.engine()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        lines = [int(line) for line in batch["line"]]
        items = [Item(line, *json.loads(text)) for line, text in zip(lines, batch["item"])]
        return {"line": lines, "record": [json.dumps(self.engine.record(item)) for item in items]}


def connect(address: str | None) -> None:
    """ray.init: `address` ("auto": a running cluster, else a local one; "local": a new local one)."""
    import ray

    if address in (None, "auto"):
        try:
            ray.init(address="auto")
            return
        except ConnectionError:
            address = "local"
    ray.init(address=address, include_dashboard=False if address == "local" else None)


def answers(items: list[Item], spec: Spec, *, actors: int | None = None, threads_per_actor: int = 1,
            address: str | None = "auto", actor: type = ModelActor) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of each item, computed by a pool of `actors` (default: the cluster's CPUs /
    `threads_per_actor`). Uses the Ray connection of this process if there is one, else `connect(address)`
    and shuts down at the end. `actor`: the UDF class (ModelActor, or a subclass)."""
    import ray

    started = not ray.is_initialized()
    if started:
        connect(address)
    try:
        pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_actor)
        pool = min(pool, len(items))
        ray.data.DataContext.get_current().enable_progress_bars = False     # the caller shows its own
        rows = [{"line": item.line, "item": json.dumps([item.id, item.request])} for item in items]
        data = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            actor, fn_constructor_kwargs={"spec": dataclasses.replace(spec, threads=threads_per_actor)},
            batch_size=BATCH_ROWS, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=threads_per_actor)
        for row in data.iter_rows():
            yield int(row["line"]), json.loads(row["record"])
    finally:
        if started:
            ray.shutdown()
