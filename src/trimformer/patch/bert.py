"""Adapter for BERT-family encoders: BertModel and the Bert*For* heads built on it.

transformers' own layer forward runs: a pre-hook on each BertLayer gives it the live tokens' mask, and a
forward hook on its attention block (`layer.attention`, which returns the block's output after its own
residual and LayerNorm) returns the merged or reduced output, on which BertLayer runs its own feed-forward.

``tome_mode="merge_unmerge"`` (ToMe for Stable Diffusion) is the exception: each block (attention, MLP)
merges its own input for its computation only and unmerges its output onto every token, which adds it to its
own residual. The attention block's queries and its keys/values may then run on different token sets
("queries", "keys_values"), which BertSelfAttention's shapes cannot take, so under that mode the layer runs
its blocks here (`_unmerge_layer`, `_attend`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UnsupportedModelError
from ..mechanisms.merging import merges
from ..ops.merge import attention_bias, unmerge
from .encoder import EncoderPatch, Family, candidates


class BertPatch(EncoderPatch):
    architectures = ("BertModel (and the BERT-family Bert*For* heads)",)
    merge_unmerge = True

    @classmethod
    def family(cls, model: torch.nn.Module) -> Family | None:
        from transformers import BertModel

        for base in candidates(model):
            if isinstance(base, BertModel):
                return Family("bert", base, base.encoder.layer, 1, None, text=True, adapter=cls)
        return None

    def __init__(self, model, config, method, plan):
        if getattr(type(self).family(model).base.config, "is_decoder", False):
            raise UnsupportedModelError("a BERT model configured as a decoder (is_decoder=True) is not supported")
        super().__init__(model, config, method, plan)

    @staticmethod
    def attention_parts(layer):
        a = layer.attention.self
        return a, a.query, a.key, a.value, a.num_attention_heads, a.scaling

    @staticmethod
    def run_layer(layer, hidden: torch.Tensor, mask, kwargs: dict, reduce: Callable) -> torch.Tensor:
        """BertLayer's own forward with `reduce` applied to its attention block's output (for code that runs
        the layers by hand, such as TS-DTP's training forward)."""
        handle = layer.attention.register_forward_hook(lambda module, args, output: (reduce(output[0]), *output[1:]))
        try:
            return layer(hidden, mask, **kwargs)
        finally:
            handle.remove()

    # ---- hooks --------------------------------------------------------------------------------------
    def _install_layer(self, index: int, layer: torch.nn.Module) -> None:
        if self.unmerging:
            self._unmerge_forward(index, layer)
            return
        self.hooks.add(layer.register_forward_pre_hook(self._layer_pre(index), with_kwargs=True))
        self.hooks.add(layer.attention.register_forward_hook(self._after_attention(index)))

    def _layer_pre(self, index: int):
        def hook(module, args, kwargs):
            if self.live is None:          # the layer runs outside a forward of the base model
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            self._layer_kwargs(kwargs)
            if len(args) > 1:
                args = (args[0], self._enter_layer(index, hidden, args[1]), *args[2:])
            else:
                kwargs["attention_mask"] = self._enter_layer(index, hidden, kwargs.get("attention_mask"))
            return args, kwargs

        return hook

    def _after_attention(self, index: int):
        def hook(module, args, output):
            if self.live is None:
                return None
            return (self._between_blocks(index, output[0]), *output[1:])

        return hook

    # ---- merge and unmerge --------------------------------------------------------------------------
    def _unmerge_forward(self, index: int, layer: torch.nn.Module) -> None:
        original = type(layer).forward.__get__(layer)

        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            if self.live is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            if self.live.owner is None:
                self._start_rows(hidden_states)
            self._layer_kwargs(kwargs)
            return self._unmerge_layer(index, layer, hidden_states, attention_mask, kwargs, original)

        self.hooks.override_forward(layer, forward)

    def _block_merge(self, x: torch.Tensor, r):
        return self.merging.block_merge(self.live, self.state, x, r, self._sep_slots(x.shape[1]))

    def _attend(self, layer, q_in: torch.Tensor, kv_in: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """BERT self-attention with queries from q_in (B, Tq, D), keys/values from kv_in (B, Tk, D) and an
        additive bias (B, 1, 1, Tk) or None; returns the context (B, Tq, D) before the output projection."""
        a = layer.attention.self
        b, tq, d = q_in.shape
        heads = a.num_attention_heads

        def split(x):
            return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(a.query(q_in)), split(a.key(kv_in)), split(a.value(kv_in))
        if self.family.base.config._attn_implementation == "sdpa":
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=a.scaling)
        else:
            logits = torch.matmul(q, k.transpose(2, 3)) * a.scaling
            if bias is not None:
                logits = logits + bias
            ctx = torch.matmul(logits.softmax(-1), v)
        return ctx.transpose(1, 2).reshape(b, tq, -1)

    def _unmerge_layer(self, index: int, layer, x: torch.Tensor, attention_mask, kwargs, original) -> torch.Tensor:
        """One BERT layer under merge_unmerge: each block (attention, MLP) may run on merged tokens; its
        output is unmerged (each token of a group gets the group's output) and added to every token's own
        residual before the block's LayerNorm. The residual stream keeps every token, so nothing compounds."""
        live, state, merge = self.live, self.state, self.config.merge
        n = live.valid.sum(-1).cpu()
        ra, rm = self.merging.rs[index]
        attn_mode = merge.unmerge_attention if merges(ra) else "none"
        mlp_merges = merge.unmerge_mlp and merges(rm)
        merged = 0
        if attn_mode == "none" and not mlp_merges:                      # nothing merged here: the layer as is
            out = original(x, attention_mask, **kwargs)
            state.attn_tokens.append(n)
            state.kv_tokens.append(n)
            state.mlp_tokens.append(n)
            state.merged.append(0)
            state.dropped.append(0)
            if merge.trace_source:
                state.owners.append(live.owner.clone())
            return out
        q_tokens = kv_tokens = n
        if attn_mode == "none":
            h, _ = layer.attention(x, attention_mask, **kwargs)
        else:
            m, xm, size, gone = self._block_merge(x, ra)
            merged += int(gone.sum())
            merged_bias = attention_bias(size, merge.prop_attn, x.dtype)
            full_bias = attention_bias(live.valid.to(x.dtype), False, x.dtype) if live.irregular else None
            if attn_mode == "qkv":
                ctx, q_tokens, kv_tokens = self._attend(layer, xm, xm, merged_bias), n - gone, n - gone
            elif attn_mode == "queries":
                ctx, q_tokens = self._attend(layer, xm, x, full_bias), n - gone
            else:                                                       # keys_values
                ctx, kv_tokens = self._attend(layer, x, xm, merged_bias), n - gone
            o = layer.attention.output.dense(ctx)
            if attn_mode != "keys_values":
                o = unmerge(m, o, x.shape[1])
            h = layer.attention.output.LayerNorm(layer.attention.output.dropout(o) + x)
        mlp_tokens = n
        if mlp_merges:
            m2, hm, _, gone = self._block_merge(h, rm)
            merged += int(gone.sum())
            mlp_tokens = n - gone
            f = unmerge(m2, layer.output.dense(layer.intermediate(hm)), h.shape[1])
            out = layer.output.LayerNorm(layer.output.dropout(f) + h)
        else:
            out = layer.feed_forward_chunk(h)
        state.attn_tokens.append(q_tokens)
        state.kv_tokens.append(kv_tokens)
        state.mlp_tokens.append(mlp_tokens)
        state.merged.append(merged)
        state.dropped.append(0)
        if merge.trace_source:
            state.owners.append(live.owner.clone())
        return out
