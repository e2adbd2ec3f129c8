"""Benchmarks: full and trimmed runs in one process, alternating, after a warm-up; medians, with the
ratio the FLOPs alone would allow beside the measured one."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .api import stats, trim, untrim
from .config import TrimConfig
from .evaluation.needle import make_needle


@dataclass
class PrefillRow:
    length: int
    method: str
    full_ttft_s: float
    trimmed_ttft_s: float
    speedup: float
    kept_fraction: float
    flop_ratio: float


@torch.inference_mode()
def time_to_first_token(model, input_ids: torch.Tensor) -> float:
    """Seconds for the prefill forward (with cache, as generation does) and the first greedy token."""
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    out.logits[:, -1].argmax(-1)
    return time.perf_counter() - start


def bench_prefill(
    model,
    tokenizer,
    lengths: list[int],
    config: TrimConfig,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = True,
) -> list[PrefillRow]:
    """Full vs trimmed TTFT on real text (a PG-essay needle prompt) at each length."""
    rows: list[PrefillRow] = []
    bar = tqdm(total=len(lengths) * (repeats + warmup) * 2, desc="bench prefill", disable=not progress)
    for length in lengths:
        ids = make_needle(tokenizer, length, depth=0.5, seed=length).input_ids
        full, trimmed = [], []
        kept = flop_ratio = None
        for rep in range(warmup + repeats):
            t_full = time_to_first_token(model, ids)
            bar.update()
            trim(model, config)
            t_trim = time_to_first_token(model, ids)
            info = stats(model)
            untrim(model)
            bar.update()
            kept, flop_ratio = info["kept_fraction"], info["flop_ratio"]
            if rep >= warmup:
                full.append(t_full)
                trimmed.append(t_trim)
        f, t = statistics.median(full), statistics.median(trimmed)
        rows.append(PrefillRow(length, config.method, f, t, f / t, kept, flop_ratio))
    bar.close()
    return rows


def format_table(rows: list[PrefillRow]) -> str:
    head = f"{'length':>7} {'method':>9} {'full s':>8} {'trimmed s':>10} {'speedup':>8} {'flop ratio':>10} {'speedup/flop':>12} {'kept':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.length:>7} {r.method:>9} {r.full_ttft_s:>8.3f} {r.trimmed_ttft_s:>10.3f} {r.speedup:>7.2f}x "
            f"{r.flop_ratio:>9.2f}x {r.speedup / r.flop_ratio:>12.2f} {r.kept_fraction:>6.1%}"
        )
    return "\n".join(lines)


def write_json(rows, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"results": [asdict(r) for r in rows]}, indent=2) + "\n")
