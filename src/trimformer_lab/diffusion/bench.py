"""One denoising step of a diffusion denoiser, full against ToMe-merged, in one process: per resolution a
measured warm-up round (FLOPs, peak memory, noise prediction of each), then full and trimmed steps
alternating; medians."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from trimformer.api import trim, untrim
from trimformer.errors import ConfigError, InputError

from .measure import Cost, measure
from .models import load_denoiser, noise_prediction, step_inputs

PARTS = ("self_attention", "cross_attention", "mlp")


@dataclass
class DiffusionRow:
    model: str
    resolution: int            # pixels per side
    reduction_ratio: float
    full_s: float              # one denoising step, median
    trimmed_s: float
    speedup: float             # full_s / trimmed_s
    flop_ratio: float          # full / trimmed FLOPs of the whole forward, counted
    full_peak_bytes: int       # on top of what was allocated before the step (weights and inputs excluded)
    trimmed_peak_bytes: int
    settings: dict             # the other trim options: merge_parts, max_downsample
    rel_error: float           # ||eps_trimmed - eps_full|| / ||eps_full|| on the same inputs


@dataclass(frozen=True)
class Variant:
    reduction_ratio: float
    merge_parts: tuple[str, ...]
    max_downsample: int

    def options(self) -> dict:
        return {"method": "tome", "reduction_ratio": self.reduction_ratio, "max_downsample": self.max_downsample,
                "merge_parts": self.merge_parts}


def parse_parts(text: str) -> list[tuple[str, ...]]:
    """'self_attention;self_attention,mlp' -> [('self_attention',), ('self_attention', 'mlp')]."""
    sets = [tuple(p.strip() for p in group.split(",") if p.strip()) for group in text.split(";") if group.strip()]
    unknown = sorted({p for parts in sets for p in parts} - set(PARTS))
    if not sets or unknown:
        raise ConfigError(f"parts take ';'-separated sets of comma-separated {', '.join(PARTS)}; got {text!r}")
    return sets


@contextmanager
def trimmed(denoiser: torch.nn.Module, options: dict) -> Iterator[None]:
    trim(denoiser, options)
    try:
        yield
    finally:
        untrim(denoiser)


@torch.inference_mode()
def _predict(denoiser: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return noise_prediction(denoiser, inputs)


def _step_seconds(denoiser: torch.nn.Module, inputs: dict, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _predict(denoiser, inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rel_error(eps: torch.Tensor, reference: torch.Tensor) -> float:
    return ((eps.float() - reference.float()).norm() / reference.float().norm()).item()


def bench_diffusion(model_name: str, resolutions: list[int], reduction_ratios: list[float],
                    parts: Sequence[tuple[str, ...]] = (("self_attention",),), max_downsample: Sequence[int] = (1,),
                    batch: int = 2, repeats: int = 3, warmup: int = 1, threads: int | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32,
                    progress: bool = True) -> list[DiffusionRow]:
    """Seconds per denoising step of `model_name` (see `models.MODELS`) on `batch` latents per resolution,
    full and merged with every combination of `reduction_ratios`, `parts` and `max_downsample`. The
    first of the `warmup` rounds (one at least) measures FLOPs, peak memory and each noise prediction;
    then each of the `repeats` rounds times the full step and every trimmed one."""
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    warm = max(warmup, 1) - 1            # untimed rounds after the measured one
    if threads:
        torch.set_num_threads(threads)
    denoiser = load_denoiser(model_name, device, dtype)
    dev = next(denoiser.parameters()).device
    variants = [Variant(r, p, d) for p in parts for d in max_downsample for r in reduction_ratios]
    for v in variants:                   # a bad option fails here, before any forward
        with trimmed(denoiser, v.options()):
            pass
    rows = []
    for resolution in resolutions:
        inputs = step_inputs(denoiser, resolution, batch)
        bar = tqdm(total=(1 + warm + repeats) * (1 + len(variants)), desc=f"bench diffusion {resolution}px",
                   disable=not progress)
        eps_full, full_cost = measure(lambda: _predict(denoiser, inputs), dev)
        bar.update()
        measured: list[tuple[torch.Tensor, Cost]] = []
        for v in variants:
            with trimmed(denoiser, v.options()):
                measured.append(measure(lambda: _predict(denoiser, inputs), dev))
            bar.update()
        full_s: list[float] = []
        trimmed_s: list[list[float]] = [[] for _ in variants]
        for _ in range(warm + repeats):
            full_s.append(_step_seconds(denoiser, inputs, dev))
            bar.update()
            for v, times in zip(variants, trimmed_s):
                with trimmed(denoiser, v.options()):
                    times.append(_step_seconds(denoiser, inputs, dev))
                bar.update()
        bar.close()
        f = statistics.median(full_s[warm:])
        for v, times, (eps, cost) in zip(variants, trimmed_s, measured):
            t = statistics.median(times[warm:])
            rows.append(DiffusionRow(model_name, resolution, v.reduction_ratio, f, t, f / t,
                                     full_cost.flops / cost.flops, full_cost.peak_bytes, cost.peak_bytes,
                                     {"merge_parts": list(v.merge_parts), "max_downsample": v.max_downsample},
                                     _rel_error(eps, eps_full)))
    return rows


def format_table(rows: list[DiffusionRow]) -> str:
    """A Markdown table of the rows (peak memory in MB)."""
    lines = ["| model | px | reduction | merge parts | max downsample | full s | trimmed s | speedup | flop ratio | "
             "speedup / flop ratio | peak MB full | peak MB trimmed | rel error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.resolution} | {r.reduction_ratio:g} | {'+'.join(r.settings['merge_parts'])} | "
                     f"{r.settings['max_downsample']} | {r.full_s:.3f} | {r.trimmed_s:.3f} | {r.speedup:.2f}x | "
                     f"{r.flop_ratio:.2f}x | {r.speedup / r.flop_ratio:.2f} | {r.full_peak_bytes / 1e6:.1f} | "
                     f"{r.trimmed_peak_bytes / 1e6:.1f} | {r.rel_error:.4f} |")
    return "\n".join(lines)
