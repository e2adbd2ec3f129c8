"""Adapter for the encoder of an encoder-decoder model: Marian (MarianMTModel, MarianModel).

Tokens are dropped between encoder layers (after each layer of the schedule); the encoder returns only the
tokens still live, (B, T', D), so the decoder's cross-attention reads fewer keys at every decoding step.
transformers' own layer forwards run; per forward:

* the encoder's pre-hook reads the 2-D source attention_mask (right- or left-padded) and starts the state;
* each encoder layer's pre-hook gives it the mask of the live tokens, and the forward hook of a scheduled
  layer scores, selects and gathers them from its output;
* the q and k projections of the scheduled layers are hooked so the scores come from the layer's own
  queries and keys (the attention kernel is untouched);
* the encoder's post-hook keeps the reduced source mask, and the decoder's pre-hook gives it to the
  cross-attention whenever it reads that encoder output (also expanded for beams, as `generate` does).

Scores: ``cls_attention`` uses the attention each token receives, averaged over all live queries and heads
(a translation encoder has no [CLS]); ``random`` is the control. The last real source token (</s>) is
never dropped. T5's relative position bias is computed once for the full length, so T5 is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import TrimConfig
from ..errors import ConfigError, InputError, TrimformerError, UnsupportedModelError
from ..ops.received import mean_attention_received
from ..ops.select import ratio_counts, select
from ..registry import Method
from ..scorers.base import ScoreInputs
from .base import Patch


def find_seq2seq_encoder(model: torch.nn.Module):
    """(encoder, decoder) of a supported encoder-decoder model, or None."""
    try:
        from transformers import MarianModel
    except ImportError:  # pragma: no cover
        return None
    base = getattr(model, "model", model)
    if isinstance(base, MarianModel):
        return base.encoder, base.decoder
    return None


@dataclass
class _State:
    valid: torch.Tensor                  # (B, T) live slots
    positions: torch.Tensor              # (B, T) original position of each slot
    lengths: torch.Tensor                # (B,) real source tokens per row
    last: torch.Tensor                   # (B,) original position of each row's last real token
    reduced: bool = False
    kept: list = field(default_factory=list)   # per layer: (B,) tokens the layer computed


class MarianPatch(Patch):
    """Makes a Marian encoder drop tokens between layers; the decoder's cross-attention mask follows."""

    kind = "seq2seq"
    architectures = ("MarianMTModel / MarianModel (encoder)",)

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return find_seq2seq_encoder(model) is not None

    @classmethod
    def layers(cls, model: torch.nn.Module) -> torch.nn.ModuleList:
        return find_seq2seq_encoder(model)[0].layers

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        if config.adaptive.enabled:
            raise UnsupportedModelError("adaptive keep is not supported on encoder-decoder encoders")
        if config.cls_only_last:
            raise ConfigError("cls_only_last is for encoders read through [CLS]; the decoder of "
                              f"{type(model).__name__} cross-attends to every encoder output")
        super().__init__(model, config, method, dict(plan))
        self.encoder, self.decoder = find_seq2seq_encoder(model)
        self.scorer = method.build_scorer(config, model, plan)
        self.state: _State | None = None
        self.source_mask: torch.Tensor | None = None    # (B, T') mask of the last reduced encoder output
        self._last: _State | None = None
        self._captured: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in self.plan}
        self._want = ({"q", "k"} if method.needs_attention else set()) | ({"k"} if method.needs("keys") else set())

    # ---- install / remove ------------------------------------------------------------------------
    def _install(self) -> None:
        self.hooks.add(self.encoder.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self.hooks.add(self.encoder.register_forward_hook(self._on_end))
        self.hooks.add(self.decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
        for index, layer in enumerate(self.encoder.layers):
            if index in self.plan:
                for name in sorted(self._want):
                    module = getattr(layer.self_attn, f"{name}_proj")
                    self.hooks.add(module.register_forward_hook(self._capture(index, name)))
                self.hooks.add(layer.register_forward_hook(self._layer_post(index)))
            self.hooks.add(layer.register_forward_pre_hook(self._layer_pre, with_kwargs=True))

    def remove(self) -> None:
        super().remove()
        self.state = None
        self.source_mask = None

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self.state is not None:
                self._captured[layer][name] = output
        return hook

    # ---- encoder and decoder hooks -----------------------------------------------------------------
    def _on_start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        device = ids.device if ids is not None else embeds.device
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            mask = torch.ones(shape, dtype=torch.long, device=device)
        if mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
            raise InputError(f"a trimmed encoder takes a 2-D attention_mask of shape {tuple(shape)}, got "
                             f"{tuple(mask.shape)}")
        valid = mask.bool()
        if not bool(valid.any(-1).all()):
            raise InputError("every source row needs at least one real token")
        b, t = shape
        positions = torch.arange(t, device=device).expand(b, -1)
        last = torch.where(valid, positions, -1).amax(-1)
        self.state = _State(valid, positions, valid.sum(-1), last)
        self.source_mask = None
        return None

    def _on_end(self, module, args, output):
        state, self.state = self.state, None
        for store in self._captured.values():
            store.clear()
        if state is None:
            return output
        self._last = state
        self.source_mask = state.valid.long() if state.reduced else None
        return output

    def _on_decoder(self, module, args, kwargs):
        """Give the cross-attention the reduced source mask when it reads the reduced encoder output."""
        enc = kwargs.get("encoder_hidden_states")
        mask = self.source_mask
        if mask is None or enc is None or enc.shape[1] != mask.shape[1] or enc.shape[0] % mask.shape[0]:
            return None
        kwargs["encoder_attention_mask"] = mask.repeat_interleave(enc.shape[0] // mask.shape[0], dim=0)
        return args, kwargs

    # ---- layer hooks -------------------------------------------------------------------------------
    def _layer_pre(self, module, args, kwargs):
        """Count the layer's tokens and, once some are dropped, give it the live tokens' mask (B, 1, 1, T')."""
        state = self.state
        if state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if state.reduced:
            low = torch.finfo(hidden.dtype).min
            mask = torch.zeros(state.valid.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~state.valid, low)[:, None, None, :]
            if len(args) > 1:
                args = (args[0], mask, *args[2:])
            else:
                kwargs["attention_mask"] = mask
        state.kept.append(state.valid.sum(-1).cpu())
        return args, kwargs

    def _layer_post(self, index: int):
        def hook(module, args, output):
            return self._drop(index, module, output) if self.state is not None else None

        return hook

    def _drop(self, index: int, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        state = self.state
        b, t, d = h.shape
        attn, captured = layer.self_attn, self._captured[index]

        def heads(x):                                                               # (B, H, T, hd)
            return x.view(b, t, attn.num_heads, -1).transpose(1, 2)

        attention = None
        if self.method.needs_attention:
            attention = mean_attention_received(heads(captured["q"]), heads(captured["k"]), attn.scaling,
                                                state.valid)                        # (B, T)
        inputs = ScoreInputs(layer=index, positions=state.positions, valid=state.valid, lengths=state.lengths,
                             hidden=h, attention=attention, seed=self.config.seed,
                             keys=heads(captured["k"]) if self.method.needs("keys") else None)
        scores = self.scorer(inputs).float()
        protected = state.valid & (state.positions == state.last[:, None])               # (B, T) the </s>
        counts = ratio_counts(state.valid.sum(-1), self.plan[index], protected.sum(-1))
        slots, kept = select(scores, state.valid, protected, counts)                       # (B, T')
        state.valid = kept
        state.positions = state.positions.gather(1, slots)
        state.reduced = True
        return h.gather(1, slots[:, :, None].expand(-1, -1, d))

    # ---- stats --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        state = self._last
        if state is None or not state.kept:
            raise TrimformerError("no encoder forward has run since trim(); stats describe the last one")
        kept = torch.stack(state.kept)                         # (L, B)
        lengths = state.lengths.cpu()
        total = int(lengths.sum()) * kept.shape[0]
        return {
            "method": self.config.method,
            "architecture": "marian-encoder",
            "schedule": dict(self.plan),
            "input_tokens": lengths.tolist(),
            "kept_tokens_per_layer": kept.sum(-1).tolist(),
            "encoder_output_tokens": state.valid.sum(-1).tolist(),
            "kept_fraction": int(kept.sum()) / total if total else 1.0,
        }
