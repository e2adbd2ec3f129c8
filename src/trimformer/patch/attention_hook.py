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
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

PREFIX = "trimformer_"
PROBE_KWARG = "trimformer_probe"


@dataclass
class Probe:
    """A request to score tokens at one layer; the attention wrapper fills `scores`."""

    scorer: Callable[..., torch.Tensor] | None   # (query, key, scaling) -> (B, K) scores, or None
    query_index: torch.Tensor | None      # (B, W) which query rows of each batch row to score with
    scores: torch.Tensor | None = None    # (B, K) filled by the wrapper
    keep_keys: bool = False               # also keep the layer's keys (for a scorer that reads them)
    keys: torch.Tensor | None = None      # (B, Hkv, K, hd) post-RoPE keys, filled when `keep_keys`
    extra: dict | None = None             # anything else a scorer keeps (e.g. the query, for readmission)
    # (query, key, value, scaling) -> (output (B, 1, H, hd), scores (B, K)): the layer's attention output
    # and the scores from one softmax, for a single query; used instead of the kernel where that is exact
    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def capture(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        # query: (B, H, Q, hd), key: (B, Hkv, K, hd), both post-RoPE, key includes the cache
        if self.keep_keys:
            self.keys = key
        if self.scorer is None:
            return
        b, h, _, hd = query.shape
        index = self.query_index[:, None, :, None].expand(b, h, -1, hd)
        self.scores = self.scorer(query.gather(2, index), key, module.scaling)


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
