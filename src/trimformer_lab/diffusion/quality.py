"""Image quality of a merged pipeline against the same pipeline unmerged, on the same prompts and seeds.

Always: seconds per image of each and the PSNR of every merged image against its unmerged twin (no
weights needed). With torchmetrics (``pip install "torchmetrics[image,multimodal]"``, which fetches its
Inception and CLIP weights from the hub): the CLIP score of each set and the FID of the merged set against
the unmerged set. These need a pretrained pipeline; on random weights they say nothing about images.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trimformer import trim, untrim

PROMPTS = [f"a photo of a {name}" for name in (
    "goldfish", "tree frog", "bald eagle", "red fox", "golden retriever", "tabby cat", "zebra", "monarch butterfly",
    "lighthouse", "steam locomotive", "grand piano", "pizza", "strawberry", "volcano", "sailboat", "castle")]


def _images(pipe, prompts: list[str], steps: int, size: int, seed: int, progress: bool, label: str):
    """(N, H, W, 3) floats in [0, 1] and the seconds each image took."""
    images, seconds = [], []
    for i, prompt in enumerate(tqdm(prompts, desc=label, disable=not progress)):
        start = time.perf_counter()
        out = pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type="np",
                   generator=torch.Generator().manual_seed(seed + i))
        seconds.append(time.perf_counter() - start)
        images.append(out.images[0])
    return np.stack(images), seconds


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(pipe, reduction_ratio: float = 0.5, prompts: list[str] | None = None, steps: int = 50, size: int = 512,
            seed: int = 0, clip_model: str | None = None, fid: bool = False, progress: bool = True,
            **trim_options: Any) -> dict:
    """Generate `prompts` unmerged and merged (``trim(pipe, method="tome", reduction_ratio=...)``) with the
    same seeds; return timings, per-image PSNR and, when asked, CLIP scores and FID. `pipe` is left untrimmed."""
    prompts = prompts or PROMPTS
    full, full_s = _images(pipe, prompts, steps, size, seed, progress, "unmerged")
    trim(pipe, method="tome", reduction_ratio=reduction_ratio, **trim_options)
    try:
        merged, merged_s = _images(pipe, prompts, steps, size, seed, progress, "merged")
    finally:
        untrim(pipe)
    values = [psnr(m, f) for m, f in zip(merged, full)]
    result = {"reduction_ratio": reduction_ratio, "steps": steps, "size": size, "images": len(prompts),
              "trim_options": {k: list(v) if isinstance(v, tuple) else v for k, v in trim_options.items()},
              "full_s_per_image": float(np.median(full_s)), "merged_s_per_image": float(np.median(merged_s)),
              "speedup": float(np.median(full_s) / np.median(merged_s)), "psnr_db": values,
              "mean_psnr_db": float(np.mean(values))}
    if clip_model or fid:
        result.update(_torchmetrics_scores(full, merged, prompts, clip_model, fid))
    return result


def _torchmetrics_scores(full: np.ndarray, merged: np.ndarray, prompts: list[str], clip_model: str | None,
                         fid: bool) -> dict:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as exc:
        raise ImportError('CLIP score and FID need torchmetrics: pip install "torchmetrics[image,multimodal]"') from exc

    def uint8(images: np.ndarray) -> torch.Tensor:                       # (N, 3, H, W) uint8
        return torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)

    out = {}
    if clip_model:
        for name, images in (("clip_score_full", full), ("clip_score_merged", merged)):
            metric = CLIPScore(model_name_or_path=clip_model)
            metric.update(uint8(images), prompts)
            out[name] = float(metric.compute())
    if fid:
        metric = FrechetInceptionDistance(feature=2048)
        metric.update(uint8(full), real=True)
        metric.update(uint8(merged), real=False)
        out["fid_merged_vs_full"] = float(metric.compute())
    return out
