"""Adapter for ViT and DeiT: ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification
(WithTeacher). DeiT's distillation token (slot 1) is kept like [CLS].

The reduction comes after the attention block's residual sum and before `layernorm_after`, and ViTLayer adds
its MLP's output to that same sum, so the residual itself must be reduced: hooks cannot reach a local
variable of the layer's forward, so each layer runs `run_layer` (ViTLayer's forward with the reduction in
between) in place of its own.
"""

from __future__ import annotations

from typing import Callable

import torch

from .encoder import EncoderPatch, Family, candidates


class ViTPatch(EncoderPatch):
    architectures = ("ViTModel / ViTForImageClassification",
                     "DeiTModel / DeiTForImageClassification(WithTeacher)")

    @classmethod
    def family(cls, model: torch.nn.Module) -> Family | None:
        from transformers import DeiTModel, ViTModel

        for base in candidates(model):
            if isinstance(base, DeiTModel):
                return Family("deit", base, base.layers, 2, base.layernorm, text=False, adapter=cls)
            if isinstance(base, ViTModel):
                return Family("vit", base, base.layers, 1, base.layernorm, text=False, adapter=cls)
        return None

    @staticmethod
    def attention_parts(layer):
        a = layer.attention
        return a, a.q_proj, a.k_proj, a.v_proj, a.num_attention_heads, a.scaling

    @staticmethod
    def run_layer(layer, hidden: torch.Tensor, mask, kwargs: dict, reduce: Callable) -> torch.Tensor:
        residual = hidden
        h, _ = layer.attention(layer.layernorm_before(hidden), mask, **kwargs)
        h = layer.dropout(h)
        h = h + residual
        h = reduce(h)
        residual = h
        h = layer.mlp(layer.layernorm_after(h))
        h = layer.dropout(h)
        return h + residual

    def _install_layer(self, index: int, layer: torch.nn.Module) -> None:
        self._own_forward(index, layer)
