"""Token merging (ToMe) and adaptive token sampling (ATS): pure tensor functions.

ToMe (Bolya et al., 2023) merges `r` tokens per layer by bipartite soft matching: the live tokens are
split alternately into sets A (even slots) and B (odd slots); every A token is matched to its most
similar B token (cosine of the keys' mean over heads); the `r` best-matched A tokens are averaged into
their B partners, weighted by how many input tokens each already holds (its *size*). Proportional
attention adds log(size) to the attention logits so a merged token keeps the weight of the tokens it
holds.

Beyond the paper's dense case, everything here handles *invalid* slots (padding of a batch, or filler
left when rows merge different numbers of tokens): an invalid slot has size 0, is never a merge
target, never counts toward a row's `r`, and is removed for free when it falls in set A. After a merge
the valid slots are moved to the front of each row (`compact`) so a row merges exactly the same tokens
whatever the rest of its batch looks like.

Shapes: B rows, T slots, C channels. Sizes are float (B, T); an owner map (B, N) says, for each input
token, which slot now holds it (-1: dropped).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

R_SCHEDULES = ("constant", "decreasing", "increasing")


# ---- schedules -----------------------------------------------------------------------------------
def parse_r(num_layers: int, r: int | list[int] | tuple[int, ...], schedule: str = "constant") -> list[int]:
    """Tokens merged at each of `num_layers` layers.

    ``r`` an int: ``constant`` merges r at every layer; ``decreasing`` goes linearly from 2r to 0 and
    ``increasing`` from 0 to 2r (same total, ToMe's inflection -1 / +1). A list gives r per layer
    (shorter lists are padded with 0; the schedule is then ignored).
    """
    if isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if any(v < 0 for v in values):
            raise ConfigError(f"r must hold integers >= 0, got {list(r)!r}")
        if len(values) > num_layers:
            raise ConfigError(f"r lists {len(values)} layers but the model has {num_layers}")
        return values + [0] * (num_layers - len(values))
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ConfigError(f"r must be an integer >= 0 or a list of them, got {r!r}")
    if schedule not in R_SCHEDULES:
        raise ConfigError(f"r_schedule must be one of {R_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or num_layers == 1:
        return [r] * num_layers
    inflect = -1.0 if schedule == "decreasing" else 1.0
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


def r_for_keep(n_tokens: int, num_layers: int, keep: float, protected: int = 1,
               schedule: str = "constant") -> int:
    """The r whose schedule does the share `keep` of the token-layer work on a row of `n_tokens`.

    A layer merges between its attention and its MLP, so each layer counts half for the tokens entering
    its attention and half for those entering its MLP. With a constant r the share is about
    1 - r*L/(2N); the exact r is found by simulating the schedule (the largest r whose share is still
    >= keep, so a trim never does less work than asked... or more reduction than asked)."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep!r}")
    return _r_for_keep(int(n_tokens), int(num_layers), float(keep), int(protected), schedule)


@functools.lru_cache(maxsize=4096)
def _r_for_keep(n_tokens: int, num_layers: int, keep: float, protected: int, schedule: str) -> int:
    best = 0
    for r in range(0, max(n_tokens, 1)):
        counts = token_counts(n_tokens, parse_r(num_layers, r, schedule), protected)
        share = sum(a + m for a, m in counts) / (2.0 * n_tokens * num_layers)
        if share + 1e-9 < keep:
            break
        best = r
    return best


def token_counts(n_tokens: int, rs: list[int], protected: int = 1) -> list[tuple[int, int]]:
    """(attention tokens, MLP tokens) at each layer for a dense row of `n_tokens` and the schedule `rs`
    (each r capped at half the unprotected tokens, as `bipartite_soft_matching` does)."""
    out, t = [], n_tokens
    for r in rs:
        step = max(0, min(r, (t - protected) // 2))
        out.append((t, t - step))
        t -= step
    return out


# ---- bipartite soft matching ----------------------------------------------------------------------
@dataclass
class Merge:
    """One layer's merge decision; apply it with `merge_wavg`, `merge_owner`, `merge_valid`."""

    unm_idx: torch.Tensor    # (B, Tu) A-slots that stay, in slot order (filler after them)
    unm_keep: torch.Tensor   # (B, Tu) bool: False for filler (an A-slot that was merged or invalid)
    merged: torch.Tensor     # (B, Ta) bool: A-slot merged into its partner
    dst_idx: torch.Tensor    # (B, Ta) partner in B of each A-slot
    distill: bool            # keep slot 1 (a distillation token) at slot 1
    tb: int                  # slots in B
    order: torch.Tensor | None = None  # (B, T') compaction applied after the merge (valid slots first)

    @property
    def width(self) -> int:
        """Slots after the merge."""
        return self.unm_idx.shape[1] + self.tb


def bipartite_soft_matching(
    metric: torch.Tensor,                 # (B, T, C) e.g. keys averaged over heads
    r: int | torch.Tensor,                # tokens to merge: one int, or (B,) per row
    protected: int = 1,                   # leading slots never merged: 1 = [CLS], 2 = [CLS] + distillation
    valid: torch.Tensor | None = None,    # (B, T) bool; None = all valid
    protect: torch.Tensor | None = None,  # (B, T) bool: more slots never merged nor merged into (e.g. [SEP])
    threshold: float | None = None,       # merge only pairs whose cosine is >= threshold (input-adaptive r)
) -> Merge:
    """ToMe's matching: A = even slots, B = odd slots; each A slot's best B partner by cosine; the
    `r` A slots with the best matches merge (with `threshold`, only those of them at least that similar).
    A row merges at most half its valid unprotected tokens. Protected slots (0, and 1 when protected=2)
    are neither merged nor merge targets."""
    if protected not in (0, 1, 2):
        raise ConfigError(f"protected must be 0, 1 or 2 leading tokens, got {protected!r}")
    b, t, _ = metric.shape
    device = metric.device
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        a, bb = metric[:, ::2], metric[:, 1::2]
        va, vb = valid[:, ::2], valid[:, 1::2]
        ta, tb = a.shape[1], bb.shape[1]
        scores = a @ bb.transpose(-1, -2)                                     # (B, Ta, Tb)
        col_ok = vb.clone()
        if protect is not None:
            col_ok &= ~protect[:, 1::2]
        if protected == 2 and tb > 0:
            col_ok[:, 0] = False                                              # slot 1: distillation
        scores = scores.masked_fill(~col_ok[:, None, :], -math.inf)
        node_max, node_idx = scores.max(dim=-1) if tb > 0 else (
            torch.full((b, ta), -math.inf, device=device), torch.zeros(b, ta, dtype=torch.long, device=device))
        candidate = va.clone()
        if protected >= 1 and ta > 0:
            candidate[:, 0] = False                                           # slot 0: [CLS]
        if protect is not None:
            candidate &= ~protect[:, ::2]
        candidate &= torch.isfinite(node_max)
        if threshold is not None:
            candidate &= node_max >= threshold
        n_valid = valid.sum(-1)
        n_protected = protected + (protect & valid).sum(-1) if protect is not None else protected
        rows = torch.as_tensor(r, device=device).expand(b).long()
        cap = torch.minimum((n_valid - n_protected).clamp(min=0) // 2, candidate.sum(-1))
        rows = torch.minimum(rows, cap)
        ranked = node_max.masked_fill(~candidate, -math.inf)
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(ta, device=device).expand(b, -1))
        merged = candidate & (rank < rows[:, None])
        removed = merged | ~va                                                # invalid A slots go for free
        width = ta - int(removed.sum(-1).min()) if b else ta
        slot = torch.arange(ta, device=device).expand(b, -1)
        key = removed.long() * ta + slot                                      # stay first, in slot order
        unm_idx = key.argsort(dim=-1)[:, :width]                              # (B, Tu)
        unm_keep = ~removed.gather(1, unm_idx)
    return Merge(unm_idx, unm_keep, merged, node_idx, distill=protected == 2, tb=tb)


def _apply(m: Merge, x: torch.Tensor) -> torch.Tensor:
    """Sum-merge x (B, T, C): unmerged A slots (zeroed filler) then B slots plus what merged into them."""
    src, dst = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    unm = src.gather(1, m.unm_idx[:, :, None].expand(-1, -1, c)) * m.unm_keep[:, :, None].to(x.dtype)
    moving = src * m.merged[:, :, None].to(x.dtype)
    dst = dst.scatter_add(1, m.dst_idx[:, :, None].expand(-1, -1, c), moving)
    out = torch.cat([unm, dst], dim=1)
    if m.distill and unm.shape[1] > 0 and dst.shape[1] > 0:
        tu = unm.shape[1]
        perm = torch.cat([torch.tensor([0, tu], device=x.device), torch.arange(1, tu, device=x.device),
                          torch.arange(tu + 1, out.shape[1], device=x.device)])
        out = out[:, perm]
    if m.order is not None:
        out = out.gather(1, m.order[:, :, None].expand(-1, -1, c))
    return out


def merge_wavg(m: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average: x (B, T, C), size (B, T) -> merged x (B, T', C) and size (B, T').
    A merged slot holds sum(size_i * x_i) / sum(size_i); invalid and filler slots get size 0, x 0."""
    if size is None:
        size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    size = size.to(x.dtype)
    new_size = _apply(m, size[:, :, None])[..., 0]
    new_x = _apply(m, x * size[:, :, None]) / new_size.clamp(min=1e-6)[:, :, None]
    return new_x, new_size


def merge_valid(m: Merge, valid: torch.Tensor) -> torch.Tensor:
    """Validity after the merge: a B slot keeps its own; an A slot stays valid unless merged/filler."""
    ones = _apply(m, valid[:, :, None].float())[..., 0]
    return ones > 0


def slot_map(m: Merge, t: int) -> torch.Tensor:
    """(B, T) long: the slot after the merge that each slot before it went to (-1: removed, i.e. an
    invalid A slot)."""
    b = m.unm_idx.shape[0]
    device = m.unm_idx.device
    ta, tu, tb = m.merged.shape[1], m.unm_idx.shape[1], m.tb
    new_a = torch.full((b, ta), -1, dtype=torch.long, device=device)
    new_a.scatter_(1, m.unm_idx, torch.where(m.unm_keep, torch.arange(tu, device=device).expand(b, -1), -1))
    new_a = torch.where(m.merged, tu + m.dst_idx, new_a)
    new_b = (tu + torch.arange(tb, device=device)).expand(b, -1)
    mapping = torch.empty(b, t, dtype=torch.long, device=device)
    mapping[:, ::2] = new_a
    mapping[:, 1::2] = new_b
    width = tu + tb
    if m.distill and tu > 0 and tb > 0:         # the permutation of `_apply`, inverted
        perm = torch.cat([torch.tensor([0, tu], device=device), torch.arange(1, tu, device=device),
                          torch.arange(tu + 1, width, device=device)])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(width, device=device)
        mapping = torch.where(mapping >= 0, inverse[mapping.clamp(min=0)], mapping)
    if m.order is not None:
        inverse = torch.full((b, width), -1, dtype=torch.long, device=device).scatter_(
            1, m.order, torch.arange(m.order.shape[1], device=device).expand(b, -1))
        mapping = torch.where(mapping >= 0, inverse.gather(1, mapping.clamp(min=0)), mapping)
    return mapping


def unmerge(m: Merge, x: torch.Tensor, t: int) -> torch.Tensor:
    """Merge-and-unmerge (ToMe for Stable Diffusion): spread x (B, T', C), computed on the slots after
    the merge `m`, back over the `t` slots before it. Every slot receives the row of the slot it went
    into, so each token of a merged group gets the group's output and an unmerged token its own; a slot
    the merge removed (an invalid A slot: padding or filler) gets 0."""
    mapping = slot_map(m, t)
    c = x.shape[-1]
    out = x.gather(1, mapping.clamp(min=0)[:, :, None].expand(-1, -1, c))
    return out.masked_fill((mapping < 0)[:, :, None], 0)


def unmerge_schedule(n_tokens: int, num_layers: int, keep: float, protected: int = 1,
                     costs: tuple[float, float] = (1.0, 1.0)) -> list[tuple[int, int]]:
    """(r before the attention block, r before the MLP) at each layer, for merge-and-unmerge on a dense
    row of `n_tokens`: the residual stream keeps every token, so each block merges from the full row
    and the work done is ``sum(n - r * cost) / (2 n L)`` over the 2L blocks, where `costs` says which
    share of a block's token work one merged token saves (attention, MLP; 0 = that block never merges,
    0.5 = only half of its projections run on the merged tokens). Returns the schedule removing the most
    work whose share done is still >= keep (a trim never does less work than asked), spread as evenly as
    possible over the merging blocks, each capped at half its unprotected tokens."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep!r}")
    return list(_unmerge_schedule(int(n_tokens), int(num_layers), float(keep), int(protected),
                                  tuple(float(c) for c in costs)))


@functools.lru_cache(maxsize=4096)
def _unmerge_schedule(n: int, num_layers: int, keep: float, protected: int,
                      costs: tuple[float, float]) -> tuple[tuple[int, int], ...]:
    cap = max(0, (n - protected) // 2)
    blocks = [(layer, kind) for layer in range(num_layers) for kind in (0, 1) if costs[kind] > 0]
    budget = (1.0 - keep) * 2.0 * n * num_layers + 1e-9        # token-block work that may be removed
    rs = [[0, 0] for _ in range(num_layers)]
    spent = 0.0
    progress = True
    while progress:                                            # one more token per block, round-robin
        progress = False
        for layer, kind in blocks:
            if rs[layer][kind] < cap and spent + costs[kind] <= budget:
                rs[layer][kind] += 1
                spent += costs[kind]
                progress = True
    return tuple((a, m) for a, m in rs)


def merge_owner(m: Merge, owner: torch.Tensor, t: int) -> torch.Tensor:
    """Update an owner map (B, N): input token -> slot holding it (-1 stays -1)."""
    mapping = slot_map(m, t)
    return torch.where(owner >= 0, mapping.gather(1, owner.clamp(min=0)), owner)


def set_compaction(m: Merge, new_valid: torch.Tensor) -> torch.Tensor:
    """Record on `m` an order putting each row's valid slots first (stable), cutting the columns that
    are invalid in every row, and return the validity after it. Call with what `merge_valid` gave,
    before applying `m` to anything."""
    width = int(new_valid.sum(-1).max()) if new_valid.numel() else 0
    order = (~new_valid).to(torch.int8).argsort(dim=-1, stable=True)[:, :max(width, 1)]
    m.order = order
    return new_valid.gather(1, order)


def source_matrix(owner: torch.Tensor, width: int) -> torch.Tensor:
    """ToMe's source tracking in matrix form: (B, T', N) with 1 where slot t' holds input token n."""
    b, n = owner.shape
    src = torch.zeros(b, width + 1, n, dtype=torch.bool, device=owner.device)
    idx = torch.where(owner >= 0, owner, width)
    src.scatter_(1, idx[:, None, :], True)
    return src[:, :width]


# ---- attention helpers ----------------------------------------------------------------------------
def attention_bias(size: torch.Tensor, prop_attn: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, T) additive bias for the attention logits: log(size) with proportional attention (0 for
    size 1), and the dtype's minimum for invalid slots (size 0)."""
    low = torch.finfo(dtype).min
    if prop_attn:
        bias = torch.where(size > 0, size.clamp(min=1e-6).log(), torch.full_like(size, low))
    else:
        bias = torch.where(size > 0, torch.zeros_like(size), torch.full_like(size, low))
    return bias.to(dtype)[:, None, None, :]


def cls_attention(query0: torch.Tensor, key: torch.Tensor, scaling: float,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the [CLS] query over the keys, averaged over heads: query0 (B, H, hd),
    key (B, H, T, hd), bias (B, 1, 1, T) or None -> (B, T), rows sum to 1."""
    logits = torch.einsum("bhd,bhtd->bht", query0.float(), key.float()) * scaling
    if bias is not None:
        logits = logits + bias[:, :, 0, :].float()
    return logits.softmax(-1).mean(1)


def ats_scores(cls_attn: torch.Tensor, value_norm: torch.Tensor) -> torch.Tensor:
    """ATS significance: [CLS] attention x value norm (B, T)."""
    return cls_attn * value_norm


def ats_counts(scores: torch.Tensor, candidate: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Adaptive token sampling by inverse transform sampling (deterministic, evenly spaced quantiles).

    Over each row's candidate tokens, scores normalised to a distribution and sorted ascending form a
    CDF; `samples[b]` points (i + 0.5) / K pick the tokens whose CDF interval they fall in. Duplicate
    picks collapse, so a peaked distribution keeps fewer tokens than K. Returns (B,) distinct tokens
    picked (0 for a row with no candidate or K = 0)."""
    s = scores.float().clamp(min=0).masked_fill(~candidate, 0.0)
    total = s.sum(-1, keepdim=True)
    uniform = candidate.float() / candidate.sum(-1, keepdim=True).clamp(min=1)
    p = torch.where(total > 0, s / total.clamp(min=1e-30), uniform)
    p = p.sort(dim=-1).values
    cdf = p.cumsum(-1).clamp(max=1.0)
    k = samples.float()[:, None]
    hits = lambda c: torch.ceil(c * k - 0.5 - 1e-6).clamp(min=0)          # points (i+.5)/K below c
    upper = hits(cdf).minimum(k)
    lower = hits(torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], -1)).minimum(k)
    picked = (upper > lower) & (p > 0)
    return picked.sum(-1)
