"""Tables and plots from results files: a Markdown table (score per task, average, retention, TTFT
speedup, kept share), a Pareto plot (retention against speedup) per task group, and the needle heatmap
(depth x length) per variant. Several results files (trimformer's and kvpress's) merge into one table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from trimformer.errors import InputError


def load_results(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Merge the rows, group rows and needle grids of several results files (in order)."""
    merged: dict[str, Any] = {"results": [], "full": [], "groups": [], "needle_grid": {}}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"results file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or "results" not in data:
            raise InputError(f"{path} has no \"results\": not a trimformer eval results file")
        merged["results"].extend(data.get("results", []))
        merged["full"].extend(data.get("full", []))
        merged["groups"].extend(data.get("groups", []))
        for label, cells in (data.get("needle_grid") or {}).items():
            key = label if label not in merged["needle_grid"] else f"{label} ({path.stem})"
            merged["needle_grid"][key] = cells
        merged.setdefault("kind", data.get("kind"))
    return merged


def _name(row: dict[str, Any]) -> str:
    label = row.get("label") or f"{row['method']}@{row['keep']}"
    backend = row.get("backend", "trimformer")
    return label if backend == "trimformer" else f"{backend}:{label}"


def _fmt(value: Any, pattern: str = "{:.3f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return pattern.format(value)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], fidelity: bool = False) -> str:
    """Markdown: one line per (task, variant), tasks in order, "average" last; with answer agreement and
    first-token KL against the full model where the rows have them (LongBench)."""
    agreement = not fidelity and any("agreement" in r for r in rows)
    head = ["task", "variant", "keep", "full", "trimmed", "retention", "TTFT speedup", "full TTFT s",
            "compute kept", "KV kept", "items"]
    if fidelity:
        head[3:5] = ["full", "token agreement"]
        head += ["ROUGE-L", "KL (nats)"]
    if agreement:
        head += ["agreement", "first-token KL (nats)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tasks: list[str] = []
    for r in rows:
        if r["task"] not in tasks and r["task"] != "average":
            tasks.append(r["task"])
    tasks.append("average")
    for task in tasks:
        for r in [r for r in rows if r["task"] == task]:
            cells = [task, _name(r), _fmt(r.get("keep"), "{:.3g}"), _fmt(r.get("full_score")),
                     _fmt(r.get("trimmed_score")), _fmt(r.get("retention")), _fmt(r.get("speedup"), "{:.2f}x"),
                     _fmt(r.get("full_ttft_s"), "{:.2f}"), _fmt(r.get("kept"), "{:.1%}"), _fmt(r.get("kv"), "{:.1%}"),
                     _fmt(r.get("items"))]
            if fidelity:
                cells += [_fmt(r.get("rouge_l")), _fmt(r.get("kl"), "{:.4f}")]
            if agreement:
                cells += [_fmt(r.get("agreement")), _fmt(r.get("kl"), "{:.4f}")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_groups(group_rows: Sequence[dict[str, Any]]) -> str:
    if not group_rows:
        return ""
    head = ["group", "variant", "full", "trimmed", "retention", "TTFT speedup", "KV kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in dict.fromkeys(r["group"] for r in group_rows):
        for r in [r for r in group_rows if r["group"] == g]:
            lines.append("| " + " | ".join([g, _name(r), _fmt(r.get("full_score")), _fmt(r.get("trimmed_score")),
                                            _fmt(r.get("retention")), _fmt(r.get("speedup"), "{:.2f}x"),
                                            _fmt(r.get("kv"), "{:.1%}")]) + " |")
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speedup (x) and retention (y), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "all"


def pareto_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """Retention (y) against TTFT speedup (x), one point per variant, the Pareto front drawn."""
    pts = [(r["speedup"], r["retention"], _name(r)) for r in rows
           if r.get("speedup") is not None and r.get("retention") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for x, y, name in pts:
        peer = ":" in name
        ax.scatter([x], [y], marker="s" if peer else "o", s=36, color="tab:orange" if peer else "tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = pareto_front([(x, y) for x, y, _ in pts])
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="gray", lw=1, label="Pareto front")
    ax.axhline(1.0, color="lightgray", lw=0.8)
    ax.axvline(1.0, color="lightgray", lw=0.8)
    ax.set_xlabel("TTFT speedup (full / variant)")
    ax.set_ylabel("retention (variant score / full score)")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def needle_heatmap(grid: dict[str, list[dict[str, Any]]], path: str | Path) -> Path | None:
    """One panel per variant: depth (rows) x context length (columns), colour = share of needles found."""
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(grid)
    lengths = sorted({c["length"] for cells in grid.values() for c in cells})
    depths = sorted({c["depth"] for cells in grid.values() for c in cells})
    cols = min(4, len(labels))
    rows_n = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.4 * cols + 1.2, 2.7 * rows_n + 0.4), squeeze=False,
                             constrained_layout=True)
    image = None
    for n, (ax, label) in enumerate(zip(axes.flat, labels)):
        mat = np.full((len(depths), len(lengths)), np.nan)
        acc: dict[tuple[int, int], list[float]] = {}
        for c in grid[label]:
            acc.setdefault((depths.index(c["depth"]), lengths.index(c["length"])), []).append(c["score"])
        for (i, j), scores in acc.items():
            mat[i, j] = sum(scores) / len(scores)
        image = ax.imshow(mat, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        found = int(np.nansum(mat))
        ax.set_title(f"{label}\n{found}/{int(np.sum(~np.isnan(mat)))} found", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=6)
        ax.set_xlabel("context length", fontsize=7)
        if n % cols == 0:
            ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share found")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(data: dict[str, Any], folder: str | Path) -> list[Path]:
    """Pareto plots per task group (or per task, and for the average), and the needle heatmap."""
    folder = Path(folder)
    written: list[Path] = []
    rows = list(data.get("full", [])) + list(data.get("results", []))
    groups = data.get("groups", [])
    for group in dict.fromkeys(r["group"] for r in groups):
        p = pareto_plot([r for r in groups if r["group"] == group], folder / f"pareto_{_slug(group)}.png",
                        f"{group}: retention vs TTFT speedup")
        if p:
            written.append(p)
    if not groups:
        for task in dict.fromkeys(r["task"] for r in rows if r["task"] != "average"):
            p = pareto_plot([r for r in rows if r["task"] == task], folder / f"pareto_{_slug(task)}.png",
                            f"{task}: retention vs TTFT speedup")
            if p:
                written.append(p)
    p = pareto_plot([r for r in rows if r["task"] == "average"], folder / "pareto_average.png",
                    "average: retention vs TTFT speedup")
    if p:
        written.append(p)
    if data.get("needle_grid"):
        p = needle_heatmap(data["needle_grid"], folder / "needle_heatmap.png")
        if p:
            written.append(p)
    return written


def report(paths: Sequence[str | Path], out: str | Path | None = None, plots: str | Path | None = None) -> str:
    """The merged table (and group table) of several results files; written to `out` if given."""
    data = load_results(paths)
    fidelity = any("prefix" in r for r in data["results"])
    text = format_table(data["full"] + data["results"], fidelity=fidelity)
    groups = format_groups(data["groups"])
    if groups:
        text += "\n\nTask groups (mean score over the group's tasks):\n\n" + groups
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    if plots:
        write_plots(data, plots)
    return text
