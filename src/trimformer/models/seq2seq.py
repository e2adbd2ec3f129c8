"""Adapter for the encoder of an encoder-decoder model: Marian (MarianMTModel, MarianModel).

Tokens are dropped between encoder layers (after each layer of the schedule); the encoder returns only the
tokens still live, (B, T', D), so the decoder's cross-attention reads fewer keys at every decoding step.
Per forward:

* the encoder's pre-hook reads the 2-D source attention_mask (right- or left-padded) and starts the state;
* each encoder layer's forward is replaced (per instance; `remove` deletes the override) by one that passes
  the mask of the live tokens, and after a scheduled layer scores, selects and gathers them;
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
from ..registry import Method
from ..scorers.base import ScoreInputs
from ..ops.select import ratio_counts, select
from ..scoring.received import mean_attention_received
from ..patch.hooks import Hooks

SEQ2SEQ_ARCHITECTURES = ("MarianMTModel / MarianModel (encoder)",)
SEQ2SEQ_METHODS = ("cls_attention", "random")


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


class Seq2SeqEncoderPatch:
    kind = "seq2seq"
    architectures = SEQ2SEQ_ARCHITECTURES

    @classmethod
    def matches(cls, model) -> bool:
        return find_seq2seq_encoder(model) is not None

    @classmethod
    def layers(cls, model):
        return find_seq2seq_encoder(model)[0].layers

    """Makes a Marian encoder drop tokens between layers; the decoder's cross-attention mask follows."""

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        found = find_seq2seq_encoder(model)
        if found is None:
            raise UnsupportedModelError(f"no encoder-decoder adapter for {type(model).__name__}; supported: "
                                        + "; ".join(SEQ2SEQ_ARCHITECTURES))
        if method.name not in SEQ2SEQ_METHODS:
            raise UnsupportedModelError(f"method {method.name!r} does not run on the encoder of "
                                        f"{type(model).__name__}; use one of {SEQ2SEQ_METHODS}")
        if config.adaptive:
            raise UnsupportedModelError("adaptive keep is not supported on encoder-decoder encoders")
        if config.cls_only_last:
            raise ConfigError("cls_only_last is for encoders read through [CLS]; the decoder of "
                              f"{type(model).__name__} cross-attends to every encoder output")
        self.encoder, self.decoder = found
        self.model = model
        self.config = config
        self.method = method
        self.plan = dict(plan)
        self.score = method.build_scorer(config, model, plan)
        self.state: _State | None = None
        self.source_mask: torch.Tensor | None = None    # (B, T') mask of the last reduced encoder output
        self._last: _State | None = None
        self._captured: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in self.plan}
        self._hooks = Hooks()

    # ---- install / remove ------------------------------------------------------------------------
    def install(self) -> None:
        try:
            self._hooks.add(self.encoder.register_forward_pre_hook(self._on_start, with_kwargs=True))
            self._hooks.add(self.encoder.register_forward_hook(self._on_end))
            self._hooks.add(self.decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
            for index, layer in enumerate(self.encoder.layers):
                if index in self.plan and self.method.needs_attention:
                    for name in ("q", "k"):
                        module = getattr(layer.self_attn, f"{name}_proj")
                        self._hooks.add(module.register_forward_hook(self._capture(index, name)))
                self._hooks.override_forward(layer, self._layer_forward(index, layer))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self._hooks.remove()
        self.state = None
        self.source_mask = None

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self.state is not None:
                self._captured[layer][name] = output
        return hook

    # ---- hooks ------------------------------------------------------------------------------------
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

    def _layer_forward(self, index: int, layer: torch.nn.Module):
        original = type(layer).forward.__get__(layer)

        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            state = self.state
            if state is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            if state.reduced:
                low = torch.finfo(hidden_states.dtype).min
                attention_mask = torch.zeros(state.valid.shape, dtype=hidden_states.dtype, device=hidden_states.device)
                attention_mask = attention_mask.masked_fill(~state.valid, low)[:, None, None, :]   # (B, 1, 1, T')
            state.kept.append(state.valid.sum(-1).cpu())
            out = original(hidden_states, attention_mask, *args, **kwargs)
            return self._drop(index, layer, out) if index in self.plan else out

        return forward

    # ---- dropping ----------------------------------------------------------------------------------
    def _drop(self, index: int, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        state = self.state
        b, t, d = h.shape
        attention = None
        if self.method.needs_attention:
            attn = layer.self_attn
            q = self._captured[index]["q"].view(b, t, attn.num_heads, -1).transpose(1, 2)   # (B, H, T, hd)
            k = self._captured[index]["k"].view(b, t, attn.num_heads, -1).transpose(1, 2)
            attention = mean_attention_received(q, k, attn.scaling, state.valid)          # (B, T)
        inputs = ScoreInputs(layer=index, positions=state.positions, valid=state.valid, lengths=state.lengths,
                             hidden=h, attention=attention, seed=self.config.seed)
        scores = self.score(inputs).float()
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
