"""Adapter for diffusers denoisers: token merging (ToMe for Stable Diffusion) in their transformer blocks.

Takes `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / SDXL), `PixArtTransformer2DModel`,
`DiTTransformer2DModel` and `Transformer2DModel`: every model whose transformer blocks are diffusers'
`BasicTransformerBlock`. In each block whose token grid is at most `max_downsample` times coarser than the
model's finest grid, a share `reduction_ratio` of the latent tokens is merged (`ops/grid_merge.py`; with
``adaptive=True`` only tokens at least `merge_threshold` alike, up to that share) before the parts named in
`merge_parts` (self-attention, cross-attention's queries, the MLP) and their outputs
are unmerged, so the residual stream keeps every token. Everything is forward hooks on the denoiser, its
blocks and their parts: `untrim` removes them and the model is exactly as before. A pipeline
(`trim(pipe, ...)`) is trimmed through its `unet` or `transformer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, TrimformerError
from ..ops.grid_merge import GridMerge, grid_partition, grid_shape, match, merge_mean, unmerge
from .base import Patch

DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "DiTTransformer2DModel", "Transformer2DModel")
PARTS = {"self_attention": "attn1", "cross_attention": "attn2", "mlp": "ff"}


def denoiser_of(obj: Any) -> Any:
    """The denoiser of a diffusers pipeline (its `unet` or `transformer`), or `obj` itself."""
    if isinstance(obj, torch.nn.Module):
        return obj
    for name in ("unet", "transformer"):
        part = getattr(obj, name, None)
        if isinstance(part, torch.nn.Module):
            return part
    return obj


@dataclass
class BlockRecord:
    """What one transformer block did in the last forward."""

    name: str
    tokens: int               # latent tokens entering the block
    grid: tuple[int, int]     # their h x w grid
    downsample: int           # how much coarser than the finest grid
    merged: int               # tokens merged away per row (0: the block did not merge)
    parts: tuple[str, ...]    # the parts that ran on merged tokens
    flops_full: float         # analytic FLOPs of the block's linear layers and attention, whole batch
    flops_trimmed: float      # the same with the merged parts on fewer tokens, plus the matching
    slot: torch.Tensor | None = None      # (B, N) merged slot of each token, kept with trace_source=True
    dst: torch.Tensor | None = None       # (Nd,) the destinations' token positions, with trace_source=True


@dataclass
class ForwardState:
    grid: tuple[int, int]                   # the finest token grid of this forward
    generator: torch.Generator | None
    blocks: list[BlockRecord] = field(default_factory=list)


class DiffusionPatch(Patch):
    kind = "diffusion"
    architectures = DENOISERS

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("diffusers.") and type(model).__name__ in DENOISERS

    @classmethod
    def layers(cls, model: torch.nn.Module) -> list[torch.nn.Module]:
        from diffusers.models.attention import BasicTransformerBlock

        return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]

    def __init__(self, model: torch.nn.Module, config, method, plan: dict[int, float]):
        super().__init__(model, config, method, plan)
        merge = config.merge
        if merge.r is not None:
            raise ConfigError("diffusion models merge a share of each block's tokens: give reduction_ratio (or "
                              "keep), not r")
        adaptive = config.adaptive
        if adaptive.enabled and adaptive.mode == "mass":
            raise ConfigError("adaptive_mode 'mass' keeps tokens by attention mass when dropping; on a diffusion "
                              "model adaptive=True merges by similarity (adaptive_mode 'similarity' or the default)")
        # adaptive=True: merge only sources at least merge_threshold alike, at most the share reduction_ratio
        self.threshold = adaptive.merge_threshold if adaptive.enabled else None
        self.ratio = 1.0 - config.keep if config.keep is not None else 0.5
        self.parts = tuple(merge.merge_parts)
        self.patch_size = int(getattr(model.config, "patch_size", None) or 1)
        blocks = set(self.layers(model))
        self.blocks = {block: name for name, block in model.named_modules() if block in blocks}
        if not self.blocks:
            raise ConfigError(f"{type(model).__name__} has no BasicTransformerBlock to merge tokens in")
        self.state: ForwardState | None = None
        self.last: ForwardState | None = None
        self.current: tuple[GridMerge, int] | None = None     # the merge of the block running, and its N
        self.pending: dict[int, GridMerge] = {}                # id(part) -> the merge its output undoes
        self.roles = {id(getattr(block, PARTS[part])): part for block in self.blocks for part in self.parts
                      if getattr(block, PARTS[part], None) is not None}   # id(part) -> its name in PARTS

    # ---- hooks ---------------------------------------------------------------------------------
    def _install(self) -> None:
        self.hooks.add(self.model.register_forward_pre_hook(self._start, with_kwargs=True))
        self.hooks.add(self.model.register_forward_hook(self._end))
        for block in self.blocks:
            self.hooks.add(block.register_forward_pre_hook(self._block_start, with_kwargs=True))
            self.hooks.add(block.register_forward_hook(self._block_end))
            for part in self.parts:
                module = getattr(block, PARTS[part], None)
                if module is not None:
                    self.hooks.add(module.register_forward_pre_hook(self._part_start, with_kwargs=True))
                    self.hooks.add(module.register_forward_hook(self._part_end))

    def _start(self, module, args, kwargs) -> None:
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            raise TrimformerError(f"{type(module).__name__} was called without a (batch, channels, height, width) "
                                  "latent; token merging needs the latent grid")
        h, w = sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size
        generator = None
        if self.config.merge.random_destinations:
            generator = torch.Generator().manual_seed(self._seed(kwargs.get("timestep", args[1] if len(args) > 1
                                                                             else None)))
        self.state = ForwardState((h, w), generator)
        self.pending.clear()                  # left over only if the previous forward raised

    def _seed(self, timestep: Any) -> int:
        """The destinations are drawn per denoising step: seeded by `seed` and the step's timestep, so a
        run repeats exactly and each step merges on a different grid."""
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            timestep = float(timestep.flatten()[0])
        step = int(round(float(timestep) * 1000)) if isinstance(timestep, (int, float)) else 0
        return (self.config.seed * 1_000_003 + step) % (2 ** 63)

    def _end(self, module, args, output) -> None:
        self.last, self.state, self.current = self.state, None, None
        self.pending.clear()

    def _block_start(self, block, args, kwargs) -> None:
        state = self.state
        x = args[0] if args else kwargs.get("hidden_states")
        if state is None or x is None or x.dim() != 3:   # a block called outside the denoiser's forward
            self.current = None
            return
        n = x.shape[1]
        level = grid_shape(n, *state.grid)
        downsample, h, w = level if level is not None else (0, 0, 0)
        merging = self.ratio > 0 and level is not None and downsample <= self.config.merge.max_downsample
        r = int(n * self.ratio) if merging else 0
        self.current = None
        if r > 0:
            stride = self.config.merge.stride
            dst, src = grid_partition(h, w, stride, stride, state.generator, x.device)
            m = match(x, dst, src, r, self.threshold)
            r = m.merged
            self.current = (m, n) if r > 0 else None     # adaptive: no pair alike enough, nothing to merge
        parts = self.parts if r > 0 else ()
        full, trimmed = block_flops(block, x.shape[0], n, n - r, parts, kwargs.get("encoder_hidden_states"))
        if r > 0:                                   # the matching: each source's cosine to every destination
            trimmed += 2.0 * x.shape[0] * src.shape[0] * dst.shape[0] * x.shape[2]
        record = BlockRecord(self.blocks[block], n, (h, w), downsample, r, parts, full, trimmed)
        if self.current is not None and self.config.merge.trace_source:
            record.slot, record.dst = self.current[0].slot.cpu(), self.current[0].dst_pos.cpu()
        state.blocks.append(record)

    def _block_end(self, block, args, output) -> None:
        self.current = None

    def _part_start(self, module, args, kwargs):
        if self.current is None:
            return None
        m, n = self.current
        x = args[0] if args else kwargs.get("hidden_states")
        if x is None or x.dim() != 3 or x.shape[1] != n:     # a chunked MLP sees parts of the tokens: run as is
            return None
        if self.roles[id(module)] == "self_attention" and kwargs.get("attention_mask") is not None:
            raise TrimformerError("self-attention was given an attention mask over the latent tokens; token "
                                  "merging cannot keep such a mask: untrim the model or merge other parts")
        self.pending[id(module)] = m
        merged = merge_mean(m, x)
        if args:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": merged}

    def _part_end(self, module, args, output):
        m = self.pending.pop(id(module), None)
        if m is None:
            return None
        if isinstance(output, tuple):
            return (unmerge(m, output[0]), *output[1:])
        return unmerge(m, output)

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        state = self.last
        if state is None:
            raise TrimformerError("no forward has run since trim(); stats describe the last forward")
        full = sum(b.flops_full for b in state.blocks)
        trimmed = sum(b.flops_trimmed for b in state.blocks)
        work_full = sum(b.tokens * max(len(self.parts), 1) for b in state.blocks)
        work_done = sum(b.tokens * max(len(self.parts), 1) - b.merged * len(b.parts) for b in state.blocks)
        return {
            "method": self.config.method,
            "architecture": type(self.model).__name__,
            "reduction_ratio": self.ratio,
            "adaptive": self.threshold is not None,
            "merge_parts": list(self.parts),
            "max_downsample": self.config.merge.max_downsample,
            "grid": list(state.grid),
            "blocks": [{"block": b.name, "tokens": b.tokens, "grid": list(b.grid), "downsample": b.downsample,
                        "merged": b.merged, "kept_tokens": b.tokens - b.merged, "parts": list(b.parts)}
                       for b in state.blocks],
            "merging_blocks": sum(1 for b in state.blocks if b.merged),
            "kept_fraction": work_done / work_full if work_full else 1.0,
            "flops_full": full,
            "flops_trimmed": trimmed,
            "flop_ratio": full / trimmed if trimmed else 1.0,
        }


def block_flops(block: torch.nn.Module, batch: int, n: int, kept: int, parts: tuple[str, ...],
                context: torch.Tensor | None) -> tuple[float, float]:
    """Analytic FLOPs (2 per multiply-add) of a BasicTransformerBlock's linear layers and attention on
    `batch` rows of `n` tokens, full and with the parts in `parts` on `kept` tokens."""
    def linear(module: torch.nn.Module | None) -> float:      # per token
        if module is None:
            return 0.0
        return float(sum(2 * m.in_features * m.out_features for m in module.modules()
                         if isinstance(m, torch.nn.Linear)))

    def attention(attn, tokens: int, keys: int) -> float:
        inner = attn.to_q.out_features
        q_o = 2.0 * tokens * (attn.to_q.in_features + attn.to_out[0].out_features) * inner
        k_v = 2.0 * keys * (attn.to_k.in_features + attn.to_v.in_features) * inner
        return q_o + k_v + 4.0 * tokens * keys * inner

    m = context.shape[1] if isinstance(context, torch.Tensor) and context.dim() == 3 else 77
    full = trimmed = 0.0
    if block.attn1 is not None:
        t = kept if "self_attention" in parts else n
        keys1 = m if block.only_cross_attention else None
        full += attention(block.attn1, n, keys1 or n)
        trimmed += attention(block.attn1, t, keys1 or t)
    if getattr(block, "attn2", None) is not None:
        t = kept if "cross_attention" in parts else n
        full += attention(block.attn2, n, m)
        trimmed += attention(block.attn2, t, m)
    ff = linear(getattr(block, "ff", None))
    full += n * ff
    trimmed += (kept if "mlp" in parts else n) * ff
    return batch * full, batch * trimmed
