"""Runs: every (task, variant) cell on the same items, the full model beside each pruned variant, timed
side by side; results written to JSON after every item so that an interrupted run resumes where it
stopped, without redoing finished cells.

A *variant* (`variants.py`) is one way of running the model (the full model, a trimformer method at a
keep level, or a peer such as a kvpress press); a *backend* (`backend.py`) knows how to prefill and decode
with it. The trimformer backend is there; `benchmarks/kvpress_compare.py` brings a kvpress one and reuses
everything else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import metrics
from .backend import TrimformerBackend, newline_stop
from .items import EvalItem
from .store import ResultStore
from .summary import summarise_cells
from .variants import FULL, Variant

MAX_PREDICTION_CHARS = 2000


@dataclass
class Evaluation:
    """Run `variants` (the full model is added first) on `items` ({task: [EvalItem]}), store and summarise.

    `settings` (model name, token budget, ...) go into every cell's fingerprint: a cell is reused on
    resume only when its variant configuration and settings are the same."""

    kind: str                                    # "longbench", "needle", "fidelity" (tables and plots)
    model: Any
    tokenizer: Any
    variants: list[Variant]
    items: dict[str, list[EvalItem]]
    store: ResultStore
    settings: dict[str, Any] = field(default_factory=dict)
    backend: Any = field(default_factory=TrimformerBackend)
    progress: bool = True
    fidelity_tokens: int = 32
    groups: dict[str, list[str]] | None = None   # task group -> tasks, for the group rows and plots
    warmup: bool = True
    log: Callable[[str], None] | None = None
    side_dir: Path | None = None                 # where the full model's logprobs live (fidelity)
    ran: int = field(default=0, init=False)      # records computed by this call (not resumed)

    def all_variants(self) -> list[Variant]:
        return [Variant(FULL, backend=self.backend.name)] + [v for v in self.variants if v.method != FULL]

    def run(self) -> list[dict[str, Any]]:
        variants = self.all_variants()
        described = {v: self.backend.describe(self.model, v) for v in variants}
        cells = {}
        for task in self.items:
            for v in variants:
                fp = {"variant": described[v], "settings": self.settings, "kind": self.kind, "backend": self.backend.name}
                desc = {"method": v.method, "keep": described[v]["keep"], "backend": self.backend.name}
                cells[task, v] = self.store.cell(task, v.label, fp, desc)
        todo = [(task, item, v) for task, items in self.items.items() for item in items for v in variants
                if not self._done(cells[task, v], item, [cells[task, w] for w in variants])]
        total = sum(len(items) for items in self.items.values()) * len(variants)
        if self.log:
            self.log(f"[trimformer eval] {self.kind}: {total} records, {total - len(todo)} already in "
                     f"{self.store.path}, {len(todo)} to run")
        if todo and self.warmup:
            self._warm_up(todo[0][1], variants)
        eos = _eos_ids(self.model, self.tokenizer)
        stop_nl = newline_stop(self.tokenizer)
        bar = tqdm(total=len(todo), desc=f"eval {self.kind}", disable=not self.progress, unit="run")
        full_cache: dict[tuple[str, str], dict[str, Any]] = {}
        for task, item, v in todo:
            bar.set_postfix_str(f"{task} {v.label}", refresh=False)
            record = self._run_one(item, v, eos, stop_nl if item.first_line else None, cells, full_cache)
            cells[task, v]["records"][item.id] = record
            self.ran += 1
            self._publish(cells)
            self.store.save()
            bar.update()
        bar.close()
        self._publish(cells)
        if self.kind == "needle":
            self.store.data["needle_grid"] = self.needle_grid(cells)
        self.store.save()
        return self.store.data["results"]

    def _publish(self, cells) -> None:
        """The summary in the results file: "results" (the contract's rows, pruned variants only),
        "full" (the full model's own rows, for the tables), "groups" (task-group averages)."""
        rows, group_rows = self.summarise(cells)
        self.store.data["kind"] = self.kind
        self.store.data["results"] = [r for r in rows if r["method"] != FULL]
        self.store.data["full"] = [r for r in rows if r["method"] == FULL]
        self.store.data["groups"] = group_rows

    # -- one record --
    def _done(self, cell, item: EvalItem, item_cells: list[dict[str, Any]]) -> bool:
        rec = cell["records"].get(item.id)
        if rec is None:
            return False
        if cell["method"] == FULL and not self._side_path(item).exists():
            # the full model's distribution is needed by the variants still to run
            if self.kind == "fidelity":
                return False
            if self.kind == "longbench" and any(item.id not in c["records"] for c in item_cells):
                return False
        return True

    def _side_path(self, item: EvalItem) -> Path:
        base = self.side_dir or (self.store.path.with_suffix(".fidelity") if self.store.path else Path(".fidelity"))
        safe = f"{item.task}__{item.id}".replace("/", "_")
        return base / f"{safe}.pt"

    def _run_one(self, item, v, eos, stop, cells, full_cache) -> dict[str, Any]:
        keep_lp = 1 if self.kind in ("fidelity", "longbench") else 0
        max_new = self.fidelity_tokens if self.kind == "fidelity" else item.max_new_tokens
        cpu = time.process_time()
        decoded = self.backend.generate(self.model, v, item.input_ids, max_new, eos, stop, keep_lp)
        cpu = time.process_time() - cpu
        text = self.tokenizer.decode(decoded.tokens, skip_special_tokens=True)
        record: dict[str, Any] = {
            "ttft_s": round(decoded.ttft_s, 4),
            "total_s": round(decoded.total_s, 4),
            "cpu_s": round(cpu, 3),
            "prompt_tokens": int(item.input_ids.shape[1]),
            "new_tokens": len(decoded.tokens),
            "compute": round(decoded.compute_share, 5),
            "kv": round(decoded.kv_share, 5),
            "prediction": text[:MAX_PREDICTION_CHARS],
            **({"info": decoded.info} if decoded.info else {}),
            **({"meta": item.meta} if item.meta else {}),
        }
        if self.kind == "longbench":
            record["score"] = item.score(text)
            record.update(self._agreement(item, v, text, decoded, cells, full_cache))
            return record
        if self.kind != "fidelity":
            record["score"] = item.score(text)
            return record
        record["tokens"] = decoded.tokens
        if v.method == FULL:
            path = self._side_path(item)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(decoded.logprobs[0].to(torch.float32), path)
            full_cache[item.task, item.id] = {"tokens": decoded.tokens, "text": text, "logprobs": decoded.logprobs[0]}
            record.update(score=1.0, rouge_l=1.0, kl=0.0, prefix=1.0)
            return record
        ref = full_cache.get((item.task, item.id))
        if ref is None:
            full_rec = cells[item.task, Variant(FULL, backend=self.backend.name)]["records"][item.id]
            ref = {"tokens": full_rec["tokens"], "text": full_rec["prediction"],
                   "logprobs": torch.load(self._side_path(item))}
            full_cache[item.task, item.id] = ref
        n = self.fidelity_tokens
        record["score"] = metrics.token_agreement(ref["tokens"], decoded.tokens, n)
        record["prefix"] = metrics.prefix_agreement(ref["tokens"], decoded.tokens, n)
        both_empty = not ref["text"].strip() and not text.strip()
        record["rouge_l"] = 1.0 if both_empty else metrics.rouge_l(text, ref["text"])
        record["kl"] = metrics.kl_divergence(ref["logprobs"], decoded.logprobs[0])
        return record

    def _agreement(self, item, v, text, decoded, cells, full_cache) -> dict[str, Any]:
        """LongBench: the answer scored against the full model's answer with the task's metric, and the
        KL of the first-token distribution from the full model's (from the prefill's logits, no extra
        forward); the full model's own distribution is kept beside the results for the variants."""
        first = decoded.logprobs[0].to(torch.float32) if decoded.logprobs else None
        if v.method == FULL:
            if first is not None and (self.side_dir or self.store.path):   # kept in memory only otherwise
                path = self._side_path(item)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(first, path)
            full_cache[item.task, item.id] = {"text": text[:MAX_PREDICTION_CHARS], "logprobs": first}
            return {"agreement": 1.0, "kl": 0.0}
        ref = full_cache.get((item.task, item.id))
        if ref is None:
            full_rec = cells[item.task, Variant(FULL, backend=self.backend.name)]["records"][item.id]
            path = self._side_path(item)
            ref = {"text": full_rec["prediction"], "logprobs": torch.load(path) if path.exists() else None}
            full_cache[item.task, item.id] = ref
        agreement = metrics.answer_agreement(item.metric, text[:MAX_PREDICTION_CHARS], ref["text"],
                                             item.all_classes, item.first_line)
        kl = None
        if first is not None and ref["logprobs"] is not None:
            kl = metrics.kl_divergence(ref["logprobs"], first)
        return {"agreement": agreement, "kl": kl}

    def _warm_up(self, item: EvalItem, variants: list[Variant]) -> None:
        """One short untimed prefill per variant, so the first timed item does not pay for warm-up."""
        ids = item.input_ids[:, : min(256, item.input_ids.shape[1])]
        for v in variants:
            try:
                self.backend.generate(self.model, v, ids, 1, [], None, 0)
            except Exception:  # noqa: BLE001 - warm-up only; the timed run reports real errors
                pass

    # -- tables --
    def summarise(self, cells) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return summarise_cells(self.items, self.all_variants(), cells, self.kind, self.groups)

    def needle_grid(self, cells) -> dict[str, list[dict[str, Any]]]:
        grid: dict[str, list[dict[str, Any]]] = {}
        for (task, v), cell in cells.items():
            for item in self.items[task]:
                rec = cell["records"].get(item.id)
                if rec is not None:
                    label = v.label if self.backend.name == "trimformer" else f"{self.backend.name}:{v.label}"
                    grid.setdefault(label, []).append({"length": item.meta.get("length"), "depth": item.meta.get("depth"),
                                                         "score": rec["score"]})
        return grid


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return sorted(ids)
