"""A tiny random Stable Diffusion pipeline (no download) and the drift of its final latents under merging.

`tiny_pipeline()` assembles a real `StableDiffusionPipeline` from tiny random parts: a U-Net with one
cross-attention level, a two-level VAE, a two-layer CLIP text encoder and a character-level CLIP tokenizer
written to a temporary folder. It runs every step a pretrained pipeline runs (text encoding, classifier-free
guidance, the scheduler's loop, VAE decoding) in milliseconds, so tests and `latent_drift` exercise the
whole path; `save_pretrained` / `DiffusionPipeline.from_pretrained` work on it as on a downloaded one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from trimformer import stats, trim, untrim


# the U-Net of the tiny pipeline: one cross-attention level (16 x 16 latent tokens at 32 px), 8 x 4-dim heads
TINY_SD_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) maps the bytes to."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(kept), 0
    for b in range(256):
        if b not in kept:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def char_tokenizer(folder: str | Path, max_length: int = 32):
    """A CLIP tokenizer whose vocabulary is every byte character, alone or ending a word (no merges)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_characters()
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars]
                                               + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tiny_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` of tiny random parts; 32 x 32 images (16 x 16 latents, 256 tokens at the
    U-Net's first level)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_tokenizer(tempfile.mkdtemp(prefix="trimformer-tokenizer-"))
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**TINY_SD_UNET)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_latents(pipe, prompt: str = "a red cube on a table", steps: int = 10, seed: int = 0,
                   size: int = 32) -> torch.Tensor:
    """The final latents (B, 4, size/8', size/8') of one seeded sampling run."""
    out = pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type="latent",
               generator=torch.Generator().manual_seed(seed))
    return out.images


def latent_drift(pipe, ratios: list[float], steps: int = 10, seeds: int = 4, **trim_options: Any) -> list[dict]:
    """For each reduction ratio: the relative L2 distance of the final latents from the unmerged run's,
    per seed and their mean, with the merged blocks' FLOP ratio. The pipeline is left untrimmed."""
    rows = []
    full = [sample_latents(pipe, steps=steps, seed=s) for s in range(seeds)]
    for ratio in ratios:
        trim(pipe, method="tome", reduction_ratio=ratio, **trim_options)
        try:
            merged = [sample_latents(pipe, steps=steps, seed=s) for s in range(seeds)]
            flop_ratio = stats(pipe)["flop_ratio"]
        finally:
            untrim(pipe)
        drift = [float((m - f).norm() / f.norm()) for m, f in zip(merged, full)]
        rows.append({"reduction_ratio": ratio, "steps": steps, "drift": drift, "mean_drift": sum(drift) / len(drift),
                     "block_flop_ratio": flop_ratio, **{k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in trim_options.items()}})
    return rows
