"""`TokenPruner`: a runtime-pruning API (score, prune, shadow set, reintroduce, stats) as a thin class
over trimformer's pieces.

Standalone, it scores tokens from attention weights you already have, prunes hidden states, keeps
the pruned ones in a shadow set and brings them back when they become relevant again::

    pruner = TokenPruner(pruning_threshold=0.5)        # prune below half of uniform attention
    scores = pruner.score_tokens(attentions, token_indices)
    kept_tokens, kept_hidden = pruner.prune_tokens(tokens, hidden_states)
    back = pruner.reintroduce(new_attention_over_shadow)   # tokens that became relevant again
    pruner.get_pruning_stats()

On a model, ``TokenPruner(...).apply(model)`` is ``trim(model, method="runtime", ...)``: the same
scoring, threshold and shadow set run inside ``model.generate`` on the KV cache, and
``get_pruning_stats()`` reads the model's counters.
"""

from __future__ import annotations

from typing import Any

import torch

from .api import stats, trim
from .errors import ConfigError, InputError


class TokenPruner:
    """Attention-based token pruning with a shadow set.

    pruning_threshold: a token is pruned when its (decayed, accumulated) attention is below
        ``pruning_threshold x uniform`` (uniform = 1 / number of live tokens); 0 prunes nothing.
    reintroduce_threshold: a shadow token returns when its attention reaches this x uniform.
    shadow_size: at most this many pruned tokens are kept (the highest-scoring); None = all.
    protect_first / protect_last: tokens at the start (sinks) and end that are never pruned.
    """

    def __init__(self, pruning_threshold: float = 0.5, reintroduce_threshold: float = 2.0,
                 shadow_size: int | None = None, decay: float = 1.0, protect_first: int = 4,
                 protect_last: int = 1, **model_options: Any):
        if pruning_threshold < 0 or reintroduce_threshold < 0:
            raise ConfigError("pruning_threshold and reintroduce_threshold must be >= 0 (multiples of uniform attention)")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"decay must be in [0, 1], got {decay}")
        self.pruning_threshold = pruning_threshold
        self.reintroduce_threshold = reintroduce_threshold
        self.shadow_size = shadow_size
        self.decay = decay
        self.protect_first = protect_first
        self.protect_last = protect_last
        self.model_options = model_options
        self.model: torch.nn.Module | None = None
        self.scores: torch.Tensor | None = None          # (N,) accumulated scores of the live tokens
        self.indices: torch.Tensor | None = None         # (N,) their token indices
        self.shadow: dict[int, tuple[Any, torch.Tensor, float]] = {}  # index -> (token, hidden, score)
        self.seen: set[int] = set()
        self.pruned = 0
        self.reintroduced = 0
        self.dropped = 0

    # ---- on a model ----------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Install the same pruning inside `model` (decode-time KV eviction with a shadow set)."""
        trim(model, method="runtime", pruning_threshold=self.pruning_threshold,
             readmit_threshold=self.reintroduce_threshold, shadow_size=self.shadow_size,
             decay=self.decay, sinks=self.protect_first, **self.model_options)
        self.model = model
        return model

    # ---- standalone ----------------------------------------------------------------------------
    def score_tokens(self, attention_weights: torch.Tensor, token_indices) -> torch.Tensor:
        """Attention each token receives, averaged over batch, heads and queries, accumulated with decay.

        attention_weights: (K,), (Q, K), (H, Q, K) or (B, H, Q, K) with K = len(token_indices).
        Returns the accumulated scores (K,).
        """
        weights = torch.as_tensor(attention_weights).float()
        indices = torch.as_tensor(list(token_indices), dtype=torch.long)
        if weights.shape[-1] != len(indices):
            raise InputError(f"attention_weights' last dimension ({weights.shape[-1]}) must equal the "
                             f"number of token_indices ({len(indices)})")
        received = weights.reshape(-1, weights.shape[-1]).mean(0)                      # (K,)
        if self.scores is not None:
            lookup = {int(i): float(s) for i, s in zip(self.indices, self.scores)}
            previous = torch.tensor([lookup.get(int(i), 0.0) for i in indices])     # (K,) aligned
            received = self.decay * previous + received
        self.scores, self.indices = received, indices
        self.seen.update(int(i) for i in indices)
        return received

    def prune_tokens(self, tokens, hidden_states: torch.Tensor):
        """Drop tokens scoring under the threshold; they move to the shadow set.

        tokens: a sequence of K tokens (ids or anything); hidden_states: (K, D) or (B, K, D).
        Returns the kept tokens and their hidden states, in order.
        """
        if self.scores is None:
            raise InputError("call score_tokens(attention_weights, token_indices) before prune_tokens")
        k = len(self.scores)
        axis = 0 if hidden_states.dim() == 2 else 1
        if len(tokens) != k or hidden_states.shape[axis] != k:
            raise InputError(f"prune_tokens got {len(tokens)} tokens and {hidden_states.shape[axis]} hidden "
                             f"states; the last score_tokens call scored {k}")
        position = torch.arange(k)
        protected = (position < self.protect_first) | (position >= k - self.protect_last)
        prune = ~protected & (self.scores * k < self.pruning_threshold)
        for j in torch.nonzero(prune).flatten().tolist():
            hidden = hidden_states[j] if axis == 0 else hidden_states[:, j]
            self.shadow[int(self.indices[j])] = (tokens[j], hidden, float(self.scores[j]))
        self.pruned += int(prune.sum())
        self._bound_shadow()
        keep = (~prune).nonzero().flatten()
        self.scores, self.indices = self.scores[keep], self.indices[keep]
        kept_tokens = [tokens[j] for j in keep.tolist()]
        return kept_tokens, hidden_states.index_select(axis, keep)

    def reintroduce(self, shadow_attention: dict[int, float], live_tokens: int) -> list[tuple[int, Any, torch.Tensor]]:
        """Bring back shadow tokens whose new attention (index -> weight) is >= threshold x uniform
        (1 / live_tokens). Returns (index, token, hidden state) of each, in index order."""
        back = sorted(i for i, a in shadow_attention.items()
                      if i in self.shadow and a * max(live_tokens, 1) >= self.reintroduce_threshold)
        out = []
        for i in back:
            token, hidden, _ = self.shadow.pop(i)
            out.append((i, token, hidden))
        self.reintroduced += len(out)
        return out

    def _bound_shadow(self) -> None:
        if self.shadow_size is None or len(self.shadow) <= self.shadow_size:
            return
        ranked = sorted(self.shadow, key=lambda i: self.shadow[i][2], reverse=True)
        for i in ranked[self.shadow_size:]:
            del self.shadow[i]
            self.dropped += 1

    # ---- statistics ----------------------------------------------------------------------------
    def get_pruning_stats(self) -> dict[str, Any]:
        """total_tokens_seen, total_tokens_pruned, total_tokens_reintroduced, total_tokens_dropped,
        per-layer counts and the current KV (or hidden-state) size in bytes."""
        if self.model is not None:
            info = stats(self.model)
            return {
                "total_tokens_seen": info["total_tokens_seen"],
                "total_tokens_pruned": info["total_tokens_pruned"],
                "total_tokens_reintroduced": info["total_tokens_reintroduced"],
                "total_tokens_dropped": info["total_tokens_dropped"],
                "per_layer": info["per_layer"],
                "kv_bytes": info["kv_bytes"],
                "shadow_bytes": info["shadow_bytes"],
            }
        shadow_bytes = sum(h.numel() * h.element_size() for _, h, _ in self.shadow.values())
        return {
            "total_tokens_seen": len(self.seen),
            "total_tokens_pruned": self.pruned,
            "total_tokens_reintroduced": self.reintroduced,
            "total_tokens_dropped": self.dropped,
            "per_layer": [{"layer": 0, "seen": len(self.seen), "in_cache": 0 if self.scores is None else len(self.scores),
                           "in_shadow": len(self.shadow), "dropped": self.dropped}],
            "kv_bytes": 0,
            "shadow_bytes": shadow_bytes,
        }
