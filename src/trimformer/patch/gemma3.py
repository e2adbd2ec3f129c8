"""Adapter for Gemma 3 text decoders (`Gemma3ForCausalLM`, e.g. Gemma-3-270M and 1B).

Gemma 3 is a Llama-family decoder with QK-norm inside its attention (untouched here), global attention
every few layers and sliding-window attention on the rest, and a rotary table per kind of layer. On top of
`LlamaPatch` this adapter hands each layer the rotary embeddings of its kind; the window of a sliding layer
is applied by original position in `LlamaPatch._mask`, so a kept token further back than the window stays
outside it however few tokens now lie between.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .live import Live
from .llama import LlamaPatch

GLOBAL = "full_attention"


class Gemma3Patch(LlamaPatch):
    """`LlamaPatch` with Gemma 3's per-layer-kind rotary tables."""

    architectures = ("Gemma3ForCausalLM",)

    def __init__(self, model, config, method, plan):
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma 3 with use_bidirectional_attention=True (an embedding model) is not a causal decoder; "
                "trimformer prunes causal Gemma 3 models"
            )
        super().__init__(model, config, method, plan)
        self.layer_types: list[str] = list(model.config.layer_types)
        self._tables: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global layers' table: the one kept on the live tokens (and used for revived tokens)."""
        return self.base.rotary_emb(x, positions, GLOBAL)

    def _position_embeddings(self, layer: int, live: Live) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.layer_types[layer]
        if kind == GLOBAL:
            return live.cos, live.sin
        cached = self._tables.get(kind)
        if cached is None or cached[0] is not live.positions:    # computed once per change of the live tokens
            cos, sin = self.base.rotary_emb(live.cos, live.positions, kind)
            cached = self._tables[kind] = (live.positions, (cos.to(live.cos.device), sin.to(live.cos.device)))
        return cached[1]

    def remove(self) -> None:
        super().remove()
        self._tables = {}
