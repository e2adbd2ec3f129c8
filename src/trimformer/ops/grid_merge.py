"""Token merging on a latent grid (ToMe for Stable Diffusion): pure tensor functions.

ToMe for Stable Diffusion (Bolya & Hoffman, 2023) merges a block's tokens for its computation only: the
grid of H x W latent tokens is cut into sy x sx cells, one token per cell (at a random place, or the
cell's first) becomes a *destination*, the others are *sources*; each source is matched to its most
similar destination (cosine), and the `r` best-matched sources are averaged into their destinations.
The block computes on the N - r merged tokens and `unmerge` copies each output back onto every token
it came from, so the residual stream keeps all N tokens.

Shapes: B rows, N = H * W tokens in row-major order, C channels. The partition is shared by the rows of
a batch (as the rows of classifier-free guidance see the same latent grid); the matching is per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class GridMerge:
    """One block's merge: apply it with `merge_mean`, undo it with `unmerge`.

    The merged layout is the unmerged sources (in the order of `unm_pos`) then every destination."""

    unm_pos: torch.Tensor    # (B, Nu) token positions of the sources that stay
    dst_pos: torch.Tensor    # (Nd,) token positions of the destinations
    src_pos: torch.Tensor    # (B, r) token positions of the sources merged away
    src_dst: torch.Tensor    # (B, r) the destination (0..Nd-1) each of them merges into
    slot: torch.Tensor       # (B, N) the merged slot holding each token

    @property
    def width(self) -> int:
        """Tokens after the merge (N - r)."""
        return self.unm_pos.shape[1] + self.dst_pos.shape[0]

    @property
    def merged(self) -> int:
        """Tokens merged away per row (r)."""
        return self.src_pos.shape[1]


def grid_partition(h: int, w: int, sx: int = 2, sy: int = 2, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Split the positions of an h x w grid into destinations (one per whole sy x sx cell: a random cell
    position drawn from `generator`, or the cell's first with None) and sources (every other position,
    including the rows and columns left over when sy or sx does not divide the grid). Returns
    (dst_pos (Nd,), src_pos (Ns,)) in row-major token order."""
    if sx < 1 or sy < 1:
        raise ConfigError(f"the merge stride must be >= 1, got sx={sx}, sy={sy}")
    hc, wc = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hc, wc, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hc, wc), generator=generator, device=generator.device).cpu()
    cell_y = torch.arange(hc)[:, None] * sy + pick // sx              # (hc, wc) row of each destination
    cell_x = torch.arange(wc)[None, :] * sx + pick % sx               # (hc, wc) column
    dst = (cell_y * w + cell_x).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst] = True
    src = (~is_dst).nonzero().flatten()
    return dst.sort().values.to(device), src.to(device)


def match(metric: torch.Tensor, dst_pos: torch.Tensor, src_pos: torch.Tensor, r: int,
          threshold: float | None = None) -> GridMerge:
    """Match every source of metric (B, N, C) to its most similar destination (cosine) and merge the `r`
    best-matched sources (at most all of them). With `threshold`, only sources at least that similar to
    their destination merge, as many in every row (the fewest any row has), so the rows stay aligned."""
    b, n, c = metric.shape
    r = max(0, min(int(r), src_pos.shape[0]))
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        src, dst = metric[:, src_pos], metric[:, dst_pos]              # (B, Ns, C), (B, Nd, C)
        best, partner = (src @ dst.transpose(-1, -2)).max(dim=-1)      # (B, Ns)
        if threshold is not None:
            r = min(r, int((best >= threshold).sum(-1).min()))
        rank = best.argsort(dim=-1, descending=True, stable=True)      # (B, Ns) best matches first
        merged, stay = rank[:, :r], rank[:, r:].sort(dim=-1).values
        nu, nd = stay.shape[1], dst_pos.shape[0]
        unm_pos = src_pos[stay]                                        # (B, Nu)
        src_merged = src_pos[merged]                                   # (B, r)
        src_dst = partner.gather(1, merged)                            # (B, r)
        slot = torch.empty(b, n, dtype=torch.long, device=metric.device)
        rows = torch.arange(b, device=metric.device)[:, None]
        slot[rows, unm_pos] = torch.arange(nu, device=metric.device).expand(b, -1)
        slot[:, dst_pos] = torch.arange(nu, nu + nd, device=metric.device)
        slot[rows, src_merged] = nu + src_dst
    return GridMerge(unm_pos, dst_pos, src_merged, src_dst, slot)


def merge_mean(m: GridMerge, x: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) -> (B, N - r, C): the unmerged sources, then each destination averaged with the sources
    merged into it."""
    c = x.shape[-1]
    unm = x.gather(1, m.unm_pos[:, :, None].expand(-1, -1, c))
    dst = x[:, m.dst_pos]
    if m.merged:
        moving = x.gather(1, m.src_pos[:, :, None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, m.src_dst[:, :, None].expand(-1, -1, c), moving, reduce="mean",
                                 include_self=True)
    return torch.cat([unm, dst], dim=1)


def unmerge(m: GridMerge, x: torch.Tensor) -> torch.Tensor:
    """x (B, N - r, C), computed on the merged tokens -> (B, N, C): every token gets its slot's output."""
    return x.gather(1, m.slot[:, :, None].expand(-1, -1, x.shape[-1]))


def grid_shape(tokens: int, height: int, width: int) -> tuple[int, int, int] | None:
    """The (downsample, h, w) of a block's token grid, from its token count and the finest grid's
    height x width (each level halves both sides, rounding up); None when no level matches."""
    factor = 1
    while factor <= max(height, width):
        h, w = -(-height // factor), -(-width // factor)
        if h * w == tokens:
            return factor, h, w
        factor *= 2
    return None
