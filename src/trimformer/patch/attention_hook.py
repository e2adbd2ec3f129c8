"""The one place trimformer touches transformers' attention dispatch.

A model's attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``. Trimming
switches the config to ``"trimformer_<original>"``: a wrapper that runs the original kernel (SDPA,
eager, ...) unchanged and, when the layer was handed a `Probe` through its keyword arguments, also
scores tokens from the query and key tensors the layer already computed. A probe that can also compute
the attention output (`Probe.attend`, a single decoding query) replaces the kernel for that call, so
scoring costs no second pass over the keys.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..mechanisms.probe import Probe

PREFIX = "trimformer_"
PROBE_KWARG = "trimformer_probe"


def _plain_softmax(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> bool:
    """True when the layer's attention is a plain softmax over its keys for one query: no dropout, sliding
    window, logit soft-capping or attention sinks (the cases `Probe.attend` may replace the kernel in)."""
    dropout = kwargs.get("dropout", 0.0)
    return (
        query.shape[2] == 1
        and not (module.training and dropout)
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and getattr(module, "sliding_window", None) is None
    )


def _wrap(original: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        probe: Probe | None = kwargs.pop(PROBE_KWARG, None)
        if probe is not None and probe.attend is not None and _plain_softmax(module, query, kwargs):
            with torch.no_grad():
                output, probe.scores = probe.attend(query, key, value, module.scaling)
            return output, None
        if probe is not None:
            with torch.no_grad():
                probe.capture(module, query, key)
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(original, _eager())
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{PREFIX}{original}"
    return attention


@functools.cache
def _eager() -> Callable:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def original_kernel(name: str | None) -> str:
    """The attention implementation under a (possibly already wrapped) name."""
    name = name or "eager"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def wrapped_name(original: str | None) -> str:
    """Register (once) and return the name of the wrapper around attention implementation `original`."""
    original = original_kernel(original)
    name = f"{PREFIX}{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrap(original))
    return name
