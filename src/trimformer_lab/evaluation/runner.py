"""Runs: every (task, variant) cell on the same items, the full model beside each pruned variant, timed
side by side; results written to JSON after every item so that an interrupted run resumes where it
stopped, without redoing finished cells.

A *variant* is one way of running the model (the full model, a trimformer method at a keep level, or a
peer such as a kvpress press); a *backend* knows how to prefill and decode with it. The trimformer
backend is here; `benchmarks/kvpress_compare.py` brings a kvpress one and reuses everything else.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from . import metrics
from ..patch.cache_names import cache_kwargs, output_cache

FORMAT = "trimformer-eval/1"
FULL = "full"
MAX_PREDICTION_CHARS = 2000


# ---- items --------------------------------------------------------------------------------------
@dataclass
class EvalItem:
    """One prompt with what scores its answer."""

    task: str
    id: str
    input_ids: torch.Tensor          # (1, T)
    references: list[str]
    metric: str                      # a key of metrics.METRICS, or "fidelity"
    max_new_tokens: int
    all_classes: list[str] = field(default_factory=list)
    first_line: bool = False         # score only the first line (and stop decoding after it)
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        return metrics.best_score(self.metric, prediction, self.references, self.all_classes, self.first_line)


# ---- variants -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """A way to run the model. `keep` None means the method's default schedule (TrimConfig defaults)."""

    method: str
    keep: float | None = None
    options: tuple[tuple[str, Any], ...] = ()
    backend: str = "trimformer"

    @property
    def label(self) -> str:
        if self.method == FULL:
            return FULL
        keep = "default" if self.keep is None else f"{self.keep:g}"
        extra = "".join(f",{k}={_text(v)}" for k, v in self.options)
        return f"{self.method}@{keep}{extra}"

    def trim_config(self):
        from ..config import TrimConfig

        options = {k: _thaw(v) for k, v in self.options}
        if self.keep is not None:
            options["keep"] = self.keep
        return TrimConfig.from_dict({"method": self.method, **options})


def parse_variants(methods: str | Sequence[str], keeps: str | Sequence[str] | None = None,
                   options: dict[str, Any] | None = None) -> list[Variant]:
    """Variants from "lazy,random" and "default,0.7" (cross product). A method may carry its own keep,
    "lazy@0.7" or "random@default", which then ignores `keeps`. "full" is always run and needs no entry."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if keeps is None or keeps == "":
        keep_list: list[float | None] = [None]
    else:
        raw = [k.strip() for k in keeps.split(",")] if isinstance(keeps, str) else list(keeps)
        keep_list = [_keep(k) for k in raw]
    opts = tuple(sorted((k, _freeze(v)) for k, v in (options or {}).items()))
    variants: list[Variant] = []
    for name in names:
        if not name:
            continue
        if "@" in name:
            method, keep = name.split("@", 1)
            candidates = [Variant(method, _keep(keep), opts)]
        else:
            candidates = [Variant(name, k, opts) for k in keep_list]
        for v in candidates:
            if v.method == FULL:
                continue
            if v not in variants:
                variants.append(v)
    if not variants:
        raise InputError("no method to evaluate: pass --method lazy (or several: lazy,random,static,truncate)")
    for v in variants:
        v.trim_config()  # validate now: a clear error before any model is loaded
        from ..registry import get_method

        get_method(v.method)
    return variants


class _FrozenDict(tuple):
    """A dict option value as a hashable tuple of (key, value) pairs."""


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (a Variant is a dict key): dicts become
    `_FrozenDict`s, lists become tuples."""
    if isinstance(value, dict):
        return _FrozenDict((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The option value `_freeze` stood in for (tuples come back as lists)."""
    if isinstance(value, _FrozenDict):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _text(value: Any) -> str:
    """An option value as it appears in a label: {4:0.5,8:0.7}, [7,14], 0.5."""
    value = _thaw(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def _keep(text: Any) -> float | None:
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "default", "none")):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a keep level is a ratio in (0, 1] or 'default', got {text!r}") from exc
    if not 0.0 < value <= 1.0:
        raise InputError(f"a keep level is a ratio in (0, 1] or 'default', got {text!r}")
    return value


# ---- decoding -----------------------------------------------------------------------------------
@dataclass
class Decoded:
    tokens: list[int]
    ttft_s: float
    total_s: float
    logprobs: list[torch.Tensor]     # next-token log-probabilities at the first steps (as asked)
    compute_share: float = 1.0       # share of the prefill's token-layer work done
    kv_share: float = 1.0            # share of the prompt's KV entries kept after the prefill (with
                                     # decode-time eviction: of all tokens seen, at the end of decoding)
    info: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def greedy_decode(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, int], torch.Tensor],
                  max_new_tokens: int, eos: Iterable[int] = (), stop: Callable[[list[int]], bool] | None = None,
                  keep_logprobs: int = 0) -> Decoded:
    """Greedy decoding around two callables: `prefill()` -> last-position logits (1, V), and
    `step(token (1, 1), i)` -> logits (1, V) for the i-th new token. TTFT = prefill + first argmax."""
    eos = set(eos)
    start = time.perf_counter()
    logits = prefill()
    token = logits[:, -1].argmax(-1) if logits.dim() == 3 else logits.argmax(-1)
    ttft = time.perf_counter() - start
    kept_lp: list[torch.Tensor] = []
    last = logits[:, -1] if logits.dim() == 3 else logits
    if keep_logprobs:
        kept_lp.append(torch.log_softmax(last[0].float(), -1))
    tokens: list[int] = []
    for i in range(max_new_tokens):
        tok = int(token[0])
        if tok in eos:
            break
        tokens.append(tok)
        if len(tokens) >= max_new_tokens or (stop is not None and stop(tokens)):
            break
        logits = step(token.view(1, 1), i)
        last = logits[:, -1] if logits.dim() == 3 else logits
        if len(kept_lp) < keep_logprobs:
            kept_lp.append(torch.log_softmax(last[0].float(), -1))
        token = last.argmax(-1)
    return Decoded(tokens, ttft, time.perf_counter() - start, kept_lp)


def newline_stop(tokenizer) -> Callable[[list[int]], bool]:
    """Stop once the answer has a complete first line (leading newlines ignored), as the few-shot
    tasks score only that line."""
    def stop(tokens: list[int]) -> bool:
        if "\n" not in tokenizer.decode(tokens[-1:]):
            return False
        return "\n" in tokenizer.decode(tokens).lstrip("\n")
    return stop


class Backend(Protocol):
    name: str

    def describe(self, model, variant: Variant) -> dict[str, Any]:
        """What identifies the variant's results (its full configuration), plus "keep": a float."""

    def generate(self, model, variant: Variant, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int],
                 stop=None, keep_logprobs: int = 0) -> Decoded:
        """Prefill and decode greedily with the variant; TTFT and the kept shares filled in."""


class TrimformerBackend:
    """The full model and every trimformer method; `trim` before the prompt, `untrim` after, always."""

    name = "trimformer"

    def describe(self, model, variant: Variant) -> dict[str, Any]:
        if variant.method == FULL:
            return {"method": FULL, "keep": 1.0}
        from ..presets import preset_for

        from ..registry import get_method

        cfg = variant.trim_config()
        num_layers = len(model.model.layers)
        if get_method(cfg.method).prunes_prefill:
            plan = cfg.resolve_schedule(num_layers, preset_for(model.config))
            keeps = list(plan.values())
            # `keep` of a schedule: the per-stage keep it equals on geometric average (= keep when uniform)
            keep = math.exp(sum(math.log(k) for k in keeps) / len(keeps)) if keeps else 1.0
        else:   # decode-time eviction only: the prompt is computed whole; `keep` is the KV budget share
            plan = {}
            keep = cfg.budget if isinstance(cfg.budget, float) else 1.0
        return {"method": variant.method, "keep": round(keep, 4), "config": dataclasses.asdict(cfg),
                "schedule": {str(k): v for k, v in plan.items()}}

    def generate(self, model, variant: Variant, input_ids, max_new_tokens, eos, stop=None, keep_logprobs=0):
        from ..api import is_trimmed, stats, trim, untrim

        state: dict[str, Any] = {}

        def prefill():
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            state["cache"] = output_cache(out)
            return out.logits

        def step(token, i):
            out = model(input_ids=token, **cache_kwargs(state["cache"]), use_cache=True)
            state["cache"] = output_cache(out)
            return out.logits

        if variant.method == FULL:
            if is_trimmed(model):
                untrim(model)
            return greedy_decode(prefill, step, max_new_tokens, eos, stop, keep_logprobs)
        trim(model, variant.trim_config())
        try:
            decoded = greedy_decode(prefill, step, max_new_tokens, eos, stop, keep_logprobs)
            info = stats(model)
        finally:
            untrim(model)
        decoded.compute_share = float(info["kept_fraction"])
        decoded.kv_share = float(info["kept_fraction"])  # layer l keeps the KV of the tokens it computed
        if info.get("total_tokens_seen"):  # decode-time eviction: what the cache holds at the end
            decoded.kv_share = sum(row["in_cache"] for row in info["per_layer"]) / info["total_tokens_seen"]
        decoded.info = {"flop_ratio": info["flop_ratio"], "revived": info.get("revived", 0)}
        if "total_tokens_reintroduced" in info:   # decode-time eviction: the shadow set's traffic
            decoded.info.update(evicted=info["total_tokens_pruned"], readmitted=info["total_tokens_reintroduced"])
        return decoded


# ---- the results file ---------------------------------------------------------------------------
class ResultStore:
    """The JSON results file: ``{"format", "results": [rows], "groups": [...], "cells": {key: cell}}``.
    A cell is one (task, variant, settings) with a record per item; written atomically after every
    record, so a killed run loses at most the item it was on."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"format": FORMAT, "results": [], "cells": {}}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.path} exists but is not a results JSON ({exc}); move it away or "
                                 "pass another --json") from exc
            if not isinstance(data, dict) or not isinstance(data.get("cells", {}), dict):
                raise InputError(f"{self.path} is not a trimformer results file")
            data.setdefault("cells", {})
            data.setdefault("results", [])
            self.data = data

    @property
    def cells(self) -> dict[str, Any]:
        return self.data["cells"]

    @staticmethod
    def cell_key(task: str, label: str, fingerprint: dict[str, Any]) -> str:
        digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{task}|{label}|{digest}"

    def cell(self, task: str, label: str, fingerprint: dict[str, Any], description: dict[str, Any]) -> dict[str, Any]:
        """The cell of (task, variant, settings), reusing a stored one whose fingerprint matches; options
        that exist on only one side (a TrimConfig field added since the cell was run) are ignored, any
        value that differs (a changed default included) makes a new cell."""
        key = self.cell_key(task, label, fingerprint)
        if key in self.cells:
            return self.cells[key]
        for cell in self.cells.values():
            if cell["task"] == task and cell["label"] == label and _compatible(cell.get("fingerprint"), fingerprint):
                return cell
        self.cells[key] = {"task": task, "label": label, **description, "fingerprint": fingerprint, "records": {}}
        return self.cells[key]

    def save(self) -> None:
        """Write the file, first taking in what other runs wrote to it since (under a lock): their
        cells and records, and their summary rows for variants this run does not summarise. Two runs
        on one file (other methods, the same full model) add up instead of overwriting each other."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.path.parent, os.O_RDONLY)   # the lock: the folder itself, so no lock file is left
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            if self.path.exists():
                self._merge(json.loads(self.path.read_text()))
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
            os.replace(tmp, self.path)
        finally:
            os.close(folder)   # releases the lock

    def _merge(self, disk: dict[str, Any]) -> None:
        for key, cell in disk.get("cells", {}).items():
            mine = self.cells.setdefault(key, cell)
            for item_id, record in cell["records"].items():
                mine["records"].setdefault(item_id, record)
        for field_name in ("results", "full", "groups"):
            mine_rows = self.data.get(field_name, [])
            ours = {_row_key(r) for r in mine_rows}
            self.data[field_name] = mine_rows + [r for r in disk.get(field_name, []) if _row_key(r) not in ours]


def _row_key(row: dict[str, Any]) -> tuple:
    """What a summary row is of: its task (or task group) and variant label."""
    return row.get("task", row.get("group")), row.get("label")


def _compatible(old: Any, new: Any) -> bool:
    """Equal, except that dict keys present on one side only are ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_compatible(old[k], new[k]) for k in old.keys() & new.keys())
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_compatible(a, b) for a, b in zip(old, new))
    return old == new


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---- one evaluation -----------------------------------------------------------------------------
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
                if not self._done(cells[task, v], item)]
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
    def _done(self, cell, item: EvalItem) -> bool:
        rec = cell["records"].get(item.id)
        if rec is None:
            return False
        if self.kind == "fidelity" and cell["method"] == FULL and not self._side_path(item).exists():
            return False  # the full model's distribution is needed by the variants still to run
        return True

    def _side_path(self, item: EvalItem) -> Path:
        base = self.side_dir or (self.store.path.with_suffix(".fidelity") if self.store.path else Path(".fidelity"))
        safe = f"{item.task}__{item.id}".replace("/", "_")
        return base / f"{safe}.pt"

    def _run_one(self, item, v, eos, stop, cells, full_cache) -> dict[str, Any]:
        keep_lp = 1 if self.kind == "fidelity" else 0
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


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def retention(full: float, trimmed: float) -> float | None:
    """trimmed / full; 1.0 when both are 0; None (undefined) when only the full model scores 0."""
    if full > 0:
        return trimmed / full
    return 1.0 if trimmed == 0 else None


def _aggregate(pairs: list[tuple[dict, dict]], kind: str) -> dict[str, Any]:
    """Scores and timings over (full record, variant record) pairs of the same items."""
    full = [f["score"] for f, _ in pairs]
    trim = [t["score"] for _, t in pairs]
    t_full = sum(f["ttft_s"] for f, _ in pairs)
    t_trim = sum(t["ttft_s"] for _, t in pairs)
    row = {
        "full_score": _mean(full),
        "trimmed_score": _mean(trim),
        "speedup": t_full / t_trim if t_trim > 0 else None,
        "full_ttft_s": t_full / len(pairs),
        "trimmed_ttft_s": t_trim / len(pairs),
        "kept": _mean([t["compute"] for _, t in pairs]),
        "kv": _mean([t["kv"] for _, t in pairs]),
        "items": len(pairs),
    }
    if kind == "fidelity":
        row["rouge_l"] = _mean([t["rouge_l"] for _, t in pairs])
        row["kl"] = _mean([t["kl"] for _, t in pairs])
        row["prefix"] = _mean([t["prefix"] for _, t in pairs])
    row["retention"] = retention(row["full_score"], row["trimmed_score"])
    return row


def summarise_cells(items: dict[str, list[EvalItem]], variants: list[Variant], cells, kind: str,
                    groups: dict[str, list[str]] | None = None):
    """Rows (one per task and variant whose cell is complete, then "average") and group rows."""
    full_v = variants[0]
    rows: list[dict[str, Any]] = []
    group_rows: list[dict[str, Any]] = []
    for v in variants:
        per_task: dict[str, dict[str, Any]] = {}
        for task, task_items in items.items():
            full_cell, cell = cells.get((task, full_v)), cells.get((task, v))
            if full_cell is None or cell is None:
                continue
            pairs = [(full_cell["records"].get(it.id), cell["records"].get(it.id)) for it in task_items]
            if not pairs or any(f is None or t is None for f, t in pairs):
                continue  # the cell is not finished
            per_task[task] = {"task": task, "method": v.method, "keep": cell["keep"], "label": v.label,
                              "backend": cell.get("backend", "trimformer"), **_aggregate(pairs, kind)}
        if not per_task:
            continue
        rows.extend(per_task.values())
        if len(per_task) == len(items):
            rows.append(_average("average", v, per_task.values(), kind))
            for group, names in (groups or {}).items():
                members = [per_task[n] for n in names if n in per_task]
                if members:
                    group_rows.append({"group": group, **_average("average", v, members, kind)})
    return [_clean(r) for r in rows], [_clean(r) for r in group_rows]


def _average(name: str, v: Variant, task_rows: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    task_rows = list(task_rows)
    first = task_rows[0]
    full = _mean([r["full_score"] for r in task_rows])
    trimmed = _mean([r["trimmed_score"] for r in task_rows])
    t_full = sum(r["full_ttft_s"] * r["items"] for r in task_rows)
    t_trim = sum(r["trimmed_ttft_s"] * r["items"] for r in task_rows)
    n = sum(r["items"] for r in task_rows)
    row = {"task": name, "method": v.method, "keep": first["keep"], "label": v.label, "backend": first["backend"],
           "full_score": full, "trimmed_score": trimmed, "retention": retention(full, trimmed),
           "speedup": t_full / t_trim if t_trim > 0 else None, "full_ttft_s": t_full / n, "trimmed_ttft_s": t_trim / n,
           "kept": _mean([r["kept"] for r in task_rows]), "kv": _mean([r["kv"] for r in task_rows]), "items": n}
    if kind == "fidelity":
        for key in ("rouge_l", "kl", "prefix"):
            row[key] = _mean([r[key] for r in task_rows])
    return row


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            v = None if not math.isfinite(v) else round(v, 6)
        out[k] = v
    return out
