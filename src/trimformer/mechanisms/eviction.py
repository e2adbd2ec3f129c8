"""Decode-time KV eviction with a shadow set (runtime token pruning), for the decoder adapter.

Per layer and decoding step: the newest query's attention over the layer's cache (from its query and
keys) is accumulated with decay per cache slot; every `evict_every` steps the lowest-scoring slots
beyond the budget (and any under the threshold) move, keys and values as they were, to the shadow
set; every `readmit_every` steps the newest query is scored against the shadow keys and tokens it
attends to strongly return to the cache at their original positions. With `readmit_layers`, only those
layers check, and a token they bring back returns in every layer whose shadow set holds it.
"""

from __future__ import annotations

import math

import torch

from ..config import TrimConfig
from ..errors import ConfigError
from ..ops.attention import accumulate, last_query_attention, shadow_attention, single_query_softmax
from ..ops.select import eviction_mask, grouped_compaction_moves, last_valid_slots
from .probe import Probe
from .kv_buffer import InPlaceLayer
from .state import LayerSlots, RuntimeState, ShadowLayer, TrimState


def _on(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x` on `device` (and in `dtype`), with no call at all when it already is (a decoding step makes
    hundreds of these; a no-op `.to` still costs a dispatch)."""
    if x.device == device and (dtype is None or x.dtype == dtype):
        return x
    return x.to(device=device, dtype=dtype)


def _gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, K, hd), index (B, K') -> (B, Hkv, K', hd), contiguous. (`index_select` on the slot dim of
    x itself, or indexing for B > 1: `gather` with an expanded index is a few times slower on CPU, and
    `index_select` on a row x[b] of a cache's view of a larger buffer takes ~30-60 us against ~3 us.)"""
    index = _on(index, x.device)
    if x.shape[0] == 1:
        return x.index_select(2, index[0])
    rows = torch.arange(x.shape[0], device=x.device)[:, None]                 # (B, 1)
    return x[rows, :, index].transpose(1, 2).contiguous()                     # (B, K', Hkv, hd) -> (B, Hkv, K', hd)


def _move_slots(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> None:
    """In place: slot src[b, j] of x (B, Hkv, K, hd) is copied to slot dst[b, j] (every source is read before
    any slot is written; the slots of a row's `dst` are distinct). Indexed assignment: on the cache's views
    of larger buffers, `index_copy_` takes several times longer."""
    dst, src = _on(dst, x.device), _on(src, x.device)
    if x.shape[0] == 1:
        x[:, :, dst[0]] = x[:, :, src[0]]                                     # (1, Hkv, M, hd)
        return
    rows = torch.arange(x.shape[0], device=x.device)[:, None]                 # (B, 1)
    x[rows, :, dst] = x[rows, :, src]                                         # (B, M, Hkv, hd)


def _stack_rows(tensors: list[torch.Tensor], fill) -> torch.Tensor:
    """G tensors (B, K_i) -> (G * B, max K_i): stacked rows, each padded on the right with `fill`."""
    width = max(t.shape[1] for t in tensors)
    if all(t.shape[1] == width for t in tensors):
        return torch.cat(tensors)
    b = tensors[0].shape[0]
    out = tensors[0].new_full((len(tensors) * b, width), fill)
    for i, t in enumerate(tensors):
        out[i * b: (i + 1) * b, : t.shape[1]] = t
    return out


def _first_where(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, K) bool -> (B, width) slot indices: the True slots first, in slot order."""
    return torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]


def readmit_layers(option: tuple[int, ...] | str | None, num_layers: int) -> frozenset[int] | None:
    """The layers that check their shadow sets (None: each layer checks its own). "auto": layers at 1/6,
    1/2 and 5/6 of the depth (5, 15 and 25 of 30)."""
    if option is None:
        return None
    if option == "auto":
        return frozenset(num_layers * k // 6 for k in (1, 3, 5))
    if max(option) >= num_layers:
        raise ConfigError(f"readmit_layers {list(option)} out of range: the model has {num_layers} layers "
                          f"(0..{num_layers - 1})")
    return frozenset(option)


class RuntimeEviction:
    """The eviction mechanism of one trimmed decoder; its state travels with the KV cache (`TrimState`)."""

    def __init__(self, config: TrimConfig, num_layers: int):
        self.config = config.evict                  # EvictOptions
        self.sinks = config.sinks
        self.window = config.prune.window           # the last queries whose attention seeds the scores
        self.num_layers = num_layers
        self.shadow_dtype = getattr(torch, self.config.shadow_dtype) if self.config.shadow_dtype else None
        self.readmit_layers = readmit_layers(self.config.readmit_layers, num_layers)

    def checks(self, layer: int) -> bool:
        """Whether `layer` scores the newest query against its own shadow set on readmission steps."""
        return self.readmit_layers is None or layer in self.readmit_layers

    # ---- probes ------------------------------------------------------------------------------
    def probe(self, layer: int, live, keys: LayerSlots, state: TrimState) -> Probe | None:
        """What the layer's attention computes for eviction: in prefill the last queries' attention (the
        first scores), while decoding the newest query's on scoring and readmission steps."""
        if live.prefill:
            index, q_valid = last_valid_slots(live.valid, self.window)
            return self.prefill_probe(live, keys, index, q_valid)
        step = state.steps
        readmits = self.config.readmit_every and step % self.config.readmit_every == 0 and self.checks(layer)
        if step % self.config.score_every == 0 or readmits:
            return self.decode_probe(live, keys, keep_query=bool(readmits))
        return None

    def prefill_probe(self, live, keys: LayerSlots, index: torch.Tensor, q_valid: torch.Tensor) -> Probe:
        """Seed the accumulated scores with the mean attention of the prompt's last queries."""
        q_pos = live.positions.gather(1, index)

        def scorer(query, key, scaling):
            return last_query_attention(query, key, scaling, q_pos, keys.positions, keys.valid, q_valid, "mean")

        return Probe(scorer, index)

    def decode_probe(self, live, keys: LayerSlots, keep_query: bool) -> Probe:
        """Newest query's attention (mean over heads) over the cache; with `keep_query` (the layer checks its
        shadow set this step) also its query and log-sum-exp. For a single query it also computes the
        layer's attention output from the same softmax."""
        index, q_pos = live.newest()                                                            # (B, 1) each
        probe = Probe(None, index)

        def softmax(query, key, scaling):
            # query (B, H, 1, hd), key (B, Hkv, K, hd) -> probs (B, Hkv, G, K), NaN in a row with no key
            # allowed; keeps query and lse (B, H) when asked
            allowed = keys.valid & (keys.positions <= q_pos)                                    # (B, K)
            probs, lse = single_query_softmax(query, key, scaling, allowed, with_lse=keep_query)
            if keep_query:
                probe.extra = {"query": query.detach(), "lse": lse.reshape(lse.shape[0], -1), "scaling": scaling}
            return probs

        def mean_over_heads(probs):                                                             # -> (B, K)
            return probs.mean(dim=(1, 2)) if keys.all_valid() else probs.nan_to_num(0.0).mean(dim=(1, 2))

        def scorer(query, key, scaling):
            return mean_over_heads(softmax(query, key, scaling))

        def attend(query, key, value, scaling):
            # value (B, Hkv, K, hd) -> output (B, 1, H, hd), scores (B, K)
            probs = softmax(query, key, scaling)
            b, h, _, hd = query.shape
            weights = probs if probs.dtype == value.dtype else probs.to(value.dtype)
            output = torch.matmul(weights, value).reshape(b, h, 1, hd).transpose(1, 2)
            return output, mean_over_heads(probs)

        probe.scorer, probe.attend = scorer, attend
        return probe

    # ---- after a layer -----------------------------------------------------------------------
    def after_prefill(self, layer: int, state: TrimState, probe: Probe | None) -> None:
        if probe is not None and probe.scores is not None and state.slots[layer] is not None:
            state.runtime.scores[layer] = probe.scores

    def after_decode(self, layer: int, cache, state: TrimState, live, probe: Probe | None) -> None:
        rt, cfg = state.runtime, self.config
        slots = state.slots[layer]
        if slots is None:
            return
        if probe is not None and probe.scores is not None and state.steps % cfg.score_every == 0:
            previous = rt.scores[layer] if rt.scores[layer] is not None else probe.scores[:, :0]
            rt.scores[layer] = accumulate(previous, probe.scores, cfg.decay)
        # (between scoring steps the scores lag behind the slots; `_scores` pads them when needed)
        if state.steps % cfg.evict_every == 0:
            rt.pending.append(layer)
        if cfg.readmit_every and state.steps % cfg.readmit_every == 0 and probe is not None and self.checks(layer):
            self.flush(cache, state, live)             # this layer's check sees what it and the layers before evicted
            extra = getattr(probe, "extra", None)
            back = self._readmit(layer, cache, state, extra) if extra is not None else None
            if back is not None and self.readmit_layers is not None:
                for other in range(self.num_layers):
                    if other != layer:
                        self._readmit_positions(other, cache, state, *back)

    def flush(self, cache, state: TrimState, live) -> None:
        """Evict in the layers that ran since the last flush, together (at a checking layer and at the end of
        the forward). Nothing else reads or changes a layer's cache between its attention and the next flush,
        so this is the same as evicting after each layer, with one selection for all of them."""
        rt = state.runtime
        if rt.pending:
            newest = live.positions[:, live.n_input - 1: live.n_input]             # (B, 1)
            layers, rt.pending = rt.pending, []
            self._evict(layers, cache, state, newest)

    # ---- eviction ----------------------------------------------------------------------------
    def _target(self, state: TrimState, device) -> torch.Tensor:
        seen = _on(state.prompt_lengths, device) + state.steps                      # (B,) tokens of each row
        budget = self.config.budget
        if budget is None:
            return torch.full_like(seen, 1 << 62)
        if isinstance(budget, float):
            return torch.ceil(seen.double() * budget).long()
        return torch.full_like(seen, int(budget))

    @staticmethod
    def _scores(layer: int, state: TrimState) -> torch.Tensor:
        """(B, K) accumulated scores aligned with the layer's slots: slots added since the last scoring
        step start from zero."""
        slots, scores = state.slots[layer], state.runtime.scores[layer]
        if scores is None:
            scores = slots.positions[:, :0].float()
        if scores.shape[1] < slots.positions.shape[1]:
            scores = accumulate(scores, torch.zeros_like(slots.positions, dtype=scores.dtype), 1.0)
            state.runtime.scores[layer] = scores
        return scores

    def _evict(self, layers: list[int], cache, state: TrimState, newest: torch.Tensor) -> None:
        """Evict in `layers`. The slots of the layers on one device are stacked, (G * B, K), so the selection,
        what moves to the shadow set and how the caches compact are found once for all of them; then each
        layer moves its own keys and values."""
        rt, cfg = state.runtime, self.config
        if cfg.budget is None and cfg.pruning_threshold == 0:
            return
        by_device: dict[torch.device, list[int]] = {}
        for layer in layers:
            by_device.setdefault(state.slots[layer].positions.device, []).append(layer)
        for device, group in by_device.items():
            b, g = newest.shape[0], len(group)
            positions = _stack_rows([state.slots[layer].positions for layer in group], 0)   # (G * B, K)
            valid = _stack_rows([state.slots[layer].valid for layer in group], False)
            scores = _stack_rows([self._scores(layer, state) for layer in group], 0.0)
            protected = valid & (
                (positions < self.sinks) | (positions > _on(newest, device).repeat(g, 1) - cfg.recent)
            )
            target = self._target(state, device).repeat(g)
            evict = eviction_mask(scores, valid, protected, target, cfg.pruning_threshold)
            counts = evict.view(g, b, -1).sum(-1).tolist()                                 # (G, B), one sync
            if not any(map(any, counts)):
                continue
            keep = valid & ~evict
            moved = _first_where(evict, max(map(max, counts)))          # (G * B, M) evicted slots first
            gone_positions, gone_valid, gone_scores = (x.gather(1, moved) for x in (positions, evict, scores))
            widths, moves, dst, src = grouped_compaction_moves(keep, b)
            after = lambda x: x.scatter(1, dst, x.gather(1, src))          # (G * B, K), then cut per layer
            positions, keep, scores = after(positions), after(keep), after(scores)
            for i, layer in enumerate(group):
                if not any(counts[i]):
                    continue
                rows, n = slice(i * b, (i + 1) * b), max(counts[i])
                layer_cache = cache.layers[layer]
                # evicted keys and values move to the shadow set, untouched
                self._to_shadow(layer, state, ShadowLayer(
                    keys=_gather_slots(layer_cache.keys, moved[rows, :n]),
                    values=_gather_slots(layer_cache.values, moved[rows, :n]),
                    positions=gone_positions[rows, :n], valid=gone_valid[rows, :n], scores=gone_scores[rows, :n],
                ))
                rt.evicted[layer] += sum(counts[i])
                # the cache keeps the rest: kept slots from the end fill the holes, then the tensors are cut to
                # the layer's width (views). Rows keeping fewer slots are left with masked filler.
                width, m = widths[i], moves[i]
                for name in ("keys", "values"):
                    tensor = getattr(layer_cache, name)
                    _move_slots(tensor, dst[rows, :m], src[rows, :m])
                    setattr(layer_cache, name, tensor[:, :, :width])
                state.slots[layer] = LayerSlots(positions[rows, :width], keep[rows, :width])
                rt.scores[layer] = scores[rows, :width]

    def _to_shadow(self, layer: int, state: TrimState, entry: ShadowLayer) -> None:
        rt, cfg = state.runtime, self.config
        device = torch.device(cfg.shadow_device) if cfg.shadow_device else entry.keys.device
        dtype = self.shadow_dtype or entry.keys.dtype
        entry = ShadowLayer(_on(entry.keys, device, dtype), _on(entry.values, device, dtype),
                            _on(entry.positions, device), _on(entry.valid, device), _on(entry.scores, device))
        if rt.shadow[layer] is None:
            rt.shadow[layer] = entry
        else:
            rt.shadow[layer].append(entry)
        rt.shadow[layer] = self._bound(layer, state, rt.shadow[layer])

    def _bound(self, layer: int, state: TrimState, entry: ShadowLayer) -> ShadowLayer:
        """Keep at most `shadow_size` valid tokens per row (the highest-scoring); the rest are dropped
        for good and counted. Compacts away filler when it is over half the slots (or tokens were dropped),
        so the copy is paid once per many readmissions."""
        limit = self.config.shadow_size
        valid, dropped = entry.valid, False
        if limit is not None:
            ranked = entry.scores.float().masked_fill(~valid, -math.inf)
            order = ranked.sort(dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            over = valid & (rank >= limit)
            dropped = bool(over.any())
            state.runtime.dropped[layer] += int(over.sum())
            valid = valid & ~over
        width = int(valid.sum(-1).max())
        if not dropped and 2 * width >= valid.shape[1]:   # nothing dropped and little filler: no copy
            return entry
        index = _first_where(valid, width)
        return ShadowLayer(
            keys=_gather_slots(entry.keys, index),
            values=_gather_slots(entry.values, index),
            positions=entry.positions.gather(1, index),
            valid=valid.gather(1, index),
            scores=entry.scores.gather(1, index),
        )

    # ---- readmission ----------------------------------------------------------------------
    @staticmethod
    def _shadow_empty(layer: int, state: TrimState) -> bool:
        """No token in the layer's shadow set, from the counters (no look at the tensors): every token
        evicted came back or was dropped."""
        rt = state.runtime
        return rt.shadow[layer] is None or rt.evicted[layer] == rt.readmitted[layer] + rt.dropped[layer]

    def _readmit(self, layer: int, cache, state: TrimState, extra: dict):
        """Score the newest query against the layer's shadow keys and bring back the tokens over the
        threshold. Returns their positions, which of them are real and their attention, each (B, R),
        or None when nothing comes back."""
        if self._shadow_empty(layer, state):
            return None
        shadow, slots = state.runtime.shadow[layer], state.slots[layer]
        device = cache.layers[layer].keys.device
        keys = _on(shadow.keys, device)
        attention = shadow_attention(extra["query"], keys, extra["scaling"], extra["lse"])   # (B, N)
        n_live = slots.valid.sum(-1, keepdim=True)                  # (B, 1) >= 1: the newest token is live
        wanted = _on(shadow.valid, device) & (attention * n_live >= self.config.readmit_threshold)
        if not bool(wanted.any()):                                  # most checks: one look, nothing comes back
            return None
        width = min(self.config.readmit_max, int(wanted.sum(-1).max()))
        top = attention.masked_fill(~wanted, -1.0).topk(width, dim=-1).indices             # (B, R)
        chosen = wanted.gather(1, top)
        score = attention.gather(1, top)
        return self._bring_back(layer, cache, state, top, chosen, score), chosen, score

    def _readmit_positions(self, layer: int, cache, state: TrimState, positions: torch.Tensor,
                           chosen: torch.Tensor, score: torch.Tensor) -> None:
        """Bring back the layer's shadow tokens at `positions` (B, R) where `chosen`, with `score` as their
        accumulated attention: another layer's check asked for them (`readmit_layers`)."""
        if self._shadow_empty(layer, state):
            return
        shadow = state.runtime.shadow[layer]
        device = shadow.positions.device
        hit = (shadow.positions[:, :, None] == _on(positions, device)[:, None, :]) & _on(chosen, device)[:, None, :]
        wanted = shadow.valid & hit.any(-1)                                              # (B, N)
        width = int(wanted.sum(-1).max())
        if width == 0:
            return
        top = _first_where(wanted, width)                                                # (B, R')
        own_score = (hit.float() * _on(score, device, torch.float32)[:, None, :]).amax(-1)  # (B, N)
        self._bring_back(layer, cache, state, top, wanted.gather(1, top), own_score.gather(1, top))

    def _bring_back(self, layer: int, cache, state: TrimState, top: torch.Tensor, chosen: torch.Tensor,
                    score: torch.Tensor) -> torch.Tensor:
        """Move shadow slots `top` (B, R) of the layer back into its cache, keys and values as they were,
        at their original positions; `chosen` (B, R) False marks filler. Returns their positions (B, R)."""
        rt = state.runtime
        shadow, slots = rt.shadow[layer], state.slots[layer]
        layer_cache = cache.layers[layer]
        device, dtype = layer_cache.keys.device, layer_cache.keys.dtype
        top_s = _on(top, shadow.valid.device)
        back_keys = _on(_gather_slots(shadow.keys, top_s), device, dtype)                 # (B, Hkv, R, hd)
        back_values = _on(_gather_slots(shadow.values, top_s), device, dtype)
        positions = _on(shadow.positions.gather(1, top_s), device)                        # (B, R)
        chosen = _on(chosen, device)
        scores = self._scores(layer, state)                           # aligned with the slots before the return
        if isinstance(layer_cache, InPlaceLayer):
            layer_cache.update(back_keys, back_values)
        else:
            layer_cache.keys = torch.cat([layer_cache.keys, back_keys], 2)
            layer_cache.values = torch.cat([layer_cache.values, back_values], 2)
        state.slots[layer] = slots.extend(positions, chosen)
        rt.scores[layer] = torch.cat([scores, _on(score, scores.device, scores.dtype)], 1)
        shadow.valid.scatter_(1, top_s, shadow.valid.gather(1, top_s) & ~_on(chosen, shadow.valid.device))
        rt.readmitted[layer] += int(chosen.sum())
        # the readmitted slots stay in the shadow tensors as invalid filler until `_bound` compacts them
        return positions

    def stats(self, state: TrimState) -> dict:
        """Eviction counters: per layer and totals over layers (token-layer entries). For every layer,
        seen = in_cache + in_shadow + dropped."""
        rt = state.runtime
        in_cache = [int(s.valid.sum()) if s is not None else 0 for s in state.slots]
        in_shadow = [rt.in_shadow(layer) for layer in range(rt.num_layers)]
        return {
            "total_tokens_seen": sum(rt.seen),
            "total_tokens_pruned": sum(rt.evicted),
            "total_tokens_reintroduced": sum(rt.readmitted),
            "total_tokens_dropped": sum(rt.dropped),
            "per_layer": [
                {"layer": layer, "seen": rt.seen[layer], "in_cache": in_cache[layer], "in_shadow": in_shadow[layer],
                 "dropped": rt.dropped[layer], "evicted": rt.evicted[layer], "reintroduced": rt.readmitted[layer]}
                for layer in range(rt.num_layers)
            ],
            "shadow_bytes": rt.shadow_bytes(),
        }
