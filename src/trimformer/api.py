"""The public entry points: `trim`, `untrim`, `stats`, `is_trimmed`."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrimConfig
from .errors import TrimformerError
from .patch import Patch, build_patch
from .patch.diffusion import denoiser_of
from .registry import resolve

PATCH_ATTR = "_trimformer_patch"


def trim(model: torch.nn.Module, config: TrimConfig | dict | str | None = None, /, **options: Any) -> torch.nn.Module:
    """Patch `model` in place so its forward prunes, evicts or merges tokens layer by layer; return it.

    ``trim(model, method="lazy", keep=0.5)``, ``trim(model, TrimConfig(...))`` or
    ``trim(model, {"method": "lazy", "reduction_ratio": 0.5, "adaptive": True})``.
    A diffusers pipeline is trimmed through its denoiser (``pipe.unet`` or ``pipe.transformer``) and
    returned. On any error the model is left exactly as it was.
    """
    given, model = model, denoiser_of(model)
    cfg = TrimConfig.coerce(config, options)
    cfg.validate()
    patch = build_patch(model, cfg, resolve(cfg))
    previous = getattr(model, PATCH_ATTR, None)
    if previous is not None:
        untrim(model)
    try:
        patch.install()
    except Exception:
        if previous is not None:                 # a re-trim that fails leaves the previous trim in place
            previous.install()
            setattr(model, PATCH_ATTR, previous)
        raise
    setattr(model, PATCH_ATTR, patch)
    return given


def untrim(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every trimformer hook and setting: the model behaves exactly as before `trim`."""
    given, model = model, denoiser_of(model)
    _patch(model).remove()
    delattr(model, PATCH_ATTR)
    return given


def is_trimmed(model: torch.nn.Module) -> bool:
    return getattr(denoiser_of(model), PATCH_ATTR, None) is not None


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the last forward kept, per layer and overall.

    Decoders: ``method``, ``schedule``, ``prompt_tokens`` (per row), ``kept_tokens_per_layer`` (summed
    over rows), ``kept_fraction`` (share of token-layer computations done), ``revived_per_layer``,
    ``revived``, ``waiting_in_aux``, ``dropped_for_good``, ``decode_steps``, ``flops_full``,
    ``flops_trimmed``, ``flop_ratio`` (full / trimmed), ``kv_bytes``, and with eviction its counters.
    Encoders describe their own forward (tokens per layer, merged, dropped, FLOPs); diffusion models
    (or their pipelines) the last denoiser forward: tokens and merges per transformer block, ``kept_fraction``
    and the blocks' analytic FLOPs.
    """
    return _patch(denoiser_of(model)).stats()


def _patch(model: torch.nn.Module) -> Patch:
    patch = getattr(model, PATCH_ATTR, None)
    if patch is None:
        raise TrimformerError("this model is not trimmed; call trim(model, ...) first")
    return patch
