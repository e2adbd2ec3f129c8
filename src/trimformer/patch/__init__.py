"""Adapters, one file per model family, and the choice of the adapter for a model."""

from __future__ import annotations

import torch

from ..config import TrimConfig
from ..errors import ConfigError, UnsupportedMethodError, UnsupportedModelError
from ..presets import preset_for
from ..registry import Method, methods_for
from .base import Patch
from .bert import BertPatch
from .clip import ClipPatch
from .diffusion import DiffusionPatch
from .gemma3 import Gemma3Patch
from .llama import LlamaPatch
from .marian import MarianPatch
from .vit import ViTPatch

# the first that matches takes the model (decoders last: their check is the broadest)
ADAPTERS: tuple[type[Patch], ...] = (BertPatch, ViTPatch, ClipPatch, MarianPatch, DiffusionPatch, Gemma3Patch,
                                     LlamaPatch)


def adapter_for(model: torch.nn.Module) -> type[Patch]:
    """The adapter class that takes `model`, or `UnsupportedModelError` naming what is supported."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(f"trimformer has no adapter for {type(model).__name__}; supported {_supported()}")


def build_patch(model: torch.nn.Module, config: TrimConfig, method: Method) -> Patch:
    """The (not yet installed) patch that applies `method` with `config` to `model`."""
    adapter = adapter_for(model)
    if adapter.kind not in method.applies_to:
        raise UnsupportedMethodError(
            f"method {method.name!r} runs on {_supported(method.applies_to)}; {type(model).__name__} is "
            f"{_KIND_NAMES[adapter.kind]}, whose methods are: {', '.join(methods_for(adapter.kind))}"
        )
    return adapter(model, config, method, prefill_plan(model, config, method, adapter))


def prefill_plan(model: torch.nn.Module, config: TrimConfig, method: Method,
                 adapter: type[Patch] | None = None) -> dict[int, float]:
    """The {layer: keep} schedule `method` prunes `model` with: the user's `schedule` or `layers`, else (for
    a decoder) the model's preset, else the depth-fraction fallback; {} for a method that prunes no prompt."""
    adapter = adapter or adapter_for(model)
    if config.preset is not None and adapter.kind != "decoder":
        raise ConfigError(f"preset={config.preset!r}: presets are decoder schedules; {type(model).__name__} is "
                          f"{_KIND_NAMES[adapter.kind]} (give its layers, keep or r instead)")
    if not method.prunes_prefill:
        return {}
    given = config.prune.schedule is not None or config.prune.layers is not None   # the user's layers win
    measured = adapter.kind == "decoder" and not given              # presets are measured for decoders
    preset = preset_for(model.config, config.preset) if measured else None
    return config.resolve_schedule(len(adapter.layers(model)), preset)


_KIND_NAMES = {"decoder": "a decoder", "encoder": "an encoder", "seq2seq": "an encoder-decoder",
               "diffusion": "a diffusion model"}
_KIND_PLURALS = {"decoder": "decoders", "encoder": "encoders", "seq2seq": "encoder-decoders",
                 "diffusion": "diffusion models"}


def _supported(kinds: frozenset[str] | None = None) -> str:
    """"decoders (LlamaForCausalLM, ...); encoders (...)": the architectures of the adapters of `kinds`."""
    groups: dict[str, list[str]] = {}
    for adapter in ADAPTERS:
        if kinds is None or adapter.kind in kinds:
            groups.setdefault(adapter.kind, []).extend(adapter.architectures)
    return "; ".join(f"{_KIND_PLURALS[kind]} ({', '.join(names)})" for kind, names in groups.items())


__all__ = ["ADAPTERS", "Patch", "adapter_for", "build_patch", "prefill_plan"]
