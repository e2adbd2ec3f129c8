"""Benchmarks: full and trimmed runs in one process, alternating, after a warm-up; medians, with the
ratio the FLOPs alone would allow beside the measured one."""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from trimformer.api import stats, trim, untrim
from trimformer.config import TrimConfig
from trimformer.errors import InputError, ModelLoadError
from trimformer.ops.flops import decode_step_flops
from trimformer.generation import GreedyStream
from trimformer.mechanisms.kv_buffer import kv_bytes, use_in_place

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


@dataclass
class DecodeRow:
    method: str
    budget: float | int | None
    full_tokens_per_s: float          # the unpatched model, transformers' own DynamicCache
    trimmed_tokens_per_s: float
    speedup: float                    # trimmed / full
    full_kv_bytes: int
    trimmed_kv_bytes: int
    peak_rss_bytes: int
    full_in_place_tokens_per_s: float  # the unpatched model with the trimmed run's in-place cache layers
    speedup_vs_in_place: float         # trimmed / full_in_place: what eviction itself buys
    flop_ratio: float                  # full / trimmed FLOPs per decoded token (mean over the run)
    batch: int = 1                     # rows decoded together (tokens/s count every row)
    # the ceiling: the unpatched model with the in-place cache on the prompt's last `ceiling_prompt_length`
    # tokens, so that its cache averages as many slots as the trimmed run's; what eviction could give at
    # most, with no scoring, eviction or readmission work (None when the trimmed cache is not smaller)
    ceiling_tokens_per_s: float | None = None
    ceiling_speedup: float | None = None       # ceiling / full
    ceiling_prompt_length: int | None = None
    trimmed_mean_slots: float = 0.0            # cached slots a step attends to, mean over layers and steps
    ceiling_mean_slots: float | None = None


@dataclass
class DecodeRun:
    tokens_per_s: float
    kv_bytes: int          # memory the cache holds at the end (spare room of in-place layers included)
    mean_slots: list[float]  # (L,) cached slots each layer attended to, averaged over the steps


def decode_run(model, input_ids: torch.Tensor, new_tokens: int, in_place: bool = False) -> DecodeRun:
    """Prefill (untimed), then `new_tokens` timed greedy steps (eos ignored) of every row of `input_ids` (B, T);
    tokens/s counts all rows. `in_place` swaps the cache's layers for `InPlaceLayer`s after the prefill (a
    trimmed model that evicts does that itself)."""
    stream = GreedyStream(model, input_ids, new_tokens + 1, on_prefill=use_in_place if in_place else None,
                          time_steps=True)
    tokens = iter(stream)
    next(tokens)                                  # the prefill's token
    slots = [0] * len(stream.cache.layers)
    for _ in tokens:                              # each step's token; untimed bookkeeping for the FLOPs ratio
        for layer in range(len(slots)):
            slots[layer] += stream.cache.get_seq_length(layer)
    elapsed = sum(stream.step_s)
    return DecodeRun(input_ids.shape[0] * new_tokens / elapsed, kv_bytes(stream.cache), [s / new_tokens for s in slots])


def step_times(model, input_ids: torch.Tensor, steps: int, in_place: bool = False) -> list[float]:
    """Seconds of each of `steps` greedy decode steps (forward and argmax) after an untimed prefill of
    `input_ids` (B, T); `in_place` as in `decode_run`."""
    stream = GreedyStream(model, input_ids, steps + 1, on_prefill=use_in_place if in_place else None,
                          time_steps=True)
    for _ in stream:
        pass
    return stream.step_s


def ceiling_prompt_length(trimmed_mean_slots: float, new_tokens: int) -> int:
    """Prompt tokens whose cache averages `trimmed_mean_slots` slots over `new_tokens` steps (P + i slots
    after step i, as `decode_run` counts them), at least 1."""
    return max(1, round(trimmed_mean_slots - (new_tokens + 1) / 2))


def bench_decode(model, tokenizer, prompt_length: int, new_tokens: int, config: TrimConfig,
                 repeats: int = 2, warmup: int = 1, batch: int = 1, progress: bool = True) -> DecodeRow:
    """Decoding throughput in one process, alternating after a warm-up (medians): the unpatched model with
    transformers' cache, the unpatched model with in-place cache layers, the trimmed model, and the ceiling
    (the unpatched model, in-place cache, on a prompt cut to the trimmed run's mean cache size: what halving
    the cache gives with no eviction work). `batch` rows of `prompt_length` tokens each (needle prompts,
    the needle at a different depth in each row)."""
    if batch < 1:
        raise InputError(f"batch must be a positive number of rows, got {batch}")
    if new_tokens < 1:
        raise InputError(f"new_tokens must be at least 1, got {new_tokens}")
    depths = [(0.5 + 0.618 * row) % 1.0 for row in range(batch)]          # row 0 at the middle
    ids = torch.cat([make_needle(tokenizer, prompt_length, depth=d, seed=prompt_length + row).input_ids
                     for row, d in enumerate(depths)])                       # (batch, prompt_length)
    speeds: dict[str, list[float]] = {"full": [], "in_place": [], "trimmed": [], "ceiling": []}
    last: dict[str, DecodeRun] = {}
    ceiling_length = None
    for rep in tqdm(range(warmup + repeats), desc="bench decode", disable=not progress):
        steps = new_tokens if rep >= warmup else min(8, new_tokens)
        last["full"] = decode_run(model, ids, steps)
        last["in_place"] = decode_run(model, ids, steps, in_place=True)
        trim(model, config)
        try:
            last["trimmed"] = decode_run(model, ids, steps)
        finally:
            untrim(model)
        # the ceiling's prompt from this run's mean cache size (the warm-up's short run gives a rough one)
        ceiling_length = ceiling_prompt_length(statistics.mean(last["trimmed"].mean_slots), steps)
        last.pop("ceiling", None)
        if ceiling_length < prompt_length:
            last["ceiling"] = decode_run(model, ids[:, -ceiling_length:], steps, in_place=True)
        if rep >= warmup:
            for name, run in last.items():
                speeds[name].append(run.tokens_per_s)
    f, p, t = (statistics.median(speeds[name]) for name in ("full", "in_place", "trimmed"))
    c = statistics.median(speeds["ceiling"]) if speeds["ceiling"] else None
    flop_ratio = decode_step_flops(model.config, last["full"].mean_slots) / \
        decode_step_flops(model.config, last["trimmed"].mean_slots)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return DecodeRow(config.method, config.budget, f, t, t / f, last["full"].kv_bytes, last["trimmed"].kv_bytes,
                     peak, p, t / p, flop_ratio, batch,
                     ceiling_tokens_per_s=c, ceiling_speedup=c / f if c is not None else None,
                     ceiling_prompt_length=ceiling_length if c is not None else None,
                     trimmed_mean_slots=statistics.mean(last["trimmed"].mean_slots),
                     ceiling_mean_slots=statistics.mean(last["ceiling"].mean_slots) if c is not None else None)


def format_decode_table(rows: list[DecodeRow]) -> str:
    head = (f"{'method':>14} {'budget':>7} {'batch':>6} {'full tok/s':>11} {'in-place tok/s':>15} {'trimmed tok/s':>14} "
            f"{'speedup':>8} {'vs in-place':>12} {'ceiling tok/s':>14} {'ceiling':>8} {'flop ratio':>11} "
            f"{'KV full MB':>11} {'KV trimmed MB':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ceiling = (f"{r.ceiling_tokens_per_s:>14.2f} {r.ceiling_speedup:>7.2f}x" if r.ceiling_tokens_per_s is not None
                   else f"{'-':>14} {'-':>8}")
        lines.append(f"{r.method:>14} {str(r.budget):>7} {r.batch:>6} {r.full_tokens_per_s:>11.2f} {r.full_in_place_tokens_per_s:>15.2f} "
                     f"{r.trimmed_tokens_per_s:>14.2f} {r.speedup:>7.2f}x {r.speedup_vs_in_place:>11.2f}x {ceiling} "
                     f"{r.flop_ratio:>10.2f}x {r.full_kv_bytes / 1e6:>11.1f} {r.trimmed_kv_bytes / 1e6:>14.1f}")
    return "\n".join(lines)


# ---- ViT throughput (token merging) --------------------------------------------------------------
VIT_MODELS = {"vit-b16-random": "ViTForImageClassification, ViT-B/16 config at 224 px, random weights"}


@dataclass
class VitRow:
    model: str
    r: int
    full_images_per_s: float
    trimmed_images_per_s: float
    speedup: float
    flop_ratio: float


def vit_model(name: str, image_size: int = 224):
    """A ViT for throughput runs: ``vit-b16-random`` (ViT-B/16 config, random weights, no download) or
    a local folder holding a ViT / DeiT / CLIP-vision checkpoint."""
    if name == "vit-b16-random":
        torch.manual_seed(0)
        config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=image_size, patch_size=16, num_labels=1000)
        config._attn_implementation = "sdpa"
        return ViTForImageClassification(config).eval(), image_size
    if not Path(name).exists():
        raise ModelLoadError(f"unknown ViT model {name!r}: use one of {sorted(VIT_MODELS)} or a local folder")
    model = AutoModelForImageClassification.from_pretrained(name, attn_implementation="sdpa").eval()
    size = getattr(model.config, "image_size", image_size)
    return model, size if isinstance(size, int) else size[0]


@torch.inference_mode()
def _images_per_s(model, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    model(pixel_values=pixels)
    return pixels.shape[0] / (time.perf_counter() - start)


def bench_vit(model_name: str, batch: int, rs: list[int], repeats: int = 5, warmup: int = 2,
              config: dict | None = None, progress: bool = True) -> list[VitRow]:
    """Images/s of the full and the ToMe-merged model (r tokens per layer), in one process: after the
    warm-up, full and trimmed runs alternate; medians. flop_ratio is what the FLOPs alone would allow."""
    model, size = vit_model(model_name)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for r in rs:
        options = {"method": "tome", "r": r, **(config or {})}
        for _ in range(warmup):
            _images_per_s(model, pixels)
            trim(model, options)
            _images_per_s(model, pixels)
            untrim(model)
        full, trimmed = [], []
        ratio = 1.0
        for _ in tqdm(range(repeats), desc=f"r={r}", disable=not progress):
            full.append(_images_per_s(model, pixels))
            trim(model, options)
            trimmed.append(_images_per_s(model, pixels))
            ratio = stats(model)["flop_ratio"]
            untrim(model)
        f, t = statistics.median(full), statistics.median(trimmed)
        rows.append(VitRow(model_name, r, f, t, t / f, ratio))
    return rows


def format_vit_table(rows: list[VitRow]) -> str:
    lines = ["| model | r | full img/s | trimmed img/s | speedup | flop ratio | speedup / flop ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.model} | {row.r} | {row.full_images_per_s:.2f} | {row.trimmed_images_per_s:.2f} | "
                     f"{row.speedup:.2f}x | {row.flop_ratio:.2f}x | {row.speedup / row.flop_ratio:.2f} |")
    return "\n".join(lines)
