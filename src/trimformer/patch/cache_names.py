"""The KV cache's keyword across transformers releases.

transformers 5.24 renamed the cache argument of models and layers from ``past_key_values`` to ``cache``
(the old name still works at the model level, with a deprecation warning, until 5.40), and model outputs
carry it as ``.cache``. Hooks see the keywords exactly as the caller passed them, so they read both names;
trimformer's own calls pass the name the installed release expects.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version

CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
_NAMES = ("cache", "past_key_values")


def cache_from(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a forward's keyword arguments under either name, or None."""
    for name in _NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name the installed transformers expects."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model output returned (``.cache`` from 5.24 on, ``.past_key_values`` before), or None."""
    for name in _NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def drop_cache_kwargs(kwargs: dict[str, Any]) -> None:
    """Remove the cache keyword under either name (for layers that must run without one)."""
    for name in _NAMES:
        kwargs.pop(name, None)


def keep_every_slot(cache: Any, windows: list[int | None]) -> None:
    """Give each sliding-window layer of an empty dynamic cache a full layer instead: a pruned prompt's slots
    no longer lie one position apart, so the window is applied by original position in the attention mask,
    and trimformer's record of which slot holds which position stays valid (a sliding layer drops slots by
    count). Layers already holding tokens, and other cache types, are left as they are."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for index, window in enumerate(windows):
        if window is not None and index < len(layers):
            layer = layers[index]
            if isinstance(layer, DynamicSlidingWindowLayer) and not layer.is_initialized:
                layers[index] = DynamicLayer()
