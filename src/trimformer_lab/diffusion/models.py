"""Denoisers to benchmark: published configs with random weights (no download), tiny ones for tests, or a
local folder; and the inputs of one denoising step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from trimformer.errors import InputError, ModelLoadError

VAE_SCALE = 8          # pixels per latent cell of the SD / PixArt VAE
TEXT_TOKENS = {UNet2DConditionModel: 77, PixArtTransformer2DModel: 120}   # CLIP / T5 prompt lengths

# runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json
PIXART_ALPHA_1024 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=True, caption_channels=4096,
)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8,
)

# inner dim 24 = 2 heads x 12: divisible by 3, as the resolution / aspect-ratio embeddings need
TINY_PIXART = dict(
    num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
    cross_attention_dim=24, sample_size=8, patch_size=2, use_additional_conditions=True, caption_channels=32,
)

MODELS: dict[str, tuple[type, dict]] = {
    "sd15-unet-random": (UNet2DConditionModel, SD15_UNET),
    "pixart-alpha-1024-random": (PixArtTransformer2DModel, PIXART_ALPHA_1024),
    "tiny-unet-random": (UNet2DConditionModel, TINY_UNET),
    "tiny-pixart-random": (PixArtTransformer2DModel, TINY_PIXART),
}

CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "PixArtTransformer2DModel": PixArtTransformer2DModel}


def load_denoiser(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A denoiser in eval mode: a name of `MODELS` (random weights, seed 0), a saved denoiser folder, or a
    pipeline folder (its `unet/` or `transformer/` subfolder)."""
    if name not in MODELS:
        return _from_folder(Path(name), dtype).to(device).eval()
    cls, config = MODELS[name]
    torch.manual_seed(0)
    model = cls(**config)
    # nn.Module's own cast: diffusers' `to` warns on any dtype, even with no module to keep in float32 (none here)
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


def _from_folder(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    if not path.is_dir():
        raise ModelLoadError(f"unknown denoiser {str(path)!r}: use one of {sorted(MODELS)} or a local folder")
    for sub in ("unet", "transformer"):
        if (path / sub / "config.json").exists():
            path = path / sub
            break
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} holds no config.json (nor unet/ or transformer/ with one)")
    config = json.loads((path / "config.json").read_text())
    class_name = config.get("_class_name")
    if class_name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        class_name = "PixArtTransformer2DModel"          # PixArt-alpha's published folders name the generic class
    if class_name not in CLASSES:
        raise ModelLoadError(f"{path} holds a {class_name}; supported: {sorted(CLASSES)}")
    return CLASSES[class_name].from_pretrained(path, torch_dtype=dtype)


def step_inputs(denoiser: torch.nn.Module, resolution: int, batch: int = 2, timestep: int = 500,
                seed: int = 0) -> dict:
    """Keyword arguments of the denoiser for one denoising step on `batch` images of `resolution` x
    `resolution` pixels (batch 2: one image with classifier-free guidance), random and seeded, on the
    denoiser's device and dtype."""
    cls = type(denoiser)
    if cls not in TEXT_TOKENS:
        raise InputError(f"no step inputs for a {cls.__name__}; supported: {[c.__name__ for c in TEXT_TOKENS]}")
    config = denoiser.config
    grid = VAE_SCALE * getattr(config, "patch_size", 1)
    if resolution < grid or resolution % grid:
        raise InputError(f"resolution must be a positive multiple of {grid} pixels for a {cls.__name__}, "
                         f"got {resolution}")
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    side = resolution // VAE_SCALE
    text_dim = config.cross_attention_dim if cls is UNet2DConditionModel else config.caption_channels
    param = next(denoiser.parameters())
    latents = torch.randn(batch, config.in_channels, side, side, generator=gen)              # (B, 4, H/8, W/8)
    text = torch.randn(batch, TEXT_TOKENS[cls], text_dim, generator=gen)                     # (B, T, D)
    inputs = {"encoder_hidden_states": text.to(param), "timestep": torch.full((batch,), timestep, device=param.device),
              "return_dict": False}
    if cls is UNet2DConditionModel:
        return {"sample": latents.to(param), **inputs}
    conditions = {"resolution": None, "aspect_ratio": None}
    if denoiser.use_additional_conditions:
        conditions = {"resolution": torch.tensor([[resolution, resolution]] * batch).to(param),        # (B, 2)
                      "aspect_ratio": torch.ones(batch, 1).to(param)}                                   # (B, 1)
    return {"hidden_states": latents.to(param), "added_cond_kwargs": conditions, **inputs}


def noise_prediction(denoiser: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The predicted noise (B, C, H/8, W/8) of one step: the first `in_channels` output channels (PixArt's
    other channels are the learned variance)."""
    out = denoiser(**inputs)[0]                        # (B, C_out, H/8, W/8)
    return out[:, : denoiser.config.in_channels]
