"""Adapter for encoders: BERT (and models built on BertModel), ViT, DeiT and the CLIP vision tower.

Every token sees every other token in an encoder, so a token can be dropped or merged anywhere; this
adapter does it where ToMe does, inside each layer between the attention block and the MLP, so the
layer's MLP already runs on fewer tokens. Per forward:

* the base model's pre-hook reads the 2-D attention mask (text) and starts the live-token state;
* each layer's forward is replaced (per instance; `remove` deletes the override, restoring the class
  method exactly) by the family's own sequence of calls, with the attention mask rebuilt from the live
  tokens (padding and filler masked, log(size) added with proportional attention), and a reduction
  step after the attention block: ToMe merging, or dropping by a method's scores;
* the query, key and value projections of the layers that need them are hooked to hand their outputs
  (the keys' head-mean when ToMe matches on keys, the [CLS] query for [CLS]-attention scores, the values'
  norms for ATS) to the reduction: nothing is computed twice and the attention kernel (SDPA, eager) is untouched;
* the base model's post-hook gives back one output per input token: a token holds the output of the
  slot it was merged into, a dropped token its hidden state when it was dropped (after the family's
  final norm, if any).

With ``tome_mode="merge_unmerge"`` (BERT family; ToMe for Stable Diffusion) the layout never changes: each
block (attention, MLP) merges its own input for its computation only and unmerges its output onto every
token, which adds it to its own residual (`_unmerge_layer`).

[CLS] (and DeiT's distillation token) is never merged or dropped and stays at slot 0 (and 1), so the
model's own pooling and heads work unchanged. Batches must be right-padded (the tokenizers' default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import TrimConfig
from ..errors import ConfigError, InputError, UnsupportedModelError
from ..merging import (
    ats_counts,
    ats_scores,
    attention_bias,
    bipartite_soft_matching,
    cls_attention,
    merge_owner,
    merge_valid,
    merge_wavg,
    parse_r,
    r_for_keep,
    set_compaction,
    unmerge,
    unmerge_schedule,
)
from ..registry import Method
from ..scorers.base import ScoreInputs
from ..ops.select import mass_counts, ratio_counts, select
from ..ops.smoothing import span_max_pool
from ..patch.cache_names import drop_cache_kwargs
from ..patch.hooks import Hooks

ENCODER_ARCHITECTURES = ("BertModel (and Bert*For* heads)", "ViTModel / ViTForImageClassification",
                         "DeiTModel / DeiTForImageClassification(WithTeacher)", "CLIPVisionModel(WithProjection)")
ATTENTION_KERNELS = ("sdpa", "eager")
ENCODER_METHODS = ("tome", "cls_attention", "random", "tsdtp")
DECODER_ONLY_METHODS = ("lazy", "sdtp", "static", "truncate", "runtime")   # last-query / recency / KV methods
ADAPTIVE_MODES = ("sampling", "mass", "similarity")
# merge_unmerge: share of an attention block's token work one merged token saves (q, k, v, o projections:
# "queries" merges q and o, "keys_values" k and v), see `merging.unmerge_schedule`
UNMERGE_ATTENTION_COST = {"qkv": 1.0, "queries": 0.5, "keys_values": 0.5, "none": 0.0}


# ---- families ------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    base: torch.nn.Module
    layers: torch.nn.ModuleList
    protected: int                                   # leading tokens never reduced
    final_norm: Callable | None                      # applied to the base's last_hidden_state
    text: bool                                       # takes a 2-D attention_mask

    def attention(self, layer) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, torch.nn.Module, int, float]:
        """(attention module, q, k, v projections, heads, scaling) of one layer."""
        if self.name == "bert":
            a = layer.attention.self
            return a, a.query, a.key, a.value, a.num_attention_heads, a.scaling
        if self.name in ("vit", "deit"):
            a = layer.attention
            return a, a.q_proj, a.k_proj, a.v_proj, a.num_attention_heads, a.scaling
        a = layer.self_attn
        return a, a.q_proj, a.k_proj, a.v_proj, a.num_heads, a.scale

    def run(self, layer, hidden, mask, kwargs, reduce):
        """The layer's own computation with `reduce` between the attention block and the MLP."""
        if self.name == "bert":
            from transformers.pytorch_utils import apply_chunking_to_forward

            out, _ = layer.attention(hidden, mask, **kwargs)
            out = reduce(out)
            return apply_chunking_to_forward(
                layer.feed_forward_chunk, layer.chunk_size_feed_forward, layer.seq_len_dim, out)
        if self.name in ("vit", "deit"):
            residual = hidden
            h, _ = layer.attention(layer.layernorm_before(hidden), mask, **kwargs)
            h = layer.dropout(h)
            h = h + residual
            h = reduce(h)
            residual = h
            h = layer.mlp(layer.layernorm_after(h))
            h = layer.dropout(h)
            return h + residual
        residual = hidden                                    # clip
        h, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=mask, **kwargs)
        h = residual + h
        h = reduce(h)
        residual = h
        h = layer.mlp(layer.layer_norm2(h))
        return residual + h


def find_family(model: torch.nn.Module) -> Family | None:
    """The encoder family of `model` (itself a base model, or a head model around one), or None."""
    try:
        from transformers import BertModel, CLIPVisionModel, DeiTModel, ViTModel
    except ImportError:  # pragma: no cover
        return None
    candidates = [model, getattr(model, "vision_model", None)]
    try:
        candidates.append(model.base_model)
    except AttributeError:
        pass
    for base in candidates:
        if isinstance(base, BertModel):
            return Family("bert", base, base.encoder.layer, 1, None, text=True)
        if isinstance(base, DeiTModel):
            return Family("deit", base, base.layers, 2, base.layernorm, text=False)
        if isinstance(base, ViTModel):
            return Family("vit", base, base.layers, 1, base.layernorm, text=False)
        if isinstance(base, CLIPVisionModel):
            return Family("clip", base, base.encoder.layers, 1, None, text=False)
    return None


def encoder_layers(model: torch.nn.Module):
    """The layer list of a supported encoder, or None (used by `trim` to size the schedule)."""
    family = find_family(model)
    return family.layers if family is not None else None


# ---- live state ----------------------------------------------------------------------------------
@dataclass
class _Live:
    valid: torch.Tensor | None          # (B, T) bool
    size: torch.Tensor | None = None    # (B, T) float: input tokens each slot holds
    owner: torch.Tensor | None = None   # (B, N) slot holding each input token, -1 dropped
    stash: torch.Tensor | None = None   # (B, N, D) hidden state of dropped input tokens
    dropped: torch.Tensor | None = None  # (B, N) bool: input token dropped (its output is in `stash`)
    reduced: bool = False               # the layout differs from the input's
    irregular: bool = False             # some slot is invalid (padding / filler) or size != 1


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


def check_supported(model: torch.nn.Module) -> Family:
    family = find_family(model)
    if family is None:
        raise UnsupportedModelError(
            f"trimformer has no encoder adapter for {type(model).__name__}; supported: "
            + "; ".join(ENCODER_ARCHITECTURES)
        )
    if family.name == "bert" and getattr(family.base.config, "is_decoder", False):
        raise UnsupportedModelError("a BERT model configured as a decoder (is_decoder=True) is not supported")
    kernel = family.base.config._attn_implementation or "eager"
    if kernel not in ATTENTION_KERNELS:
        raise UnsupportedModelError(
            f"attention implementation {kernel!r} is not supported on encoders (it takes no additive bias); "
            f"load the model with attn_implementation in {ATTENTION_KERNELS}"
        )
    return family


class EncoderPatch:
    kind = "encoder"
    architectures = ENCODER_ARCHITECTURES

    @classmethod
    def matches(cls, model) -> bool:
        return find_family(model) is not None

    @classmethod
    def layers(cls, model):
        return find_family(model).layers

    """Makes an encoder merge (ToMe) or drop tokens inside each layer; `remove` undoes it exactly."""

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        self.family = check_supported(model)
        self.model = model
        self.config = config
        self.method = method
        self.num_layers = len(self.family.layers)
        self.merging = method.name == "tome"
        self.unmerging = self.merging and config.tome_mode == "merge_unmerge"
        if config.tome_mode != "merge" and not self.merging:
            raise ConfigError(f"tome_mode={config.tome_mode!r} applies to method 'tome', not {method.name!r}")
        if self.unmerging:
            if self.family.name != "bert":
                raise UnsupportedModelError(
                    f"tome_mode 'merge_unmerge' is implemented for BERT-family encoders, not {self.family.name!r}; "
                    "use tome_mode='merge' there")
            if config.adaptive:
                raise ConfigError("tome_mode 'merge_unmerge' takes a fixed schedule (r or keep); adaptive=True is "
                                  "for tome_mode 'merge'")
            if config.merge_metric == "keys":
                raise ConfigError("tome_mode 'merge_unmerge' matches on each block's input hidden states; "
                                  "merge_metric must be 'auto' or 'hidden'")
        if config.cls_only_last and self.merging:
            raise ConfigError("cls_only_last drops every token but [CLS] before the last MLP; with method 'tome' "
                              "use a dropping method (tsdtp, cls_attention, random) or leave it False")
        self.metric = self._merge_metric()
        if method.evicts or not method.prunes_prefill or method.name in DECODER_ONLY_METHODS:
            from .decoder import SUPPORTED

            raise UnsupportedModelError(
                f"method {method.name!r} is for decoder-only models ({', '.join(SUPPORTED)}): it works on the "
                f"last queries and the KV cache of decoding; {type(model).__name__} is an encoder: use "
                f"{', '.join(ENCODER_METHODS)} (or another method scoring from [CLS] attention or hidden states)"
            )
        if config.adaptive_mode not in ADAPTIVE_MODES:
            raise ConfigError(f"adaptive_mode must be one of {ADAPTIVE_MODES}, got {config.adaptive_mode!r}")
        # adaptive_mode "similarity" (tome): merge every matched pair at least merge_threshold alike; r or
        # keep / reduction_ratio, when given, cap the merges per layer
        self.similarity = config.adaptive and config.adaptive_mode == "similarity"
        if self.similarity and not self.merging:
            raise ConfigError(f"adaptive_mode 'similarity' merges similar tokens: it is for method 'tome', not "
                              f"{method.name!r}; use adaptive_mode 'sampling' or 'mass'")
        self._uncapped = self.similarity and config.r is None and config.keep is None
        if self.merging:
            self.plan = {}
            self.score = None
            if config.r is not None:
                self._rs = parse_r(self.num_layers, config.r, config.r_schedule)
            else:
                parse_r(self.num_layers, 0, config.r_schedule)   # validates the schedule name
                self._rs = None                                   # derived from keep per forward
        else:
            self.plan = dict(plan)
            self.score = method.build_scorer(config, model, plan)
        self.state: EncoderState | None = None
        self.live: _Live | None = None
        self.rs: list[int] = list(self._rs) if self.merging and self._rs is not None else []
        self._hooks = Hooks()
        self._captured: dict[str, torch.Tensor] = {}
        self._capture_layer: int | None = None
        self._want = self._capture_needs()

    def _capture_needs(self) -> dict[int, set]:
        cfg, needs = self.config, {}
        for layer in range(self.num_layers):
            want = set()
            if self.unmerging:
                pass                                  # matches on each block's input, captures nothing
            elif self.merging:
                if self.metric == "keys":
                    want.add("k")
                if cfg.adaptive and not self.similarity:
                    want |= {"q", "k", "v"}
            elif layer in self.plan:
                if self.method.needs_attention or cfg.adaptive:
                    want |= {"q", "k"}
                if cfg.adaptive and cfg.adaptive_mode == "sampling":
                    want.add("v")
            if want:
                needs[layer] = want
        return needs

    def _merge_metric(self) -> str:
        """What ToMe compares: "keys" (the keys' head-mean, as ToMe does on ViT) or "hidden" (the states
        being averaged). "auto" takes hidden on text: on all-MiniLM-L6-v2 (12 heads of 32 dims) the
        32-dim head-mean of the keys is a weak summary, and matching on it loses 2-3x more embedding
        cosine at the same reduction (README, "Encoders")."""
        if self.config.merge_metric == "auto":
            return "hidden" if self.family.text else "keys"
        return self.config.merge_metric

    # ---- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        try:
            base = self.family.base
            self._hooks.add(base.register_forward_pre_hook(self._on_start, with_kwargs=True))
            self._hooks.add(base.register_forward_hook(self._on_end, with_kwargs=True))
            for index, layer in enumerate(self.family.layers):
                _, q, k, v, _, _ = self.family.attention(layer)
                for name, module in (("q", q), ("k", k), ("v", v)):
                    if name in self._want.get(index, ()):
                        self._hooks.add(module.register_forward_hook(self._capture(index, name)))
                self._hooks.override_forward(layer, self._layer_forward(index, layer))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self._hooks.remove()
        self.live = None
        self._captured.clear()

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self._capture_layer == layer:
                self._captured[name] = output
        return hook

    # ---- base model hooks --------------------------------------------------------------------
    def _on_start(self, module, args, kwargs):
        mask = kwargs.get("attention_mask") if self.family.text else None
        if self.family.text and mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
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
        self.live = _Live(valid)
        self.state = None
        return None

    def _start_rows(self, hidden: torch.Tensor) -> None:
        live = self.live
        b, t, _ = hidden.shape
        if live.valid is None:
            live.valid = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
        elif live.valid.shape != (b, t):
            raise InputError(f"attention_mask has shape {tuple(live.valid.shape)} but the input has {(b, t)} tokens")
        else:
            live.irregular = not bool(live.valid.all())
        live.owner = torch.arange(t, device=hidden.device).expand(b, -1).clone()
        lengths = live.valid.sum(-1)
        if live.irregular:
            live.owner = torch.where(live.valid, live.owner, -1)
        self.state = EncoderState(lengths.cpu())
        if self.unmerging:
            self._start_unmerge(lengths)
        elif self.merging:
            if self._rs is None:   # from keep: each row by its own length, so rows do not affect each other
                keep = self.config.keep if self.config.keep is not None else 0.5
                per_row = {}
                for n in lengths.tolist():
                    if n not in per_row:
                        r = r_for_keep(int(n), self.num_layers, keep, self.family.protected + self.family.text,
                                        self.config.r_schedule)
                        per_row[n] = parse_r(self.num_layers, r, self.config.r_schedule)
                rows = [per_row[n] for n in lengths.tolist()]
                if all(row == rows[0] for row in rows):
                    self.rs = rows[0]
                else:
                    table = torch.tensor(rows, device=hidden.device).T          # (L, B)
                    self.rs = [table[layer] for layer in range(self.num_layers)]
            else:
                self.rs = list(self._rs)

    def _unmerge_costs(self) -> tuple[float, float]:
        return UNMERGE_ATTENTION_COST[self.config.unmerge_attention], 1.0 if self.config.unmerge_mlp else 0.0

    def _start_unmerge(self, lengths: torch.Tensor) -> None:
        """merge_unmerge: (r before the attention, r before the MLP) per layer, each an int or (B,) per row."""
        costs = self._unmerge_costs()
        protected = self.family.protected + 1                         # [CLS] and [SEP]
        if self._rs is None:
            keep = self.config.keep if self.config.keep is not None else 0.5
            per_row = {n: unmerge_schedule(n, self.num_layers, keep, protected, costs) for n in set(lengths.tolist())}
            rows = [per_row[n] for n in lengths.tolist()]
        else:
            rows = [[(r if costs[0] > 0 else 0, r if costs[1] > 0 else 0) for r in self._rs]] * len(lengths)
        if all(row == rows[0] for row in rows):
            self.rs = [tuple(pair) for pair in rows[0]]
        else:
            table = torch.tensor(rows, device=self.live.valid.device)     # (B, L, 2)
            self.rs = [(table[:, layer, 0], table[:, layer, 1]) for layer in range(self.num_layers)]

    def _on_end(self, module, args, kwargs, output):
        live, state = self.live, self.state
        self.live = None
        self._capture_layer = None
        self._captured.clear()
        if live is None or state is None:
            return output
        state.owner = live.owner
        state.kept = live.owner >= 0
        if not live.reduced:
            return output
        hidden = output.last_hidden_state                       # (B, T', D)
        dim = hidden.shape[-1]
        out = hidden.gather(1, live.owner.clamp(min=0)[:, :, None].expand(-1, -1, dim))
        if live.stash is not None:
            stash = live.stash
            if self.family.final_norm is not None:
                stash = self.family.final_norm(stash)
            stash = torch.where(live.dropped[:, :, None], stash.to(out.dtype), torch.zeros_like(out))
        else:
            stash = torch.zeros_like(out)
        out = torch.where((live.owner >= 0)[:, :, None], out, stash)    # padding: zeros
        output.last_hidden_state = out
        return output

    # ---- layers ------------------------------------------------------------------------------
    def _layer_forward(self, index: int, layer: torch.nn.Module):
        original = type(layer).forward.__get__(layer)
        family = self.family

        def forward(hidden_states, attention_mask=None, *args, **kwargs):
            live = self.live
            if live is None:
                return original(hidden_states, attention_mask, *args, **kwargs)
            if live.owner is None:
                self._start_rows(hidden_states)
            for name in ("encoder_hidden_states", "encoder_attention_mask"):
                kwargs.pop(name, None)
            drop_cache_kwargs(kwargs)
            if self.unmerging:
                return self._unmerge_layer(index, layer, hidden_states, attention_mask, kwargs, original)
            bias = None
            if live.reduced or live.irregular:
                proportional = self.config.prop_attn and live.size is not None
                size = live.size if live.size is not None else live.valid.to(hidden_states.dtype)
                bias = attention_bias(size, proportional, hidden_states.dtype)
            mask = attention_mask                         # the model's own mask until the layout changes
            if live.reduced:
                proportional = self.config.prop_attn and live.size is not None
                mask = bias if (live.irregular or proportional) else None
            self.state.attn_tokens.append(live.valid.sum(-1).cpu())
            self._capture_layer = index if index in self._want else None
            self._captured.clear()

            def reduce(h):
                self._capture_layer = None
                out = self._reduce(index, h, bias)
                self._captured.clear()
                return out

            out = family.run(layer, hidden_states, mask, kwargs, reduce)
            return out

        return forward

    def _reduce(self, layer: int, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        live, state = self.live, self.state
        merged = dropped = 0
        if self.merging:
            h, merged = self._merge(layer, h, bias)
        elif layer in self.plan:
            h, dropped = self._drop(layer, h, bias)
        if self.config.cls_only_last and layer == self.num_layers - 1:
            h, gone = self._keep_leading(h)
            dropped += gone
        state.merged.append(merged)
        state.dropped.append(dropped)
        state.mlp_tokens.append(live.valid.sum(-1).cpu())
        if self.config.trace_source:
            state.owners.append(live.owner.clone())
        return h

    def _cls_attention(self, layer: int, bias: torch.Tensor | None) -> torch.Tensor:
        _, _, _, _, heads, scaling = self.family.attention(self.family.layers[layer])
        q, k = self._captured["q"], self._captured["k"]
        b, t, _ = k.shape
        key = k.view(b, t, heads, -1).transpose(1, 2)
        query0 = q[:, 0].view(b, heads, -1)
        return cls_attention(query0, key, scaling, bias)

    def _value_norm(self) -> torch.Tensor:
        v = self._captured["v"]
        return v.float().norm(dim=-1)

    def _adaptive_keep(self, layer: int, bias, target: torch.Tensor, candidate: torch.Tensor,
                       n_protected: torch.Tensor) -> torch.Tensor:
        """(B,) tokens kept per row by ATS: at most `target`, fewer when the scores are peaked."""
        attention = self._cls_attention(layer, bias)
        if self.config.adaptive_mode == "sampling":
            scores = ats_scores(attention, self._value_norm())
            samples = (target - n_protected).clamp(min=0)
            counts = ats_counts(scores, candidate, samples) + n_protected
        else:
            counts = mass_counts(attention.masked_fill(~candidate, 0.0), candidate, self.config.mass,
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
        live = self.live
        if not self.family.text:
            return None
        last = (self.state.lengths.to(live.owner.device) - 1).clamp(min=0)
        slot = live.owner.gather(1, last[:, None])                          # (B, 1)
        out = torch.zeros(live.owner.shape[0], t, dtype=torch.bool, device=live.owner.device)
        return out.scatter_(1, slot.clamp(min=0), slot >= 0)

    # ---- ToMe --------------------------------------------------------------------------------
    def _merge(self, layer: int, h: torch.Tensor, bias) -> tuple[torch.Tensor, int]:
        live, cfg = self.live, self.config
        r = self.rs[layer] if layer < len(self.rs) else 0       # an int, or (B,) per row
        b, t, _ = h.shape
        if not cfg.adaptive and (int(r.max()) if isinstance(r, torch.Tensor) else r) <= 0:
            return h, 0
        rows: int | torch.Tensor = t if self._uncapped else r    # (merges are capped at half a row anyway)
        if cfg.adaptive and not self.similarity:
            protected = self._protected()
            n_valid = live.valid.sum(-1)
            n_protected = protected.sum(-1)
            target = (n_valid - r).clamp(min=1)
            keep = self._adaptive_keep(layer, bias, target, live.valid & ~protected, n_protected)
            rows = (n_valid - keep).clamp(min=0)
        if self.metric == "hidden":
            metric = h                                                  # (B, T, D)
        else:
            _, _, _, _, heads, _ = self.family.attention(self.family.layers[layer])
            metric = self._captured["k"].view(b, t, heads, -1).mean(2)   # (B, T, head_dim)
        m = bipartite_soft_matching(metric, rows, self.family.protected, live.valid if live.irregular or cfg.adaptive
                                    else None, protect=self._sep_slots(t),
                                    threshold=cfg.merge_threshold if self.similarity else None)
        n = live.valid.sum(-1)
        self.state.merge_flops += float((2 * metric.shape[-1] * ((n + 1) // 2) * (n // 2)).sum())
        before = int(live.valid.sum())
        if live.irregular or cfg.adaptive:
            new_valid = set_compaction(m, merge_valid(m, live.valid))
        size = live.size if live.size is not None else live.valid.to(h.dtype)   # padding holds nothing
        h, size = merge_wavg(m, h, size)
        live.owner = merge_owner(m, live.owner, t)
        if m.order is not None:
            live.valid = new_valid
            live.irregular = live.irregular or not bool(new_valid.all())
        else:
            live.valid = size > 0
        live.size = size
        live.reduced = True
        return h, before - int(live.valid.sum())

    # ---- merge and unmerge (ToMe for Stable Diffusion) ----------------------------------------
    def _block_merge(self, x: torch.Tensor, r) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge `r` tokens of a block's input x (B, T, D) for its computation only: (merge, merged x,
        sizes, merged per row). Matches on x itself; [CLS] and each row's [SEP] are never merged."""
        live = self.live
        b, t, d = x.shape
        ragged = live.irregular or isinstance(r, torch.Tensor)
        m = bipartite_soft_matching(x, r, self.family.protected, live.valid if live.irregular else None,
                                    protect=self._sep_slots(t))
        if ragged:
            set_compaction(m, merge_valid(m, live.valid))
        xm, size = merge_wavg(m, x, live.valid.to(x.dtype))
        n = live.valid.sum(-1)
        merged = n - (size > 0).sum(-1)
        half_a, half_b = (n + 1) // 2, n // 2                           # valid A and B slots per row
        self.state.merge_flops += float((2 * d * half_a * half_b + 3 * d * n).sum())
        return m, xm, size, merged.cpu()

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
        live, state, cfg = self.live, self.state, self.config
        n = live.valid.sum(-1).cpu()
        ra, rm = self.rs[index]
        attn_mode = cfg.unmerge_attention if _any(ra) else "none"
        mlp_merges = cfg.unmerge_mlp and _any(rm)
        merged = 0
        if attn_mode == "none" and not mlp_merges:                      # nothing merged here: the layer as is
            out = original(x, attention_mask, **kwargs)
            state.attn_tokens.append(n)
            state.kv_tokens.append(n)
            state.mlp_tokens.append(n)
            state.merged.append(0)
            state.dropped.append(0)
            if cfg.trace_source:
                state.owners.append(live.owner.clone())
            return out
        q_tokens = kv_tokens = n
        if attn_mode == "none":
            h, _ = layer.attention(x, attention_mask, **kwargs)
        else:
            m, xm, size, gone = self._block_merge(x, ra)
            merged += int(gone.sum())
            merged_bias = attention_bias(size, cfg.prop_attn, x.dtype)
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
        if cfg.trace_source:
            state.owners.append(live.owner.clone())
        return out

    # ---- dropping ----------------------------------------------------------------------------
    def _drop(self, layer: int, h: torch.Tensor, bias) -> tuple[torch.Tensor, int]:
        live, cfg = self.live, self.config
        t = h.shape[1]
        valid = live.valid
        protected = self._protected()
        attention = self._cls_attention(layer, bias) if "q" in self._captured and "k" in self._captured else None
        positions = self._positions(t)
        inputs = ScoreInputs(layer=layer, positions=positions, valid=valid, lengths=self.state.lengths.to(h.device),
                             hidden=h, attention=attention, seed=cfg.seed)
        scores = self.score(inputs).float()
        if self.method.span_pool and cfg.span > 1:
            scores = span_max_pool(scores.masked_fill(~valid, 0.0), cfg.span)
        n_valid, n_protected = valid.sum(-1), protected.sum(-1)
        threshold = getattr(self.score, "keep_counts", None)    # a dynamic threshold (tsdtp) replaces the ratio
        if threshold is not None:
            counts = threshold(layer, scores, valid, protected)
        else:
            counts = ratio_counts(n_valid, self.plan[layer], n_protected)
        if cfg.adaptive:
            counts = torch.maximum(self._adaptive_keep(layer, bias, counts, valid & ~protected, n_protected),
                                   n_protected)
        index, kept = select(scores, valid, protected, counts)
        return self._keep_slots(h, index, kept)

    def _keep_leading(self, h: torch.Tensor) -> tuple[torch.Tensor, int]:
        """cls_only_last: keep only the leading protected slots ([CLS], DeiT's distillation token) for the
        last layer's MLP."""
        n = self.family.protected
        index = torch.arange(n, device=h.device).expand(h.shape[0], n)          # (B, n)
        return self._keep_slots(h, index, self.live.valid[:, :n])

    def _keep_slots(self, h: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Keep slots `index` (B, K') of h (B, T, D), ascending, `kept` (B, K') False for filler; the other
        live tokens are dropped, their states stashed as their outputs. Returns the kept states and the
        number dropped."""
        live = self.live
        b, t, d = h.shape
        valid = live.valid
        keep_mask = torch.zeros_like(valid).scatter_(1, index, kept)
        gone = valid & ~keep_mask
        n_gone = int(gone.sum())
        if n_gone:
            holder = live.owner.clamp(min=0)
            owner_gone = (live.owner >= 0) & gone.gather(1, holder)
            if live.stash is None:
                live.stash = h.new_zeros(b, live.owner.shape[1], d)
                live.dropped = torch.zeros_like(owner_gone)
            hidden_in = h.gather(1, holder[:, :, None].expand(-1, -1, d))
            live.stash = torch.where(owner_gone[:, :, None], hidden_in, live.stash)
            live.dropped = live.dropped | owner_gone
        mapping = torch.full((b, t), -1, dtype=torch.long, device=h.device)
        mapping.scatter_(1, index, torch.where(kept, torch.arange(index.shape[1], device=h.device).expand(b, -1), -1))
        live.owner = torch.where(live.owner >= 0, mapping.gather(1, live.owner.clamp(min=0)), live.owner)
        h = h.gather(1, index[:, :, None].expand(-1, -1, d))
        if live.size is not None:
            live.size = live.size.gather(1, index) * kept
        live.valid = kept
        live.reduced = True
        live.irregular = live.irregular or not bool(kept.all())
        return h, n_gone

    def _positions(self, t: int) -> torch.Tensor:
        """(B, T) the first input index each slot holds (its original position)."""
        owner = self.live.owner
        b, n = owner.shape
        big = torch.full((b, t + 1), n, dtype=torch.long, device=owner.device)
        index = torch.where(owner >= 0, owner, t)
        src = torch.arange(n, device=owner.device).expand(b, -1)
        return big.scatter_reduce(1, index, src, reduce="amin")[:, :t].clamp(max=n - 1)

    # ---- stats -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        state = self.state
        if state is None or not state.attn_tokens:
            from ..errors import TrimformerError

            raise TrimformerError("no forward has run since trim(); stats describe the last forward")
        config = self.family.base.config
        lengths = [int(n) for n in state.lengths]
        attn = torch.stack(state.attn_tokens)                    # (L, B) queries (and o projection)
        kv = torch.stack(state.kv_tokens) if state.kv_tokens else attn     # (L, B) keys / values
        mlp = torch.stack(state.mlp_tokens)
        full = torch.tensor(lengths)[None].expand_as(attn)
        flops_full = encoder_flops(config, full, full)
        flops_trimmed = encoder_flops(config, attn, mlp, kv) + int(state.merge_flops)
        total = 2 * int(full.sum())
        done = float(attn.sum() + kv.sum()) / 2 + int(mlp.sum())    # attention: half q/o, half k/v
        if self.unmerging:
            def listed(v):
                return v.tolist() if isinstance(v, torch.Tensor) else v
            schedule = {"tome_mode": "merge_unmerge", "unmerge_attention": self.config.unmerge_attention,
                        "unmerge_mlp": self.config.unmerge_mlp,
                        "r_attention": [listed(a) for a, _ in self.rs], "r_mlp": [listed(m) for _, m in self.rs]}
        elif self.merging:
            schedule = {"r": [r.tolist() if isinstance(r, torch.Tensor) else r for r in self.rs]}
        else:
            schedule = dict(self.plan)
        result = {
            "method": self.config.method,
            "architecture": self.family.name,
            "schedule": schedule,
            "adaptive": bool(self.config.adaptive),
            "prompt_tokens": lengths,
            "input_tokens": lengths,
            "kept_tokens_per_layer": attn.sum(-1).tolist(),
            "mlp_tokens_per_layer": mlp.sum(-1).tolist(),
            "final_tokens": mlp[-1].tolist(),
            "merged_per_layer": list(state.merged),
            "dropped_per_layer": list(state.dropped),
            "kv_tokens_per_layer": kv.sum(-1).tolist(),
            "kept_fraction": done / total if total else 1.0,
            "merge_flops": int(state.merge_flops),
            "flops_full": flops_full,
            "flops_trimmed": flops_trimmed,
            "flop_ratio": flops_full / flops_trimmed if flops_trimmed else 1.0,
        }
        return result


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


def _any(r) -> bool:
    """Whether a schedule entry (an int, or (B,) per row) merges anything."""
    return bool(int(r.max()) > 0) if isinstance(r, torch.Tensor) else r > 0
