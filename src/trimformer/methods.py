"""The registry of pruning methods: each names a scorer and its defaults.

A method's scorer turns a `ScoreInputs` into (B, K) importances; the per-layer machinery (where to
prune, how to gather, the aux cache, revival) is shared by all methods and lives in `models/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import ConfigError
from .scoring import head_tail_scores, last_query_attention, random_scores, recency_scores
from .scoring.learned import setup_sdtp
from .tsdtp import setup_tsdtp


@dataclass
class ScoreInputs:
    """Everything a scorer may read at a pruning stage (prefill), for the current live tokens."""

    layer: int
    positions: torch.Tensor       # (B, K) original positions of the live tokens
    valid: torch.Tensor           # (B, K) bool
    lengths: torch.Tensor         # (B,) real prompt length of each row
    hidden: torch.Tensor          # (B, K, D) output of the layer
    attention: torch.Tensor | None  # (B, K) pooled attention of the window queries, if the method asked
    seed: int


Scorer = Callable[[ScoreInputs], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    score: Scorer | None       # a fixed scorer, or None when `setup` builds one per trim
    needs_attention: bool      # ask the layer's attention wrapper for window-query scores
    revive_default: bool       # bring tokens back while decoding unless the config says otherwise
    span_pool: bool            # apply the config's span max-pooling to the scores
    setup: Callable[..., Scorer] | None = None  # (config, model, plan) -> scorer, for methods with state
                                                # (a learned pruner); may raise ConfigError
    prunes_prefill: bool = True  # drops prompt tokens at the schedule's layers
    evicts: bool = False         # evicts KV entries while decoding, with a shadow set (runtime pruning)

    def build_scorer(self, config, model, plan) -> Scorer:
        return self.setup(config, model, plan) if self.setup is not None else self.score


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method, or ``"<prefill method>+runtime"``: prefill pruning, then decode-time eviction
    (the prefill method's own revival is then off; the shadow set brings tokens back instead)."""
    if isinstance(name, str) and name.endswith("+runtime") and name != "runtime":
        prefill = get_method(name[: -len("+runtime")])
        if not prefill.prunes_prefill:
            raise ConfigError(f"{prefill.name!r} does not prune the prompt, so it cannot come before +runtime")
        return dataclasses.replace(prefill, name=name, evicts=True, revive_default=False)
    if name not in METHODS:
        accepted = ", ".join(sorted(METHODS))
        raise ConfigError(f"unknown method {name!r}; accepted: {accepted}, or '<method>+runtime'")
    return METHODS[name]


register(Method(
    "lazy",
    "LazyLLM: attention of the last queries, progressive per layer, aux cache with revival",
    score=lambda s: s.attention,
    needs_attention=True,
    revive_default=True,
    span_pool=True,
))
register(Method(
    "random",
    "baseline: the same schedule with a random choice of tokens",
    score=lambda s: random_scores(s.positions, s.seed + s.layer),
    needs_attention=False,
    revive_default=False,
    span_pool=False,
))
register(Method(
    "static",
    "baseline: attention sinks plus the most recent tokens (StreamingLLM-like)",
    score=lambda s: recency_scores(s.positions),
    needs_attention=False,
    revive_default=False,
    span_pool=False,
))
register(Method(
    "truncate",
    "baseline: keep the head and the tail of the prompt",
    score=lambda s: head_tail_scores(s.positions, s.lengths),
    needs_attention=False,
    revive_default=False,
    span_pool=False,
))
register(Method(
    "runtime",
    "decode-time KV eviction by accumulated attention, with a shadow set that readmits tokens (seed 000)",
    score=None,
    needs_attention=False,
    revive_default=False,
    span_pool=False,
    prunes_prefill=False,
    evicts=True,
))
register(Method(
    "sdtp",
    "SDTP: a learned MLP per stage predicts token saliency from the hidden state (pruner=PATH)",
    score=None,
    needs_attention=False,
    revive_default=True,
    span_pool=True,
    setup=setup_sdtp,
))


# ---- encoders (models/encoder.py) ----------------------------------------------------------------
def _tome_setup(config, model, plan) -> Scorer:
    """ToMe merges inside encoders; the decoder adapter (which prunes by scores) cannot run it."""
    raise ConfigError(
        f"method 'tome' merges tokens in encoders (BERT, ViT, DeiT, CLIP vision); {type(model).__name__} "
        "is a decoder: use lazy, sdtp, random, static or truncate there"
    )


register(Method(
    "tome",
    "ToMe: bipartite soft matching merges r similar tokens per layer (encoders); adaptive=True: ATS decides "
    "per input how many",
    score=None,
    needs_attention=False,
    revive_default=False,
    span_pool=False,
    setup=_tome_setup,
))
register(Method(
    "cls_attention",
    "attention of the [CLS] query (encoders; on decoders, the last queries' attention as in lazy)",
    score=lambda s: s.attention,
    needs_attention=True,
    revive_default=False,
    span_pool=False,
))
register(Method(
    "tsdtp",
    "TS-DTP: task-specific attention + [CLS] attention, learned dynamic threshold per layer (BERT encoders; "
    "pruner=DIR from `trimformer train-task`)",
    score=None,
    needs_attention=True,
    revive_default=False,
    span_pool=False,
    setup=setup_tsdtp,
))
