"""Where a model's attention finds the evidence: the `lazy` scorer's last-query score of every token at every
layer, from one full forward, and how much of a planted fact a layer or a whole schedule would keep.

The scores are recorded by the library itself: the model is trimmed with a schedule that keeps everything
(keep 1.0 after every layer, so its outputs are the full model's) and the prefill mechanism's scorer is
wrapped to keep what it returns. Keeping follows the mechanism exactly (`span_max_pool`, sinks and the last
`protect_last` tokens protected, `ratio_counts` and `select`), so "recall at keep r" is what the layer would
really keep of the fact's tokens if it were the first stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trimformer.api import PATCH_ATTR, stats, trim, untrim
from trimformer.config import TrimConfig
from trimformer.generation import GreedyStream
from trimformer.ops.select import ratio_counts, select
from trimformer.ops.smoothing import span_max_pool
from trimformer.patch import adapter_for
from trimformer.patch.llama import STATE_ATTR

from .prompts import CalibrationPrompt


@dataclass(frozen=True)
class ScoreOptions:
    """The `lazy` scorer's options a calibration measures with (TrimConfig's defaults)."""

    window: int = 64
    pool: str = "max"
    span: int = 33
    sinks: int = 4
    protect_last: int = 16

    def trim_options(self) -> dict:
        return {"window": self.window, "pool": self.pool, "span": self.span, "sinks": self.sinks,
                "protect_last": self.protect_last}


@dataclass
class Reference:
    """The full model on one calibration prompt."""

    scores: torch.Tensor          # (L-1, T) last-query score of each token after layers 0..L-2 (before pooling)
    logprobs: torch.Tensor        # (V,) log-softmax of the first answer token's logits
    tokens: list[int]             # greedy continuation (the answer), eos excluded


@dataclass
class Outcome:
    """A trimmed model on one calibration prompt, against the full model's `Reference`."""

    kl: float                     # KL(full || trimmed) of the first answer token's distribution
    evidence_kept: bool           # every token of the asked fact reached the last layer
    agrees: bool                  # the greedy continuation equals the full model's
    tokens: list[int] = field(default_factory=list)
    kept_fraction: float = 1.0    # token-layer work done
    flop_ratio: float = 1.0


def num_layers(model) -> int:
    return len(adapter_for(model).layers(model))


def protected_mask(length: int, opts: ScoreOptions) -> torch.Tensor:
    """(T,) bool: sinks and the last `protect_last` tokens, never dropped."""
    positions = torch.arange(length)
    return (positions < opts.sinks) | (positions >= length - opts.protect_last)


class _Recorder:
    """Wraps a scorer: returns its scores unchanged and keeps row 0's, per layer."""

    def __init__(self, scorer, store: dict[int, torch.Tensor]):
        self.scorer, self.store = scorer, store

    def __call__(self, inputs):
        scores = self.scorer(inputs)                                   # (B, K)
        self.store[inputs.layer] = scores[0].detach().float().cpu()
        return scores


@torch.inference_mode()
def record_reference(model, prompt: CalibrationPrompt, opts: ScoreOptions, new_tokens: int = 8,
                     eos_token_id: int | list[int] | None = None) -> Reference:
    """One full forward (and `new_tokens` greedy steps) recording the last-query scores at every layer."""
    layers = num_layers(model)
    trim(model, method="lazy", schedule={layer: 1.0 for layer in range(layers - 1)}, revive=False,
         **opts.trim_options())
    store: dict[int, torch.Tensor] = {}
    patch = getattr(model, PATCH_ATTR)
    patch.prefill.scorer = _Recorder(patch.prefill.scorer, store)
    first: list[torch.Tensor] = []
    try:
        tokens = _greedy(model, prompt.input_ids, new_tokens, eos_token_id, first)
    finally:
        untrim(model)
    scores = torch.stack([store[layer] for layer in range(layers - 1)])  # (L-1, T)
    return Reference(scores, first[0], tokens)


@torch.inference_mode()
def run_trimmed(model, prompt: CalibrationPrompt, schedule: dict[int, float], reference: Reference,
                opts: ScoreOptions, eos_token_id: int | list[int] | None = None) -> Outcome:
    """The model trimmed with `schedule` on one prompt: first-answer-token KL against the full model, whether
    the asked fact's tokens all reached the last layer, and whether the greedy answer agrees."""
    trim(model, method="lazy", schedule=dict(schedule), **opts.trim_options())
    first: list[torch.Tensor] = []
    reached: list[torch.Tensor] = []

    def on_prefill(cache) -> None:
        slots = getattr(cache, STATE_ATTR).slots[-1]
        reached.append(slots.positions[0][slots.valid[0]].cpu())

    try:
        tokens = _greedy(model, prompt.input_ids, len(reference.tokens) or 1, eos_token_id, first, on_prefill)
        info = stats(model)
    finally:
        untrim(model)
    p = reference.logprobs
    kl = float((p.exp() * (p - first[0])).sum())
    start, end = prompt.evidence
    kept = bool(torch.isin(torch.arange(start, end), reached[0]).all())
    return Outcome(kl, kept, tokens == reference.tokens, tokens, info["kept_fraction"], info["flop_ratio"])


def _greedy(model, input_ids: torch.Tensor, new_tokens: int, eos, first: list, on_prefill=None) -> list[int]:
    def choose(logits: torch.Tensor) -> torch.Tensor:          # (1, V) -> (1,)
        if not first:
            first.append(logits[0].float().log_softmax(-1).cpu())
        return logits.argmax(-1)

    stream = GreedyStream(model, input_ids, new_tokens, eos_token_id=eos, choose=choose, on_prefill=on_prefill)
    return [int(token[0]) for token in stream]


# ---- what a layer, or a schedule, keeps of the evidence ---------------------------------------------
def keep_index(scores: torch.Tensor, keep: float, protected: torch.Tensor, span: int = 1) -> torch.Tensor:
    """scores (K,), protected (K,) bool -> (K',) the slots one stage keeps at ratio `keep`, ascending, as the
    prefill mechanism chooses them (span max-pooling, protected first, ties by slot order)."""
    pooled = span_max_pool(scores[None].float(), span)                        # (1, K)
    valid = torch.ones_like(pooled, dtype=torch.bool)
    counts = ratio_counts(valid.sum(-1), keep, protected.sum()[None])
    index, kept = select(pooled, valid, protected[None], counts)
    return index[0][kept[0]]


def evidence_recall(scores: torch.Tensor, evidence: torch.Tensor, keep: float, protected: torch.Tensor,
                    span: int = 1) -> float:
    """Share of the evidence tokens (K,) bool that a stage keeping `keep` of the tokens by `scores` keeps."""
    index = keep_index(scores, keep, protected, span)
    return float(evidence[index].sum()) / max(1, int(evidence.sum()))


def evidence_need(scores: torch.Tensor, evidence: torch.Tensor, protected: torch.Tensor, span: int = 1) -> float:
    """The smallest keep ratio at which one stage scoring by `scores` (K,) keeps every evidence token: the
    rank of the worst-ranked one (protected tokens rank first), plus one, over K."""
    pooled = span_max_pool(scores[None].float(), span)[0]
    ranked = pooled.masked_fill(protected, float("inf"))
    order = ranked.sort(descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
    return float(rank[evidence].max() + 1) / scores.numel()


def cascade(scores: torch.Tensor, schedule: dict[int, float], evidence: torch.Tensor, protected: torch.Tensor,
            span: int = 1) -> tuple[float, float]:
    """A whole schedule on the full model's scores (L-1, K): each stage keeps its share of the tokens still
    live, ranked by that layer's scores. Returns (share of evidence tokens kept to the end, mean share of the
    later layers' score mass the computed tokens hold). The full model's scores stand in for the trimmed
    model's, which see fewer tokens: a screen, verified with real trimmed forwards."""
    live = torch.arange(scores.shape[1])
    masses = []
    stages = sorted(schedule.items())
    for i, (layer, keep) in enumerate(stages):
        live = live[keep_index(scores[layer, live], keep, protected[live], span)]
        upto = stages[i + 1][0] if i + 1 < len(stages) else scores.shape[0] - 1
        block = scores[layer + 1: upto + 1]                                    # layers computed on `live`
        if block.numel():
            masses.append(block[:, live].sum(-1) / block.sum(-1).clamp(min=1e-12))
    mass = float(torch.cat(masses).mean()) if masses else 1.0
    return float(evidence[live].sum()) / max(1, int(evidence.sum())), mass
