"""Adapter for the CLIP vision tower: CLIPVisionModel and CLIPVisionModelWithProjection.

As in ViT, the reduction comes after the attention block's residual sum, which CLIPEncoderLayer keeps in a
local variable and adds its MLP's output to: hooks cannot reach it, so each layer runs `run_layer`
(CLIPEncoderLayer's forward with the reduction in between) in place of its own.
"""

from __future__ import annotations

from typing import Callable

import torch

from .encoder import EncoderPatch, Family, candidates


class ClipPatch(EncoderPatch):
    architectures = ("CLIPVisionModel(WithProjection)",)

    @classmethod
    def family(cls, model: torch.nn.Module) -> Family | None:
        from transformers import CLIPVisionModel

        for base in candidates(model):
            if isinstance(base, CLIPVisionModel):
                return Family("clip", base, base.encoder.layers, 1, None, text=False, adapter=cls)
        return None

    @staticmethod
    def attention_parts(layer):
        a = layer.self_attn
        return a, a.q_proj, a.k_proj, a.v_proj, a.num_heads, a.scale

    @staticmethod
    def run_layer(layer, hidden: torch.Tensor, mask, kwargs: dict, reduce: Callable) -> torch.Tensor:
        residual = hidden
        h, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=mask, **kwargs)
        h = residual + h
        h = reduce(h)
        residual = h
        h = layer.mlp(layer.layer_norm2(h))
        return residual + h

    def _install_layer(self, index: int, layer: torch.nn.Module) -> None:
        self._own_forward(index, layer)
