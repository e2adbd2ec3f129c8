"""The live tokens of one encoder forward (`Live`), what the forward did (`EncoderState`, for `stats`
and the visualisations), and the FLOPs of encoder layers.

A slot is a position of the hidden states between layers; an input token is one of the forward's inputs.
Merging puts several input tokens in one slot, dropping takes a token's slot away (its hidden state waits
in `stash` and becomes its output), padding and filler are invalid slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import InputError


@dataclass
class Live:
    """The slots of the forward in flight and the input tokens they hold."""

    valid: torch.Tensor | None          # (B, T) bool
    size: torch.Tensor | None = None    # (B, T) float: input tokens each slot holds
    owner: torch.Tensor | None = None   # (B, N) slot holding each input token, -1 dropped
    stash: torch.Tensor | None = None   # (B, N, D) hidden state of dropped input tokens
    dropped: torch.Tensor | None = None  # (B, N) bool: input token dropped (its output is in `stash`)
    reduced: bool = False               # the layout differs from the input's
    irregular: bool = False             # some slot is invalid (padding / filler) or size != 1

    def start(self, hidden: torch.Tensor) -> torch.Tensor:
        """At the first layer, whose input is `hidden` (B, T, D): every input token in its own slot.
        Returns (B,) the real tokens of each row."""
        b, t, _ = hidden.shape
        if self.valid is None:
            self.valid = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
        elif self.valid.shape != (b, t):
            raise InputError(f"attention_mask has shape {tuple(self.valid.shape)} but the input has {(b, t)} tokens")
        else:
            self.irregular = not bool(self.valid.all())
        self.owner = torch.arange(t, device=hidden.device).expand(b, -1).clone()
        lengths = self.valid.sum(-1)
        if self.irregular:
            self.owner = torch.where(self.valid, self.owner, -1)
        return lengths

    def keep_slots(self, h: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Keep slots `index` (B, K') of h (B, T, D), ascending, `kept` (B, K') False for filler; the other
        live tokens are dropped, their states stashed as their outputs. Returns the kept states and the
        number dropped."""
        b, t, d = h.shape
        valid = self.valid
        keep_mask = torch.zeros_like(valid).scatter_(1, index, kept)
        gone = valid & ~keep_mask
        n_gone = int(gone.sum())
        if n_gone:
            holder = self.owner.clamp(min=0)
            owner_gone = (self.owner >= 0) & gone.gather(1, holder)
            if self.stash is None:
                self.stash = h.new_zeros(b, self.owner.shape[1], d)
                self.dropped = torch.zeros_like(owner_gone)
            hidden_in = h.gather(1, holder[:, :, None].expand(-1, -1, d))
            self.stash = torch.where(owner_gone[:, :, None], hidden_in, self.stash)
            self.dropped = self.dropped | owner_gone
        mapping = torch.full((b, t), -1, dtype=torch.long, device=h.device)
        mapping.scatter_(1, index, torch.where(kept, torch.arange(index.shape[1], device=h.device).expand(b, -1), -1))
        self.owner = torch.where(self.owner >= 0, mapping.gather(1, self.owner.clamp(min=0)), self.owner)
        h = h.gather(1, index[:, :, None].expand(-1, -1, d))
        if self.size is not None:
            self.size = self.size.gather(1, index) * kept
        self.valid = kept
        self.reduced = True
        self.irregular = self.irregular or not bool(kept.all())
        return h, n_gone

    def keep_leading(self, h: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """Keep only the `n` leading slots ([CLS], DeiT's distillation token) of h (B, T, D)."""
        index = torch.arange(n, device=h.device).expand(h.shape[0], n)          # (B, n)
        return self.keep_slots(h, index, self.valid[:, :n])

    def positions(self, t: int) -> torch.Tensor:
        """(B, T) the first input index each slot holds (its original position)."""
        owner = self.owner
        b, n = owner.shape
        big = torch.full((b, t + 1), n, dtype=torch.long, device=owner.device)
        index = torch.where(owner >= 0, owner, t)
        src = torch.arange(n, device=owner.device).expand(b, -1)
        return big.scatter_reduce(1, index, src, reduce="amin")[:, :t].clamp(max=n - 1)

    def last_token_slots(self, lengths: torch.Tensor, t: int) -> torch.Tensor:
        """(B, T) bool: the slot holding each row's last real input token (`lengths` (B,) real tokens)."""
        last = (lengths.to(self.owner.device) - 1).clamp(min=0)
        slot = self.owner.gather(1, last[:, None])                          # (B, 1)
        out = torch.zeros(self.owner.shape[0], t, dtype=torch.bool, device=self.owner.device)
        return out.scatter_(1, slot.clamp(min=0), slot >= 0)

    def restore(self, hidden: torch.Tensor, final_norm: Callable | None) -> torch.Tensor:
        """The base model's output (B, T', D) -> one output per input token (B, N, D): the output of the slot
        a token was merged into, a dropped token's stashed state (after `final_norm`), zeros for padding."""
        dim = hidden.shape[-1]
        out = hidden.gather(1, self.owner.clamp(min=0)[:, :, None].expand(-1, -1, dim))
        if self.stash is not None:
            stash = self.stash
            if final_norm is not None:
                stash = final_norm(stash)
            stash = torch.where(self.dropped[:, :, None], stash.to(out.dtype), torch.zeros_like(out))
        else:
            stash = torch.zeros_like(out)
        return torch.where((self.owner >= 0)[:, :, None], out, stash)


def start_live(mask: torch.Tensor | None) -> Live:
    """The live tokens at the start of a forward, from a text encoder's 2-D attention_mask (None: all valid)."""
    valid = None
    if mask is not None:
        if mask.dim() != 2:
            raise InputError(
                f"a trimmed encoder takes a 2-D attention_mask (batch, length) of 0/1, got {mask.dim()}-D")
        valid = mask.bool()
        if not bool((valid.long().cumprod(-1).bool() == valid).all()):
            raise InputError(
                "a trimmed encoder takes right-padded batches (padding after the tokens, the tokenizers' "
                "default; [CLS] first): this attention_mask has padding before real tokens")
        if not bool(valid[:, 0].all()):
            raise InputError("every row needs at least its first token ([CLS]); a row of the batch is empty")
    return Live(valid)


@dataclass
class EncoderState:
    """What the last forward did (for `stats` and the visualisations)."""

    lengths: torch.Tensor                               # (B,) input tokens per row
    attn_tokens: list = field(default_factory=list)     # per layer: (B,) tokens in the attention
    mlp_tokens: list = field(default_factory=list)      # per layer: (B,) tokens in the MLP
    merged: list = field(default_factory=list)          # per layer: tokens merged (sum over rows)
    dropped: list = field(default_factory=list)         # per layer: tokens dropped (sum over rows)
    owner: torch.Tensor | None = None                   # (B, N) final slot of each input token (-1 dropped)
    owners: list = field(default_factory=list)          # per layer after reduction, if trace_source
    kept: torch.Tensor | None = None                    # (B, N) bool: input token not dropped
    kv_tokens: list = field(default_factory=list)       # per layer: (B,) tokens whose keys/values are computed
    merge_flops: float = 0.0                            # cost of the similarity matching (bipartite scores)

    def summary(self, config) -> dict[str, Any]:
        """Tokens per layer, work done and FLOPs of the forward (`config`: the encoder's model config)."""
        lengths = [int(n) for n in self.lengths]
        attn = torch.stack(self.attn_tokens)                     # (L, B) queries (and o projection)
        kv = torch.stack(self.kv_tokens) if self.kv_tokens else attn      # (L, B) keys / values
        mlp = torch.stack(self.mlp_tokens)
        full = torch.tensor(lengths)[None].expand_as(attn)
        flops_full = encoder_flops(config, full, full)
        flops_trimmed = encoder_flops(config, attn, mlp, kv) + int(self.merge_flops)
        total = 2 * int(full.sum())
        done = float(attn.sum() + kv.sum()) / 2 + int(mlp.sum())    # attention: half q/o, half k/v
        return {
            "prompt_tokens": lengths,
            "input_tokens": lengths,
            "kept_tokens_per_layer": attn.sum(-1).tolist(),
            "mlp_tokens_per_layer": mlp.sum(-1).tolist(),
            "final_tokens": mlp[-1].tolist(),
            "merged_per_layer": list(self.merged),
            "dropped_per_layer": list(self.dropped),
            "kv_tokens_per_layer": kv.sum(-1).tolist(),
            "kept_fraction": done / total if total else 1.0,
            "merge_flops": int(self.merge_flops),
            "flops_full": flops_full,
            "flops_trimmed": flops_trimmed,
            "flop_ratio": flops_full / flops_trimmed if flops_trimmed else 1.0,
        }


def encoder_flops(config, attn_tokens: torch.Tensor, mlp_tokens: torch.Tensor,
                  kv_tokens: torch.Tensor | None = None) -> int:
    """FLOPs of the encoder layers: attn_tokens / mlp_tokens (L, B) tokens in each layer's attention
    block (q, k, v, o projections and n^2 attention) and MLP. With kv_tokens (merge_unmerge), the
    attention's queries and o projection run on attn_tokens and its keys and values on kv_tokens."""
    d = config.hidden_size
    ff = config.intermediate_size
    a = attn_tokens.double()
    kv = a if kv_tokens is None else kv_tokens.double()
    m = mlp_tokens.double()
    per_layer = 2 * 2 * d * d * (a + kv) + 4 * d * a * kv + 2 * 2 * d * ff * m
    return int(per_layer.sum())
