"""Summary rows of an evaluation's cells: per task and variant the full model's score beside the variant's,
retention, TTFT speedup and kept shares; averages over tasks and task groups."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from . import metrics
from .items import EvalItem
from .variants import FULL, Variant


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def retention(full: float, trimmed: float) -> float | None:
    """trimmed / full; 1.0 when both are 0; None (undefined) when only the full model scores 0."""
    if full > 0:
        return trimmed / full
    return 1.0 if trimmed == 0 else None


def _agreement(item: EvalItem, full: dict, trimmed: dict) -> float:
    """The record's answer agreement; for a record stored without one, scored from the two predictions."""
    if "agreement" in trimmed:
        return trimmed["agreement"]
    return metrics.answer_agreement(item.metric, trimmed["prediction"], full["prediction"], item.all_classes,
                                    item.first_line)


def _mean_known(values: Sequence[float | None]) -> float | None:
    known = [x for x in values if x is not None]
    return _mean(known) if known else None


def _aggregate(pairs: list[tuple[dict, dict]], kind: str, task_items: Sequence[EvalItem] = (),
               full_variant: bool = False) -> dict[str, Any]:
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
    if kind == "longbench":
        if full_variant:
            row["agreement"], row["kl"] = 1.0, 0.0
        else:
            row["agreement"] = _mean([_agreement(it, f, t) for it, (f, t) in zip(task_items, pairs)])
            row["kl"] = _mean_known([t.get("kl") for _, t in pairs])   # None where no record has one
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
                              "backend": cell.get("backend", "trimformer"),
                              **_aggregate(pairs, kind, task_items, v.method == FULL)}
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
    if kind == "longbench":
        row["agreement"] = _mean([r["agreement"] for r in task_rows])
        row["kl"] = _mean_known([r.get("kl") for r in task_rows])
    return row


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            v = None if not math.isfinite(v) else round(v, 6)
        out[k] = v
    return out
