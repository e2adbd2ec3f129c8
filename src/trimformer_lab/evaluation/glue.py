"""SST-2 / QNLI: accuracy, kept share, encoder throughput and peak memory of fine-tuned classifiers.

One table per task, every row in one process: the fine-tuned model without pruning, generic dynamic
pruning ([CLS] attention, `cls_attention`) on that same model at the kept share TS-DTP reached, and TS-DTP.
Throughput is sentences/s of the whole classifier forward (embeddings, encoder, head; the forward calls
only) at batch 32 over length-sorted batches (as a server would batch them; padding would otherwise
dominate), rows alternating within each round after a warm-up, median of `repeats` rounds, on the torch
threads the caller set. Peak memory is measured per row in a fresh process: peak
resident memory while it runs the longest bench batch, and that peak above its memory after loading.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trimformer.errors import InputError
from trimformer.pruners.tsdtp import checkpoint_paths

from ..classifier import BATCH, dev_batches, load_classifier, run_batches, tsdtp_options

GENERIC = "cls_attention"
CLS_ONLY_LAST = "finetuned-cls-only-last"   # the unpruned model, last layer's MLP on [CLS] only


@dataclass
class Variant:
    """One row: a method name, its model, and its trim options (None: no pruning)."""

    method: str
    model: torch.nn.Module
    trim: dict[str, Any] | None
    path: str


# ---- generic pruning at a matched kept share ---------------------------------------------------------
def ratio_kept_share(lengths: list[int], layers: list[int], keep: float, num_layers: int,
                     protected: int = 2, cls_only_last: bool = False) -> float:
    """Kept share of token-layer computations when every layer in `layers` keeps ceil(keep x live) tokens
    (at least `protected`), dropping between attention and MLP as the encoder adapter does; with
    `cls_only_last` the last layer's MLP runs on [CLS] alone."""
    done = 0
    for n in lengths:
        live = n
        for layer in range(num_layers):
            done += live
            if layer in layers:
                live = min(live, max(math.ceil(keep * live - 1e-9), min(protected, n)))
            done += 1 if cls_only_last and layer == num_layers - 1 else live
    return done / (2 * num_layers * sum(lengths))


def matched_keep(lengths: list[int], layers: list[int], num_layers: int, target: float,
                 cls_only_last: bool = False) -> float:
    """The smallest per-layer keep ratio (to 1e-4) whose kept share is at least `target`."""
    def share(keep: float) -> float:
        return ratio_kept_share(lengths, layers, keep, num_layers, cls_only_last=cls_only_last)

    low, high = 1e-4, 1.0
    if share(low) >= target:
        return low
    for _ in range(40):
        mid = (low + high) / 2
        if share(mid) >= target:
            high = mid
        else:
            low = mid
    return round(high, 4) if share(round(high, 4)) >= target else high


# ---- timing and memory -------------------------------------------------------------------------------
def bench_batches(batches: list[dict[str, torch.Tensor]], count: int) -> list[dict[str, torch.Tensor]]:
    """`count` full batches spread evenly over the length-sorted list (all of them if fewer)."""
    full = [b for b in batches if b["input_ids"].shape[0] == BATCH] or batches
    if count >= len(full):
        return full
    step = len(full) / count
    return [full[int(i * step + step / 2)] for i in range(count)]


def time_variants(variants: list[Variant], batches: list[dict[str, torch.Tensor]], repeats: int, warmup: int,
                  progress: bool = True) -> dict[str, dict[str, float]]:
    """Sentences/s and kept share of each variant over `batches`: rows alternate within every round,
    `warmup` untimed rounds first, median of `repeats` timed rounds."""
    sentences = sum(int(b["input_ids"].shape[0]) for b in batches)
    times: dict[str, list[float]] = {v.method: [] for v in variants}
    kept: dict[str, float] = {}
    rounds = warmup + repeats
    with tqdm(total=rounds * len(variants), desc="throughput", disable=not progress) as bar:
        for r in range(rounds):
            for v in variants:
                _, share, elapsed = run_batches(v.model, batches, v.trim)
                if r >= warmup:
                    times[v.method].append(elapsed)
                kept[v.method] = share
                bar.update(1)
    return {m: {"throughput": sentences / statistics.median(t), "kept_fraction": kept[m], "seconds": t}
            for m, t in times.items()}


def _peak_child(path: str, trim_options: dict | None, batch: dict, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    model, _ = load_classifier(path)
    with torch.inference_mode():
        run_batches(model, [batch], trim_options)                 # first call: lazy initialisation
        before = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")             # reset the peak (VmHWM) to now
        run_batches(model, [batch], trim_options)
        queue.put((_rss_kb("VmHWM") / 1024, (_rss_kb("VmHWM") - before) / 1024))


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory(variant: Variant, batch: dict[str, torch.Tensor], threads: int) -> tuple[float | None, float | None]:
    """(peak resident MB, MB above the resident memory after loading) of one forward of `batch`, in a fresh
    process (Linux only; (None, None) elsewhere)."""
    if not Path("/proc/self/clear_refs").exists():
        return None, None
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(variant.path, variant.trim, batch, threads, queue))
    proc.start()
    try:
        peak, extra = queue.get(timeout=600)
    finally:
        proc.join()
    return round(peak, 1), round(extra, 1)


# ---- the table ---------------------------------------------------------------------------------------
def run_glue(task: str, checkpoint: str | Path, baseline: str | Path | None = None, data: str | None = None,
             bench_inputs: list[str] | None = None, bench_count: int = 8, repeats: int = 3, warmup: int = 1,
             threads: int = 1, memory: bool = True, progress: bool = True,
             tsdtp_counts: list[str] | None = None, cls_only_last: bool = False) -> dict[str, Any]:
    """The table of `task`: rows for the fine-tuned model, generic pruning at TS-DTP's kept share, TS-DTP.

    `checkpoint` is a TS-DTP folder (or a plain fine-tuned one: then only its unpruned row); `baseline` the
    unpruned fine-tuned folder (default: the `init` the TS-DTP run started from). `bench_inputs` lists the
    dev inputs timed (default: the task's own); the first gives `throughput`, others
    `throughput_<task>` and `kept_fraction_<task>` columns. `tsdtp_counts` lists how TS-DTP turns its
    threshold into keep counts ("row", "batch"; default: the checkpoint's own): the first is the "tsdtp"
    row, whose kept share the generic row matches, each other one a "tsdtp-<mode>" row. `cls_only_last`
    runs the last layer's MLP on [CLS] alone in the pruned rows (the logits do not change) and adds a
    "finetuned-cls-only-last" row: the unpruned model with only that."""
    torch.set_num_threads(threads)
    checkpoint = Path(checkpoint)
    has_tsdtp = checkpoint_paths(checkpoint)[1].exists()
    if baseline is None:
        if not has_tsdtp:
            baseline = checkpoint
        else:
            record = _train_record(checkpoint)
            baseline = record.get("options", {}).get("init")
            if baseline is None:
                raise InputError(f"{checkpoint} was not started from a fine-tuned model: give --baseline DIR "
                                 "(the folder of the --no-prune run)")
    base_model, tokenizer = load_classifier(baseline)
    variants = [Variant("finetuned", base_model, None, str(baseline))]
    if has_tsdtp:
        ts_model, _ = load_classifier(checkpoint)
        for i, counts in enumerate(tsdtp_counts or [None]):
            name = "tsdtp" if i == 0 else f"tsdtp-{counts}"
            if any(v.method == name for v in variants):
                raise InputError(f"TS-DTP counts mode {counts!r} given twice")
            options = tsdtp_options(checkpoint, counts)
            if cls_only_last:
                options["cls_only_last"] = True
            variants.append(Variant(name, ts_model, options, str(checkpoint)))

    batches, labels = dev_batches(tokenizer, task, data)
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        preds, kept, _ = run_batches(v.model, batches, v.trim, progress, desc=f"{task} {v.method}")
        rows[v.method] = {"accuracy": float((preds == labels).float().mean()), "kept_fraction": kept}
        if v.trim is not None:
            rows[v.method]["counts"] = v.trim["tsdtp_counts"]
    if has_tsdtp:
        layers = variants[1].trim["layers"]
        lengths = [int(n) for b in batches for n in b["attention_mask"].sum(-1)]
        keep = matched_keep(lengths, layers, base_model.config.num_hidden_layers, rows["tsdtp"]["kept_fraction"],
                            cls_only_last)
        extra = {"cls_only_last": True} if cls_only_last else {}
        generic = Variant(GENERIC, load_classifier(baseline)[0],
                          {"method": GENERIC, "layers": layers, "keep": keep, **extra}, str(baseline))
        added = [generic]
        if cls_only_last:   # keep 1.0: nothing dropped but the last layer's MLP on [CLS] alone
            added.insert(0, Variant(CLS_ONLY_LAST, base_model,
                                    {"method": GENERIC, "layers": layers, "keep": 1.0, **extra}, str(baseline)))
        for i, v in enumerate(added):
            variants.insert(1 + i, v)
            preds, kept, _ = run_batches(v.model, batches, v.trim, progress, desc=f"{task} {v.method}")
            rows[v.method] = {"accuracy": float((preds == labels).float().mean()), "kept_fraction": kept,
                              "keep": v.trim["keep"]}

    inputs = bench_inputs or [task]
    for i, name in enumerate(inputs):
        timed = bench_batches(dev_batches(tokenizer, name, data)[0], bench_count)
        speed = time_variants(variants, timed, repeats, warmup, progress)
        full = speed["finetuned"]["throughput"]
        for method, s in speed.items():
            suffix = "" if i == 0 else f"_{name}"
            rows[method][f"throughput{suffix}"] = s["throughput"]
            rows[method][f"speedup{suffix}"] = s["throughput"] / full
            rows[method][f"bench_kept_fraction{suffix}"] = s["kept_fraction"]
        if i == 0 and memory:
            longest = timed[-1]
            for v in variants:
                rows[v.method]["peak_memory_mb"], rows[v.method]["peak_extra_mb"] = peak_memory(v, longest, threads)
    results = [{"task": task, "method": v.method, **rows[v.method], "model": v.path} for v in variants]
    return {"results": results,
            "settings": {"batch": BATCH, "bench_inputs": inputs, "cls_only_last": cls_only_last, "bench_batches": bench_count, "repeats": repeats,
                         "warmup": warmup, "threads": threads, "dev_examples": int(labels.numel()),
                         "checkpoint": str(checkpoint), "baseline": str(baseline)}}


def _train_record(checkpoint: Path) -> dict:
    path = checkpoint / "train.json"
    return json.loads(path.read_text()) if path.exists() else {}


def format_table(data: dict[str, Any]) -> str:
    """Markdown table of `run_glue`'s results."""
    rows = data["results"]
    extra = [k for k in rows[0] if k.startswith("throughput_")]
    head = ["task", "method", "accuracy", "kept share", "sentences/s", "speedup"]
    for k in extra:
        name = k[len("throughput_"):]
        head += [f"kept share ({name} inputs)", f"sentences/s ({name} inputs)", f"speedup ({name} inputs)"]
    head += ["peak memory MB", "above load MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["method"] + (f" (keep {r['keep']:.3f}/layer)" if r["method"] == GENERIC else "")
                 + (f" (counts: {r['counts']})" if "counts" in r else ""),
                 f"{100 * r['accuracy']:.2f}", f"{100 * r['kept_fraction']:.1f}%", f"{r['throughput']:.1f}",
                 f"{r['speedup']:.2f}x"]
        for k in extra:
            name = k[len("throughput_"):]
            cells += [f"{100 * r[f'bench_kept_fraction_{name}']:.1f}%", f"{r[k]:.1f}", f"{r[f'speedup_{name}']:.2f}x"]
        cells += [_mb(r.get("peak_memory_mb")), _mb(r.get("peak_extra_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
