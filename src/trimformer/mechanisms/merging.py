"""Token merging in encoders (method "tome"): how many tokens each layer merges, and one merge step on the
live tokens of a forward.

ToMe (Bolya et al., 2023) merges `r` tokens per layer, between the attention block and the MLP; the pure
tensor functions (bipartite soft matching, size-weighted averages, unmerging, schedules) are
`ops/merge.py`. With ``tome_mode="merge_unmerge"`` (ToMe for Stable Diffusion) each block merges its own
input for its computation only and its output is unmerged onto every token (`block_merge`; the BERT adapter
runs the blocks). The encoder adapter (`patch/encoder.py`) owns the live tokens of a forward and calls this
module; `live` below is its record of them: `valid` (B, T) bool, `size` (B, T) input tokens each slot
holds (None until a merge), `owner` (B, N) slot holding each input token (-1 dropped), `irregular` (some
slot is invalid or holds more than one token) and `reduced` (the layout differs from the input's).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import DEFAULT_KEEP, TrimConfig
from ..errors import ConfigError, UnsupportedModelError
from ..ops.merge import (
    bipartite_soft_matching,
    merge_owner,
    merge_valid,
    merge_wavg,
    parse_r,
    r_for_keep,
    set_compaction,
    unmerge_schedule,
)

# merge_unmerge: share of an attention block's token work one merged token saves (q, k, v, o projections:
# "queries" merges q and o, "keys_values" k and v), see `ops.merge.unmerge_schedule`
UNMERGE_ATTENTION_COST = {"qkv": 1.0, "queries": 0.5, "keys_values": 0.5, "none": 0.0}


class TokenMerging:
    """The merge schedule of one trimmed encoder and its merge steps.

    `rs[layer]` is what layer merges in the forward in flight: an int, or (B,) per row when rows of
    different lengths get different schedules from `keep`; under merge_unmerge a pair (before the attention
    block, before the MLP)."""

    def __init__(self, config: TrimConfig, num_layers: int, protected: int, text: bool):
        self.config = config
        self.num_layers = num_layers
        self.protected = protected          # leading slots never merged ([CLS], DeiT's distillation token)
        self.text = text                    # a text encoder: each row's last token ([SEP]) is never merged
        merge, adaptive = config.merge, config.adaptive
        self.unmerging = merge.tome_mode == "merge_unmerge"
        # adaptive mode "similarity": merge every matched pair at least merge_threshold alike; r or keep /
        # reduction_ratio, when given, cap the merges per layer
        self.similarity = adaptive.enabled and adaptive.mode == "similarity"
        self.uncapped = self.similarity and merge.r is None and config.keep is None
        self.metric = self._metric()
        if merge.r is not None:
            self.fixed: list[int] | None = parse_r(num_layers, merge.r, merge.r_schedule)
        else:
            self.fixed = None                           # derived from keep per forward
        self.rs: list[Any] = list(self.fixed) if self.fixed is not None else []

    def _metric(self) -> str:
        """What ToMe compares: "keys" (the keys' head-mean, as ToMe does on ViT) or "hidden" (the states
        being averaged). "auto" takes hidden on text: on all-MiniLM-L6-v2 (12 heads of 32 dims) the
        32-dim head-mean of the keys is a weak summary, and matching on it loses 2-3x more embedding
        cosine at the same reduction (docs/encoders.md)."""
        if self.config.merge.merge_metric == "auto":
            return "hidden" if self.text else "keys"
        return self.config.merge.merge_metric

    # ---- schedules -----------------------------------------------------------------------------
    def start(self, lengths: torch.Tensor, device: torch.device) -> None:
        """Set `rs` for a forward whose rows hold `lengths` (B,) real tokens: a fixed r as given, or from
        keep each row by its own length, so rows do not affect each other."""
        if self.unmerging:
            self._start_unmerge(lengths, device)
        elif self.fixed is None:
            keep = self.config.keep if self.config.keep is not None else DEFAULT_KEEP
            schedule = self.config.merge.r_schedule
            per_row = {}
            for n in lengths.tolist():
                if n not in per_row:
                    r = r_for_keep(int(n), self.num_layers, keep, self.protected + self.text, schedule)
                    per_row[n] = parse_r(self.num_layers, r, schedule)
            rows = [per_row[n] for n in lengths.tolist()]
            if all(row == rows[0] for row in rows):
                self.rs = rows[0]
            else:
                table = torch.tensor(rows, device=device).T          # (L, B)
                self.rs = [table[layer] for layer in range(self.num_layers)]
        else:
            self.rs = list(self.fixed)

    def _start_unmerge(self, lengths: torch.Tensor, device: torch.device) -> None:
        """merge_unmerge: (r before the attention, r before the MLP) per layer, each an int or (B,) per row."""
        merge = self.config.merge
        costs = UNMERGE_ATTENTION_COST[merge.unmerge_attention], 1.0 if merge.unmerge_mlp else 0.0
        protected = self.protected + 1                                   # [CLS] and [SEP]
        if self.fixed is None:
            keep = self.config.keep if self.config.keep is not None else DEFAULT_KEEP
            per_row = {n: unmerge_schedule(n, self.num_layers, keep, protected, costs) for n in set(lengths.tolist())}
            rows = [per_row[n] for n in lengths.tolist()]
        else:
            rows = [[(r if costs[0] > 0 else 0, r if costs[1] > 0 else 0) for r in self.fixed]] * len(lengths)
        if all(row == rows[0] for row in rows):
            self.rs = [tuple(pair) for pair in rows[0]]
        else:
            table = torch.tensor(rows, device=device)                  # (B, L, 2)
            self.rs = [(table[:, layer, 0], table[:, layer, 1]) for layer in range(self.num_layers)]

    def r_at(self, layer: int) -> Any:
        return self.rs[layer] if layer < len(self.rs) else 0

    def schedule(self) -> dict[str, Any]:
        """The schedule of the last forward, for `stats`."""
        def listed(v):
            return v.tolist() if isinstance(v, torch.Tensor) else v

        if self.unmerging:
            merge = self.config.merge
            return {"tome_mode": "merge_unmerge", "unmerge_attention": merge.unmerge_attention,
                    "unmerge_mlp": merge.unmerge_mlp,
                    "r_attention": [listed(a) for a, _ in self.rs], "r_mlp": [listed(m) for _, m in self.rs]}
        return {"r": [listed(r) for r in self.rs]}

    # ---- merge steps ---------------------------------------------------------------------------
    def merge(self, live: Any, state: Any, h: torch.Tensor, metric: torch.Tensor, rows: int | torch.Tensor,
              protect: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Merge up to `rows` tokens per row of h (B, T, D), matched by `metric` (B, T, C); `protect` (B, T)
        marks more slots never merged (each row's [SEP]). Updates `live` (the merged layout) and adds the
        matching's cost to `state.merge_flops`; returns the merged states and the number of tokens merged."""
        adaptive = self.config.adaptive.enabled
        t = h.shape[1]
        m = bipartite_soft_matching(metric, rows, self.protected, live.valid if live.irregular or adaptive else None,
                                    protect=protect,
                                    threshold=self.config.adaptive.merge_threshold if self.similarity else None)
        n = live.valid.sum(-1)
        state.merge_flops += float((2 * metric.shape[-1] * ((n + 1) // 2) * (n // 2)).sum())
        before = int(live.valid.sum())
        if live.irregular or adaptive:
            new_valid = set_compaction(m, merge_valid(m, live.valid))
        size = live.size if live.size is not None else live.valid.to(h.dtype)   # padding holds nothing
        h, size = merge_wavg(m, h, size)
        live.owner = merge_owner(m, live.owner, t)
        if m.order is not None:
            live.valid = new_valid
            live.irregular = live.irregular or not bool(new_valid.all())
        else:
            live.valid = size > 0
        live.size = size
        live.reduced = True
        return h, before - int(live.valid.sum())

    def block_merge(self, live: Any, state: Any, x: torch.Tensor, r: int | torch.Tensor,
                    protect: torch.Tensor | None) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """merge_unmerge: merge `r` tokens of a block's input x (B, T, D) for its computation only:
        (the merge, merged x, sizes, merged per row). Matches on x itself; `live` is left as it is."""
        b, t, d = x.shape
        ragged = live.irregular or isinstance(r, torch.Tensor)
        m = bipartite_soft_matching(x, r, self.protected, live.valid if live.irregular else None, protect=protect)
        if ragged:
            set_compaction(m, merge_valid(m, live.valid))
        xm, size = merge_wavg(m, x, live.valid.to(x.dtype))
        n = live.valid.sum(-1)
        merged = n - (size > 0).sum(-1)
        half_a, half_b = (n + 1) // 2, n // 2                           # valid A and B slots per row
        state.merge_flops += float((2 * d * half_a * half_b + 3 * d * n).sum())
        return m, xm, size, merged.cpu()


def check_merge_options(config: TrimConfig, method: Any, family: str, merge_unmerge: bool) -> None:
    """Refuse the options that need merging on a method that does not merge, and the ones merging cannot
    take (`method`: a `registry.Method`; `merge_unmerge`: whether the `family` runs tome_mode "merge_unmerge")."""
    merge, adaptive = config.merge, config.adaptive
    if merge.tome_mode != "merge" and not method.merges:
        raise ConfigError(f"tome_mode={merge.tome_mode!r} applies to method 'tome', not {method.name!r}")
    if method.merges and merge.tome_mode == "merge_unmerge":
        if not merge_unmerge:
            raise UnsupportedModelError(
                f"tome_mode 'merge_unmerge' is implemented for BERT-family encoders, not {family!r}; "
                "use tome_mode='merge' there")
        if adaptive.enabled:
            raise ConfigError("tome_mode 'merge_unmerge' takes a fixed schedule (r or keep); adaptive=True is "
                              "for tome_mode 'merge'")
        if merge.merge_metric == "keys":
            raise ConfigError("tome_mode 'merge_unmerge' matches on each block's input hidden states; "
                              "merge_metric must be 'auto' or 'hidden'")
    if config.cls_only_last and method.merges:
        raise ConfigError("cls_only_last drops every token but [CLS] before the last MLP; with method 'tome' "
                          "use a dropping method (tsdtp, cls_attention, random) or leave it False")
    if adaptive.enabled and adaptive.mode == "similarity" and not method.merges:
        raise ConfigError(f"adaptive_mode 'similarity' merges similar tokens: it is for method 'tome', not "
                          f"{method.name!r}; use adaptive_mode 'sampling' or 'mass'")


def merges(r: int | torch.Tensor) -> bool:
    """Whether a schedule entry (an int, or (B,) per row) merges anything."""
    return bool(int(r.max()) > 0) if isinstance(r, torch.Tensor) else r > 0
