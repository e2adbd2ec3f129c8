"""Adapters, one file per model family, and the choice of the adapter for a model."""

from __future__ import annotations

import torch

from ..config import TrimConfig
from ..errors import UnsupportedModelError
from ..presets import preset_for
from ..registry import Method, methods_for
from .base import Patch
from .bert import BertPatch
from .clip import ClipPatch
from .llama import LlamaPatch
from .marian import MarianPatch
from .vit import ViTPatch

# the first that matches takes the model (decoders last: their check is the broadest)
ADAPTERS: tuple[type[Patch], ...] = (BertPatch, ViTPatch, ClipPatch, MarianPatch, LlamaPatch)


def adapter_for(model: torch.nn.Module) -> type[Patch]:
    """The adapter class that takes `model`, or `UnsupportedModelError` naming what is supported."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    supported = "; ".join(f"{a.kind}s: {', '.join(a.architectures)}" for a in ADAPTERS)
    raise UnsupportedModelError(f"trimformer has no adapter for {type(model).__name__}; supported {supported}")


def build_patch(model: torch.nn.Module, config: TrimConfig, method: Method) -> Patch:
    """The (not yet installed) patch that applies `method` with `config` to `model`."""
    adapter = adapter_for(model)
    if adapter.kind not in method.applies_to:
        runs_on = "; ".join(f"{a.kind}s: {', '.join(a.architectures)}" for a in ADAPTERS if a.kind in method.applies_to)
        raise UnsupportedModelError(
            f"method {method.name!r} runs on {runs_on}; {type(model).__name__} is a {adapter.kind}, where the "
            f"methods are: {', '.join(methods_for(adapter.kind))}"
        )
    layers = adapter.layers(model)
    plan = config.resolve_schedule(len(layers), preset_for(model.config)) if method.prunes_prefill else {}
    return adapter(model, config, method, plan)


__all__ = ["ADAPTERS", "Patch", "adapter_for", "build_patch"]
