"""Prefill dropping with aux-cache revival (LazyLLM's mechanism), for decoders.

At each layer of the schedule the scorer scores the live prompt tokens; the top share (`plan[layer]`,
or fewer with adaptive counts) goes on through the later layers, the rest park their hidden states in
the aux cache of that layer. While decoding, a parked token the newest query attends to strongly
(>= `revive_threshold` x uniform) is revived: it rejoins the live tokens and runs through the remaining
layers only, its keys entering the cache at its original position. Sinks and the last `protect_last`
prompt tokens are never dropped.

The adapter owns the token flow (`live`: positions, validity, rotary tables of the tokens still live)
and calls `probe` before a layer's attention and `prune` / `revive_tokens` after the layer.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import TrimConfig
from ..ops.attention import last_query_attention, newest_query_attention
from ..ops.select import gather_rows, last_valid_slots, mass_counts, ratio_counts, select
from ..ops.smoothing import span_max_pool
from ..registry import Method
from ..scorers.base import ScoreInputs, Scorer
from .probe import Probe
from .state import AuxEntry, LayerSlots, TrimState


class PrefillDrop:
    """Scores, drops and revives prompt tokens at the layers of `plan` ({layer: keep})."""

    def __init__(self, config: TrimConfig, method: Method, plan: dict[int, float], scorer: Scorer,
                 revive: bool, rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.config = config
        self.method = method
        self.plan = plan
        self.scorer = scorer
        self.revive = revive
        self.rotary = rotary            # (x, positions (B, N)) -> cos, sin (B, N, hd): the model's rotary table

    # ---- before a layer's attention -----------------------------------------------------------
    def probe(self, layer: int, live: Any, keys: LayerSlots, state: TrimState) -> Probe | None:
        """What the layer's attention should compute for this mechanism: the last queries' attention at a
        pruning layer (prefill), the newest query's at a layer with tokens waiting to be revived."""
        if layer not in self.plan:
            return None
        cfg = self.config.prune
        if live.prefill and self.method.needs_attention:
            index, q_valid = last_valid_slots(live.valid, cfg.window)
            q_pos = live.positions.gather(1, index)

            def scorer(query, key, scaling):
                return last_query_attention(query, key, scaling, q_pos, keys.positions, keys.valid, q_valid, cfg.pool)

            return Probe(scorer, index)
        if not live.prefill and self.revive and layer in state.aux and state.steps % cfg.revive_every == 0:
            index = torch.full((live.positions.shape[0], 1), live.n_input - 1, device=keys.positions.device)
            q_pos = live.positions.gather(1, index)

            def scorer(query, key, scaling):
                return newest_query_attention(query, key, scaling, q_pos, keys.positions, keys.valid)

            return Probe(scorer, index)
        return None

    # ---- prefill: drop ------------------------------------------------------------------------
    def prune(self, layer: int, hidden: torch.Tensor, probe: Probe | None, live: Any, state: TrimState) -> torch.Tensor:
        """hidden (B, Q, D) -> (B, Q', D): keep the selected tokens, park the rest in the aux cache."""
        cfg = self.config
        inputs = ScoreInputs(
            layer=layer,
            positions=live.positions,
            valid=live.valid,
            lengths=state.prompt_lengths.to(hidden.device),
            hidden=hidden,
            attention=probe.scores if probe is not None else None,
            keys=probe.keys if probe is not None else None,
            seed=cfg.seed,
        )
        scores = self.scorer(inputs).float()                                     # (B, Q)
        if self.method.span_pool:
            scores = span_max_pool(scores.masked_fill(~live.valid, 0.0), cfg.prune.span)
        lengths = inputs.lengths[:, None]
        protected = live.valid & ((live.positions < cfg.sinks) | (live.positions >= lengths - cfg.protect_last))
        n_valid, n_protected = live.valid.sum(-1), protected.sum(-1)
        counts = ratio_counts(n_valid, self.plan[layer], n_protected)
        if cfg.adaptive.enabled:
            counts = torch.minimum(mass_counts(scores, live.valid, cfg.adaptive.mass, n_protected), counts)
        index, kept = select(scores, live.valid, protected, counts)              # (B, K'), (B, K')

        keep_mask = torch.zeros_like(live.valid).scatter_(1, index, kept)        # (B, Q)
        dropped = live.valid & ~keep_mask
        self._park(layer, hidden, dropped, live, state)
        live.gather(index, kept)
        return gather_rows(hidden, index)

    def _park(self, layer: int, hidden: torch.Tensor, dropped: torch.Tensor, live: Any, state: TrimState) -> None:
        """Move the dropped tokens' hidden states to the aux cache of `layer` (or count them as gone)."""
        width = int(dropped.sum(-1).max())
        if width == 0:
            return
        if not self.revive:
            state.dropped_for_good += int(dropped.sum())
        order = torch.sort((~dropped).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # dropped first
        state.aux[layer] = AuxEntry(
            hidden=gather_rows(hidden, order),
            positions=live.positions.gather(1, order),
            slots=order,  # no past in prefill: the slot in this layer's cache is the live index
            source=live.source.gather(1, order),
            waiting=dropped.gather(1, order),
        )

    # ---- decoding: revive ---------------------------------------------------------------------
    def revive_tokens(self, layer: int, hidden: torch.Tensor, probe: Probe, live: Any, state: TrimState) -> torch.Tensor:
        """hidden (B, Q, D) -> (B, Q + R, D): aux tokens of `layer` the new query attends to strongly."""
        cfg = self.config.prune
        entry = state.aux[layer]
        keys = state.slots[layer]
        attention = probe.scores                                                  # (B, K)
        n_keys = keys.valid.sum(-1, keepdim=True).clamp(min=1)
        relative = attention.gather(1, entry.slots) * n_keys                      # (B, N) x uniform
        wanted = entry.waiting & (relative >= cfg.revive_threshold)
        width = min(cfg.revive_max, int(wanted.sum(-1).max()))
        if width == 0:
            return hidden
        top = relative.masked_fill(~wanted, -1.0).topk(width, dim=-1).indices     # (B, R)
        chosen = wanted.gather(1, top)                                            # (B, R)
        entry.waiting.scatter_(1, top, entry.waiting.gather(1, top) & ~chosen)
        state.revived[layer] += int(chosen.sum())

        positions = entry.positions.gather(1, top)
        extra = gather_rows(entry.hidden, top)
        cos, sin = self.rotary(extra, positions)
        live.extend(positions, chosen, cos.to(extra.device), sin.to(extra.device))
        return torch.cat([hidden, extra], dim=1)

    # ---- after the last layer -----------------------------------------------------------------
    @staticmethod
    def restore_prompt_order(hidden: torch.Tensor, live: Any, state: TrimState,
                             norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, Q_kept, D) -> (B, T, D): kept tokens' outputs at their input index; a pruned token's entry
        is its hidden state when it was dropped (through the final `norm`): it was not computed further."""
        batch, _, dim = hidden.shape
        device = hidden.device
        out = hidden.new_zeros(batch, live.n_input, dim)
        live.to(device)
        for entry in state.aux.values():
            index = entry.source.to(device).clamp(min=0)[:, :, None].expand(-1, -1, dim)
            normed = norm(entry.hidden).to(device)
            current = out.gather(1, index)
            out.scatter_(1, index, torch.where(entry.waiting.to(device)[:, :, None], normed, current))
        index = live.source.clamp(min=0)[:, :, None].expand(-1, -1, dim)
        current = out.gather(1, index)
        out.scatter_(1, index, torch.where(live.valid[:, :, None], hidden, current))
        return out
