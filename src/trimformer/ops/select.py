"""Keep policies: turn scores into a keep set. Pure functions, tensors in and tensors out."""

from __future__ import annotations

import math

import torch


def ratio_counts(n_valid: torch.Tensor, ratio: float, n_protected: torch.Tensor) -> torch.Tensor:
    """(B,) tokens to keep per row: ceil(ratio * live tokens), never fewer than the protected ones."""
    counts = torch.ceil(n_valid.double() * ratio - 1e-9).long()
    return torch.maximum(counts, n_protected).minimum(n_valid)


def mass_counts(
    scores: torch.Tensor,     # (B, K) non-negative importance
    valid: torch.Tensor,      # (B, K) bool
    mass: float,
    n_protected: torch.Tensor,  # (B,)
) -> torch.Tensor:            # (B,)
    """Adaptive: the smallest number of tokens whose scores hold `mass` of the row's total."""
    s = scores.clamp(min=0).masked_fill(~valid, 0.0)
    total = s.sum(-1, keepdim=True).clamp(min=1e-12)
    cumulative = (s.sort(dim=-1, descending=True).values / total).cumsum(-1)      # (B, K)
    counts = (cumulative < mass - 1e-6).sum(-1) + 1
    return torch.maximum(counts, n_protected).minimum(valid.sum(-1))


def select(
    scores: torch.Tensor,     # (B, K)
    valid: torch.Tensor,      # (B, K) bool: real tokens (padding and empty slots are False)
    protected: torch.Tensor,  # (B, K) bool: always kept
    counts: torch.Tensor,     # (B,) how many to keep per row
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`counts[b]` tokens of each row, in their original order.

    Returns ``index`` (B, K') into the K slots, sorted ascending, with K' = max(counts), and
    ``kept`` (B, K') bool: False for filler slots of rows that keep fewer than K' tokens. Ties break
    by slot order, and filler comes from padding slots first, so a row chooses the same tokens
    whatever the rest of its batch looks like.
    """
    width = int(counts.max().item()) if counts.numel() else 0
    ranked = scores.float().masked_fill(protected & valid, math.inf).masked_fill(~valid, -math.inf)
    order = ranked.sort(dim=-1, descending=True, stable=True).indices        # (B, K) best first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen = (rank < counts[:, None]) & valid                                 # (B, K)
    # priority: chosen tokens, then padding slots as filler, then unchosen real tokens
    priority = chosen.long() * 2 + (~valid).long()
    top = priority.sort(dim=-1, descending=True, stable=True).indices[:, :width]
    index = top.sort(dim=-1).values
    return index, chosen.gather(1, index)


def eviction_mask(
    scores: torch.Tensor,      # (B, K) accumulated attention of each cache slot
    valid: torch.Tensor,       # (B, K) bool
    protected: torch.Tensor,   # (B, K) bool: sinks and recent tokens, never evicted
    target: torch.Tensor,      # (B,) live slots to keep at most (budget); K or more means no budget
    threshold: float,          # also evict slots scoring below threshold x uniform (1 / live slots)
) -> torch.Tensor:             # (B, K) bool: slots to evict
    """Decode-time eviction: the lowest-scoring unprotected slots beyond the budget, and any slot
    under the relative threshold. Ties break by slot order."""
    n_live = valid.sum(-1, keepdim=True).clamp(min=1)
    candidate = valid & ~protected
    below = candidate & (scores * n_live < threshold)
    over = (n_live[:, 0] - below.sum(-1) - target).clamp(min=0)          # (B,) still to evict for budget
    k = int(over.max()) if over.numel() else 0
    if k == 0:
        return below
    # the over[b] lowest of the rest, found without sorting the cache: the over[b]-th lowest score is the
    # row's cut; slots under it go, and of the slots equal to it the first ones in slot order
    ranked = scores.float().masked_fill(~candidate | below, float("inf"))
    cut = ranked.topk(min(k, ranked.shape[1]), dim=-1, largest=False).values                # (B, k) ascending
    cut = cut.gather(1, (over - 1).clamp(min=0, max=cut.shape[1] - 1)[:, None])              # (B, 1)
    under, tie = ranked < cut, ranked == cut
    room = over[:, None] - under.sum(-1, keepdim=True)                                     # ties to take
    budget_cut = candidate & ~below & (under | (tie & (tie.cumsum(-1) <= room)))
    return below | budget_cut


def compaction_moves(keep: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Pack the kept slots of each row into the first `width` slots by moving as few as possible.

    keep (B, K) bool -> ``width`` (the most slots any row keeps), ``dst`` and ``src`` (B, M): slot
    ``src[b, j]`` moves to slot ``dst[b, j]``, a hole (a slot not kept) before ``width``. Only kept slots
    at or after ``width`` move, so evicting a few slots moves a few; pairs a row does not need have
    ``src == dst`` (a slot copied onto itself). After the moves, the first ``width`` slots hold every kept
    slot of each row (rows keeping fewer have holes left there, to be masked as filler).
    """
    widths, moves, dst, src = grouped_compaction_moves(keep, keep.shape[0])
    return widths[0], dst, src


def grouped_compaction_moves(keep: torch.Tensor, group: int) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """`compaction_moves` for G groups of `group` consecutive rows at once (e.g. the rows of G layers' caches,
    stacked): each group packs into its own width.

    keep (G * group, K) bool -> ``widths`` and ``moves`` (G ints: the group's width and its most moves in a
    row), ``dst`` and ``src`` (G * group, max moves). A group's pairs are its rows' first ``moves[g]``
    columns: exactly what `compaction_moves` gives that group's rows alone (the columns after them copy a
    slot onto itself).
    """
    counts = keep.sum(-1)                                                        # (R,) kept per row
    widths_t = counts.view(-1, group).amax(-1) if keep.shape[0] else counts      # (G,)
    before = torch.arange(keep.shape[1], device=keep.device) < widths_t.repeat_interleave(group)[:, None]
    tail = keep & ~before                                                        # kept slots at or after the width
    n_moves = tail.sum(-1)                                                       # (R,)
    moves_t = n_moves.view(-1, group).amax(-1) if keep.shape[0] else n_moves     # (G,)
    widths, moves = torch.stack([widths_t, moves_t]).tolist()                    # one sync
    m = max(moves, default=0)
    first = lambda mask: torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :m]
    dst = first(~keep & before)                                                  # (R, M) holes, in slot order
    src = first(tail)                                                            # (R, M) kept tail slots
    needed = torch.arange(m, device=keep.device)[None, :] < n_moves[:, None]
    return widths, moves, dst, torch.where(needed, src, dst)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Q, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def last_valid_slots(valid: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """valid (B, Q) -> (index (B, W), in_window (B, W)): each row's last `window` valid slots, in order
    (rows with fewer valid slots are filled with slots flagged False)."""
    width = min(window, valid.shape[1])
    from_end = valid.flip(-1).cumsum(-1).flip(-1)                      # valid slots at or after i
    in_window = valid & (from_end <= width)
    slot = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    index = torch.where(in_window, slot, -1).topk(width, dim=-1).indices.sort(dim=-1).values
    return index, in_window.gather(1, index)
