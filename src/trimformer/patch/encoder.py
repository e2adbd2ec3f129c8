"""What the encoder adapters share (BERT in `bert.py`, ViT and DeiT in `vit.py`, the CLIP vision tower in
`clip.py`): the live tokens of a forward, dropping and merging between a layer's attention block and its
MLP, and the stats.

Every token sees every other token in an encoder, so a token can be dropped or merged anywhere; the
adapters do it where ToMe does, inside each layer after the attention block, so the layer's MLP already
runs on fewer tokens. Per forward:

* the base model's pre-hook reads the 2-D attention mask (text) and starts the live-token state;
* at each layer the family's adapter hands `_enter_layer` the layer's input and mask (the mask becomes the
  live tokens' additive bias once the layout changes: padding and filler masked, log(size) added with
  proportional attention) and `_between_blocks` the attention block's output, which merges (ToMe,
  `mechanisms/merging.py`) or drops by the scorer's scores; how it reaches those two points is the family's
  business (hooks where transformers' own layer forward allows it);
* the query, key and value projections of the layers that need them are hooked to hand their outputs
  (the keys' head-mean when ToMe matches on keys, the [CLS] query for [CLS]-attention scores, the values'
  norms for ATS) to the reduction: nothing is computed twice and the attention kernel (SDPA, eager) is untouched;
* the base model's post-hook gives back one output per input token: a token holds the output of the
  slot it was merged into, a dropped token its hidden state when it was dropped (after the family's
  final norm, if any).

[CLS] (and DeiT's distillation token) is never merged or dropped and stays at slot 0 (and 1), so the
model's own pooling and heads work unchanged. Batches must be right-padded (the tokenizers' default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..config import TrimConfig
from ..errors import TrimformerError, UnsupportedModelError
from ..mechanisms.merging import TokenMerging, check_merge_options, merges
from ..ops.merge import ats_counts, ats_scores, attention_bias, cls_attention
from ..ops.select import mass_counts, ratio_counts, select
from ..ops.smoothing import span_max_pool
from ..registry import Method
from ..scorers.base import ScoreInputs
from .base import Patch
from .cache_names import drop_cache_kwargs
from .encoder_state import EncoderState, Live, start_live

ATTENTION_KERNELS = ("sdpa", "eager")
FAMILIES: list[type["EncoderPatch"]] = []    # the encoder adapters, in the order `find_family` tries them


@dataclass
class Family:
    """One encoder model as the shared machinery sees it; the adapter class knows the rest."""

    name: str
    base: torch.nn.Module                            # the base model (its hooks start and end a forward)
    layers: torch.nn.ModuleList
    protected: int                                   # leading tokens never reduced
    final_norm: Callable | None                      # applied to the base's last_hidden_state
    text: bool                                       # takes a 2-D attention_mask
    adapter: type["EncoderPatch"]

    def attention(self, layer) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.nn.Module, int, float]:
        """(attention module, q, k, v projections, heads, scaling) of one layer."""
        return self.adapter.attention_parts(layer)

    def run(self, layer, hidden, mask, kwargs, reduce):
        """The layer's own computation with `reduce` between the attention block and the MLP."""
        return self.adapter.run_layer(layer, hidden, mask, kwargs, reduce)


def candidates(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Where an encoder's base model may be: the model itself, its vision tower, its base model."""
    found = [model, getattr(model, "vision_model", None)]
    try:
        found.append(model.base_model)
    except AttributeError:
        pass
    return found


def find_family(model: torch.nn.Module) -> Family | None:
    """The encoder family of `model` (itself a base model, or a head model around one), or None."""
    for adapter in FAMILIES:
        family = adapter.family(model)
        if family is not None:
            return family
    return None


class EncoderPatch(Patch):
    """Makes an encoder merge (ToMe) or drop tokens inside each layer; `remove` undoes it exactly.

    A family's adapter defines `family`, `attention_parts`, `run_layer` and `_install_layer`."""

    kind = "encoder"
    merge_unmerge: ClassVar[bool] = False      # the family runs tome_mode "merge_unmerge"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        FAMILIES.append(cls)

    # ---- what each family defines ---------------------------------------------------------------
    @classmethod
    def family(cls, model: torch.nn.Module) -> Family | None:
        raise NotImplementedError

    @staticmethod
    def attention_parts(layer) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.nn.Module, int, float]:
        raise NotImplementedError

    @staticmethod
    def run_layer(layer, hidden: torch.Tensor, mask, kwargs: dict, reduce: Callable) -> torch.Tensor:
        raise NotImplementedError

    def _install_layer(self, index: int, layer: torch.nn.Module) -> None:
        """Make layer `index` call `_enter_layer` on its input and `_between_blocks` on its attention output."""
        raise NotImplementedError

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return cls.family(model) is not None

    @classmethod
    def layers(cls, model: torch.nn.Module) -> torch.nn.ModuleList:
        return cls.family(model).layers

    # ---- construction -----------------------------------------------------------------------------
    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        family = type(self).family(model)
        kernel = family.base.config._attn_implementation or "eager"
        if kernel not in ATTENTION_KERNELS:
            raise UnsupportedModelError(
                f"attention implementation {kernel!r} is not supported on encoders (it takes no additive bias); "
                f"load the model with attn_implementation in {ATTENTION_KERNELS}")
        check_merge_options(config, method, family.name, self.merge_unmerge)
        super().__init__(model, config, method, dict(plan) if method.prunes_prefill else {})
        self.family = family
        self.num_layers = len(family.layers)
        self.merging = TokenMerging(config, self.num_layers, family.protected, family.text) if method.merges else None
        self.unmerging = self.merging is not None and self.merging.unmerging
        self.metric = self.merging.metric if self.merging is not None else None
        self.scorer = method.build_scorer(config, model, self.plan) if self.merging is None else None
        self.state: EncoderState | None = None
        self.live: Live | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self._capture_layer: int | None = None
        self._bias: torch.Tensor | None = None
        self._want = self._capture_needs()

    def _capture_needs(self) -> dict[int, set]:
        """{layer: the projections ("q", "k", "v") whose outputs the reduction there reads}."""
        adaptive, needs = self.config.adaptive, {}
        for layer in range(self.num_layers):
            want = set()
            if self.unmerging:
                pass                                  # matches on each block's input, captures nothing
            elif self.merging is not None:
                if self.metric == "keys":
                    want.add("k")
                if adaptive.enabled and not self.merging.similarity:
                    want |= {"q", "k", "v"}
            elif layer in self.plan:
                if self.method.needs_attention or adaptive.enabled:
                    want |= {"q", "k"}
                if self.method.needs("keys"):
                    want.add("k")
                if adaptive.enabled and adaptive.mode == "sampling":
                    want.add("v")
            if want:
                needs[layer] = want
        return needs

    # ---- install / remove -------------------------------------------------------------------------
    def _install(self) -> None:
        base = self.family.base
        self.hooks.add(base.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self.hooks.add(base.register_forward_hook(self._on_end, with_kwargs=True))
        for index, layer in enumerate(self.family.layers):
            _, q, k, v, _, _ = self.family.attention(layer)
            for name, module in (("q", q), ("k", k), ("v", v)):
                if name in self._want.get(index, ()):
                    self.hooks.add(module.register_forward_hook(self._capture(index, name)))
            self._install_layer(index, layer)

    def remove(self) -> None:
        super().remove()
        self.live = None
        self._captured.clear()

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self._capture_layer == layer:
                self._captured[name] = output
        return hook

    # ---- base model hooks -------------------------------------------------------------------------
    def _on_start(self, module, args, kwargs):
        mask = kwargs.get("attention_mask") if self.family.text else None
        if self.family.text and mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.live = start_live(mask)
        self.state = None
        return None

    def _start_rows(self, hidden: torch.Tensor) -> None:
        """At the first layer: every slot's owner, the rows' lengths and the merge schedule."""
        live = self.live
        lengths = live.start(hidden)
        self.state = EncoderState(lengths.cpu())
        if self.merging is not None:
            self.merging.start(lengths, live.valid.device if self.unmerging else hidden.device)

    def _on_end(self, module, args, kwargs, output):
        live, state = self.live, self.state
        self.live = None
        self._capture_layer = None
        self._captured.clear()
        if live is None or state is None:
            return output
        state.owner = live.owner
        state.kept = live.owner >= 0
        if live.reduced:
            output.last_hidden_state = live.restore(output.last_hidden_state, self.family.final_norm)
        return output

    # ---- one layer --------------------------------------------------------------------------------
    @staticmethod
    def _layer_kwargs(kwargs: dict) -> None:
        """Remove what an encoder layer of a trimmed forward must not get (cross-attention inputs, a cache)."""
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            kwargs.pop(name, None)
        drop_cache_kwargs(kwargs)

    def _enter_layer(self, index: int, hidden: torch.Tensor, attention_mask):
        """A layer starts in a trimmed forward: count its tokens, arm the captures, and return the mask it
        gets (the model's own until the layout changes, then the live tokens' bias, or None when all are
        plain valid tokens)."""
        live, merge = self.live, self.config.merge
        if live.owner is None:
            self._start_rows(hidden)
        bias = None
        if live.reduced or live.irregular:
            proportional = merge.prop_attn and live.size is not None
            size = live.size if live.size is not None else live.valid.to(hidden.dtype)
            bias = attention_bias(size, proportional, hidden.dtype)
        mask = attention_mask
        if live.reduced:
            proportional = merge.prop_attn and live.size is not None
            mask = bias if (live.irregular or proportional) else None
        self.state.attn_tokens.append(live.valid.sum(-1).cpu())
        self._capture_layer = index if index in self._want else None
        self._captured.clear()
        self._bias = bias
        return mask

    def _between_blocks(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """The attention block's output of layer `index` -> the tokens its MLP runs on."""
        self._capture_layer = None
        out = self._reduce(index, h, self._bias)
        self._captured.clear()
        return out

    def _own_forward(self, index: int, layer: torch.nn.Module) -> None:
        """Replace layer `index`'s forward (on this instance; `remove` deletes it) by `run_layer`, for the
        families whose reduction point cannot be reached by hooks."""
        original = type(layer).forward.__get__(layer)

        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            if self.live is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            self._layer_kwargs(kwargs)
            mask = self._enter_layer(index, hidden_states, attention_mask)
            return self.run_layer(layer, hidden_states, mask, kwargs, lambda h: self._between_blocks(index, h))

        self.hooks.override_forward(layer, forward)

    def _reduce(self, layer: int, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        live, state = self.live, self.state
        merged = dropped = 0
        if self.merging is not None:
            h, merged = self._merge(layer, h, bias)
        elif layer in self.plan:
            h, dropped = self._drop(layer, h, bias)
        if self.config.cls_only_last and layer == self.num_layers - 1:
            h, gone = live.keep_leading(h, self.family.protected)
            dropped += gone
        state.merged.append(merged)
        state.dropped.append(dropped)
        state.mlp_tokens.append(live.valid.sum(-1).cpu())
        if self.config.merge.trace_source:
            state.owners.append(live.owner.clone())
        return h

    # ---- what the reductions read -----------------------------------------------------------------
    def _cls_attention(self, layer: int, bias: torch.Tensor | None) -> torch.Tensor:
        _, _, _, _, heads, scaling = self.family.attention(self.family.layers[layer])
        q, k = self._captured["q"], self._captured["k"]
        b, t, _ = k.shape
        key = k.view(b, t, heads, -1).transpose(1, 2)
        query0 = q[:, 0].view(b, heads, -1)
        return cls_attention(query0, key, scaling, bias)

    def _keys(self, layer: int) -> torch.Tensor:
        """(B, T, H, hd) the layer's keys, per head."""
        _, _, _, _, heads, _ = self.family.attention(self.family.layers[layer])
        k = self._captured["k"]
        b, t, _ = k.shape
        return k.view(b, t, heads, -1)

    def _adaptive_keep(self, layer: int, bias, target: torch.Tensor, candidate: torch.Tensor,
                       n_protected: torch.Tensor) -> torch.Tensor:
        """(B,) tokens kept per row by ATS: at most `target`, fewer when the scores are peaked."""
        attention = self._cls_attention(layer, bias)
        adaptive = self.config.adaptive
        if adaptive.mode == "sampling":
            scores = ats_scores(attention, self._captured["v"].float().norm(dim=-1))
            samples = (target - n_protected).clamp(min=0)
            counts = ats_counts(scores, candidate, samples) + n_protected
        else:
            counts = mass_counts(attention.masked_fill(~candidate, 0.0), candidate, adaptive.mass,
                                 torch.zeros_like(n_protected)) + n_protected
        return torch.minimum(counts, target)

    def _protected(self) -> torch.Tensor:
        """(B, T) slots never dropped or merged: [CLS] (and DeiT's distillation token) at the front, and on
        text the slot holding each row's last token ([SEP])."""
        live = self.live
        t = live.valid.shape[1]
        slot = torch.arange(t, device=live.valid.device)
        out = live.valid & (slot < self.family.protected)[None, :]
        sep = self._sep_slots(t)
        return out | sep if sep is not None else out

    def _sep_slots(self, t: int) -> torch.Tensor | None:
        """(B, T) bool: the slot holding each row's last real input token (text encoders), else None."""
        return self.live.last_token_slots(self.state.lengths, t) if self.family.text else None

    # ---- merging and dropping ---------------------------------------------------------------------
    def _merge(self, layer: int, h: torch.Tensor, bias) -> tuple[torch.Tensor, int]:
        live, adaptive, merging = self.live, self.config.adaptive.enabled, self.merging
        r = merging.r_at(layer)                                  # an int, or (B,) per row
        b, t, _ = h.shape
        if not adaptive and not merges(r):
            return h, 0
        rows: int | torch.Tensor = t if merging.uncapped else r  # (merges are capped at half a row anyway)
        if adaptive and not merging.similarity:
            protected = self._protected()
            n_valid = live.valid.sum(-1)
            n_protected = protected.sum(-1)
            target = (n_valid - r).clamp(min=1)
            keep = self._adaptive_keep(layer, bias, target, live.valid & ~protected, n_protected)
            rows = (n_valid - keep).clamp(min=0)
        metric = h if self.metric == "hidden" else self._keys(layer).mean(2)   # (B, T, D) or (B, T, head_dim)
        return merging.merge(live, self.state, h, metric, rows, self._sep_slots(t))

    def _drop(self, layer: int, h: torch.Tensor, bias) -> tuple[torch.Tensor, int]:
        live, config = self.live, self.config
        valid = live.valid
        protected = self._protected()
        attention = self._cls_attention(layer, bias) if "q" in self._captured and "k" in self._captured else None
        keys = self._keys(layer).transpose(1, 2) if self.method.needs("keys") else None     # (B, H, T, hd)
        inputs = ScoreInputs(layer=layer, positions=live.positions(h.shape[1]), valid=valid,
                             lengths=self.state.lengths.to(h.device), hidden=h, attention=attention, seed=config.seed,
                             keys=keys)
        scores = self.scorer(inputs).float()
        if self.method.span_pool and config.prune.span > 1:
            scores = span_max_pool(scores.masked_fill(~valid, 0.0), config.prune.span)
        n_valid, n_protected = valid.sum(-1), protected.sum(-1)
        threshold = getattr(self.scorer, "keep_counts", None)   # a scorer's own counts (TS-DTP's learned threshold)
        if threshold is not None:
            counts = threshold(layer, scores, valid, protected)
        else:
            counts = ratio_counts(n_valid, self.plan[layer], n_protected)
        if config.adaptive.enabled:
            counts = torch.maximum(self._adaptive_keep(layer, bias, counts, valid & ~protected, n_protected),
                                   n_protected)
        index, kept = select(scores, valid, protected, counts)
        return live.keep_slots(h, index, kept)

    # ---- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        state = self.state
        if state is None or not state.attn_tokens:
            raise TrimformerError("no forward has run since trim(); stats describe the last forward")
        return {
            "method": self.config.method,
            "architecture": self.family.name,
            "schedule": self.merging.schedule() if self.merging is not None else dict(self.plan),
            "adaptive": bool(self.config.adaptive.enabled),
            **state.summary(self.family.base.config),
        }
