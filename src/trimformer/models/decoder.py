"""Adapter for decoder-only Llama-family models (Llama, Qwen2, Mistral, SmolLM).

It hooks the base model and each decoder layer; transformers' own forward runs unchanged. Per forward:

* the base model's pre-hook fixes the original position and validity of every input token;
* each layer's pre-hook gives the layer the mask, rotary embeddings and positions of the tokens still
  live, and records which original position each of the layer's KV-cache slots holds;
* at a pruning layer (prefill) the post-hook scores, selects and gathers the live tokens, and parks the
  dropped ones' hidden states in the aux cache;
* at a pruning layer (decoding) the post-hook revives aux tokens the new query attends to: they join
  the live tokens and run through the remaining layers only, their keys entering the cache at their
  original positions;
* the base model's post-hook gives back one output per input token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import AuxEntry, LayerSlots, TrimState
from ..config import TrimConfig
from ..errors import ConfigError, InputError, UnsupportedModelError
from ..methods import Method, ScoreInputs
from ..policy import mass_counts, ratio_counts, select
from ..scoring import last_query_attention, newest_query_attention, span_max_pool
from .attention_hook import PROBE_KWARG, Probe, original_kernel, wrapped_name
from .cache_names import cache_from
from .hooks import Hooks
from .kv_buffer import use_in_place
from .runtime import RuntimeEviction, new_runtime_state

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ATTENTION_KERNELS = ("sdpa", "eager")
STATE_ATTR = "_trimformer_state"


@dataclass
class _Live:
    """The tokens flowing through the layers during one forward."""

    positions: torch.Tensor   # (B, Q) original positions
    valid: torch.Tensor       # (B, Q) bool
    source: torch.Tensor      # (B, Q) index in the input sequence, -1 for revived tokens
    cos: torch.Tensor         # (B, Q, hd) rotary embeddings at `positions`
    sin: torch.Tensor         # (B, Q, hd)
    n_input: int              # input tokens of this forward (revived tokens come after them)
    prefill: bool
    in_order: bool = True     # slots sorted by position with no past: the plain causal mask holds
    _n_valid: int | None = None  # valid.sum(), counted once per change of `valid` (every layer reads it)
    _newest: tuple[torch.Tensor, torch.Tensor] | None = None   # `newest()`, until the tokens change

    def n_valid(self) -> int:
        if self._n_valid is None:
            self._n_valid = int(self.valid.sum())
        return self._n_valid

    def all_valid(self) -> bool:
        return self.n_valid() == self.valid.numel()

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B, 1), position (B, 1)) of the last input token: the query that decoding scores with."""
        if self._newest is None:
            index = torch.full((self.positions.shape[0], 1), self.n_input - 1, device=self.positions.device)
            self._newest = index, self.positions.gather(1, index)
        return self._newest

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        self.positions = self.positions.gather(1, index)
        self.source = self.source.gather(1, index)
        self.cos = _gather_rows(self.cos, index)
        self.sin = _gather_rows(self.sin, index)
        self.valid, self._n_valid, self._newest = valid, None, None

    def extend(self, positions, valid, cos, sin) -> None:
        self.positions = torch.cat([self.positions, positions], 1)
        self.valid, self._n_valid, self._newest = torch.cat([self.valid, valid], 1), None, None
        self.source = torch.cat([self.source, torch.full_like(positions, -1)], 1)
        self.cos = torch.cat([self.cos, cos], 1)
        self.sin = torch.cat([self.sin, sin], 1)
        self.in_order = False

    def to(self, device: torch.device) -> None:
        """Follow the layer about to run onto its device (a no-op when it is already there)."""
        if self.positions.device == device:
            return
        for name in ("positions", "valid", "source", "cos", "sin"):
            setattr(self, name, getattr(self, name).to(device))
        self._newest = None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Q, D), index (B, K) -> (B, K, D)."""
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))


def execution_device(module: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Where `module` computes: the execution device of accelerate's hook on it (`device_map`, CPU or
    disk offload: its weights may wait on the meta device), else `fallback` (its input's device)."""
    hook = module.__dict__.get("_hf_hook")   # accelerate sets it as a plain attribute (no nn.Module lookup)
    for part in getattr(hook, "hooks", (hook,)):       # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)   # an int is an index on the machine's accelerator
    return fallback


def _cached_slots(cache, layer: int) -> int:
    """Slots in the cache of `layer` (`cache.get_seq_length(layer)`, read straight from an initialised layer's
    keys: the pre-hooks ask once per layer and step)."""
    layers = getattr(cache, "layers", None)
    layer_cache = layers[layer] if layers is not None and layer < len(layers) else None
    if getattr(layer_cache, "is_initialized", False) and getattr(layer_cache, "keys", None) is not None:
        return layer_cache.keys.shape[-2]
    return cache.get_seq_length(layer)


def last_valid_slots(valid: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """valid (B, Q) -> (index (B, W), in_window (B, W)): each row's last `window` valid slots, in order
    (rows with fewer valid slots are filled with slots flagged False)."""
    width = min(window, valid.shape[1])
    from_end = valid.flip(-1).cumsum(-1).flip(-1)                      # valid slots at or after i
    in_window = valid & (from_end <= width)
    slot = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    index = torch.where(in_window, slot, -1).topk(width, dim=-1).indices.sort(dim=-1).values
    return index, in_window.gather(1, index)


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise UnsupportedModelError(
            f"trimformer has no adapter for {name}; supported decoder architectures: {', '.join(SUPPORTED)}"
        )
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        name == "MistralForCausalLM" and getattr(config, "sliding_window", None)
    ):
        raise UnsupportedModelError(
            f"{name} with sliding-window attention is not supported (its cache drops slots on its own); "
            "use a config with sliding_window=None"
        )
    kernel = original_kernel(config._attn_implementation)
    if kernel not in ATTENTION_KERNELS:
        raise UnsupportedModelError(
            f"attention implementation {kernel!r} is not supported; load the model with "
            f"attn_implementation in {ATTENTION_KERNELS}"
        )


class DecoderPatch:
    """Hooks that make a Llama-family model prune tokens layer by layer; `remove` undoes them exactly."""

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        check_supported(model)
        if config.cls_only_last:
            raise ConfigError("cls_only_last is for encoders read through [CLS] (BERT-family classifiers); a "
                              "decoder's output is its last token's")
        self.model = model
        self.base = model.model
        self.config = config
        self.method = method
        self.plan = plan
        self.revive = method.revive_default if config.revive is None else config.revive
        if self.revive and method.evicts and method.prunes_prefill:
            raise ConfigError(
                f"revive=True cannot be combined with {method.name!r}: revival finds a pruned prompt token by its "
                "slot in the layer's KV cache, and decode-time eviction moves those slots. Use revive=False (the "
                "runtime's shadow set brings evicted tokens back) or the prefill method alone"
            )
        self.score = method.build_scorer(config, model, plan) if method.prunes_prefill else None
        self.runtime = RuntimeEviction(config, len(model.model.layers)) if method.evicts else None
        self.num_layers = len(self.base.layers)
        self.live: _Live | None = None
        self.state: TrimState | None = None     # state of the sequence in flight (also kept for stats)
        self._hooks = Hooks()
        self._original_attn: str | None = None
        self._kernel = original_kernel(model.config._attn_implementation)   # "sdpa" or "eager"

    # ---- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        try:
            self._hooks.add(self.base.register_forward_pre_hook(self._on_start, with_kwargs=True))
            self._hooks.add(self.base.register_forward_hook(self._on_end, with_kwargs=True))
            for index, layer in enumerate(self.base.layers):
                self._hooks.add(layer.register_forward_pre_hook(self._layer_pre(index), with_kwargs=True))
                if index in self.plan or self.runtime is not None:
                    self._hooks.add(layer.register_forward_hook(self._layer_post(index), with_kwargs=True))
            self._original_attn = self.model.config._attn_implementation
            self.model.config._attn_implementation = wrapped_name(self._original_attn)
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        self._hooks.remove()
        if self._original_attn is not None:
            self.model.config._attn_implementation = self._original_attn
            self._original_attn = None
        self.live = None

    # ---- base model hooks --------------------------------------------------------------------
    def _on_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, length = ref.shape[0], ref.shape[1]
        device = ref.device
        cache = cache_from(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            raise InputError(
                f"a trimmed model takes a 2-D attention_mask (batch, length) of 0/1, got {mask2d.dim()}-D"
            )
        mask2d = mask2d.to(device) if mask2d is not None else None
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        if mask2d is not None:
            valid = mask2d[:, -length:].bool()
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            positions = position_ids.to(device).expand(batch, -1).long()
        elif mask2d is not None:
            positions = (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            state = getattr(cache, STATE_ATTR, None) if past else None
            start = state.next_position[:, None].to(device) if state is not None else \
                torch.full((batch, 1), past, device=device)
            positions = start + torch.arange(length, device=device)

        prefill = past == 0
        if prefill:
            lengths = valid.sum(-1)
            if self.plan:
                protected = self.config.sinks + self.config.protect_last
                short = int(lengths.min())
                if short <= protected:
                    raise InputError(
                        f"a prompt of {short} tokens is not longer than the {protected} protected tokens "
                        f"(sinks={self.config.sinks} + protect_last={self.config.protect_last}); "
                        "give a longer prompt or lower sinks / protect_last"
                    )
            self.state = TrimState(self.num_layers, lengths.cpu())
            if self.runtime is not None:
                self.state.runtime = new_runtime_state(self.num_layers)
        else:
            self.state = getattr(cache, STATE_ATTR, None)
            if self.state is None:
                lengths = [cache.get_seq_length(i) for i in range(self.num_layers)]
                self.state = TrimState.for_untrimmed_cache(self.num_layers, lengths, batch, device)
            self.state.steps += 1
            if self.runtime is not None:
                use_in_place(cache)   # an evicting cache appends in place (models/kv_buffer.py)
        if cache is not None:
            setattr(cache, STATE_ATTR, self.state)

        dtype = self.base.embed_tokens.weight.dtype
        cos, sin = self.base.rotary_emb(torch.empty(0, dtype=dtype, device=device), positions)
        cos, sin = cos.to(device).expand(batch, -1, -1), sin.to(device).expand(batch, -1, -1)
        source = torch.arange(length, device=device).expand(batch, -1)
        self.live = _Live(positions, valid, source, cos, sin, length, prefill, in_order=prefill)

    def _on_end(self, module, args, kwargs, output):
        live, state = self.live, self.state
        self.live = None
        if live is None:
            return output
        if self.runtime is not None and not live.prefill:
            self.runtime.flush(cache_from(kwargs), state, live)     # layers that evict after the last check
        hidden = output.last_hidden_state                     # (B, Q_live, D), already normed
        if live.prefill and state.aux:
            hidden = self._restore_prompt_order(hidden, live, state)
        elif hidden.shape[1] != live.n_input:
            hidden = hidden[:, : live.n_input]
        output.last_hidden_state = hidden
        state.next_position = live.positions[:, : live.n_input].max(-1).values + 1 if live.prefill else \
            live.positions[:, live.n_input - 1] + 1
        return output

    def _restore_prompt_order(self, hidden, live: _Live, state: TrimState) -> torch.Tensor:
        """(B, Q_kept, D) -> (B, T, D): kept tokens' outputs at their input index; a pruned token's entry
        is its hidden state when it was dropped (normed): it was not computed further."""
        batch, _, dim = hidden.shape
        device = hidden.device
        out = hidden.new_zeros(batch, live.n_input, dim)
        live.to(device)
        for entry in state.aux.values():
            index = entry.source.to(device).clamp(min=0)[:, :, None].expand(-1, -1, dim)
            normed = self.base.norm(entry.hidden).to(device)
            current = out.gather(1, index)
            out.scatter_(1, index, torch.where(entry.waiting.to(device)[:, :, None], normed, current))
        index = live.source.clamp(min=0)[:, :, None].expand(-1, -1, dim)
        current = out.gather(1, index)
        out.scatter_(1, index, torch.where(live.valid[:, :, None], hidden, current))
        return out

    # ---- layer hooks -------------------------------------------------------------------------
    def _layer_pre(self, layer: int):
        def hook(module, args, kwargs):
            live, state = self.live, self.state
            if live is None:  # the layer is called outside the base model: leave it alone
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            device = execution_device(module, hidden.device)
            live.to(device)
            cache = cache_from(kwargs)
            previous = state.slots[layer].to(device) if cache is not None and state.slots[layer] is not None else None
            if previous is not None and previous.positions.shape[1] != _cached_slots(cache, layer):
                raise InputError(
                    f"the KV cache of layer {layer} holds {cache.get_seq_length(layer)} slots but trimformer "
                    f"tracked {previous.positions.shape[1]}: was it changed outside the trimmed model?"
                )
            if previous is None:
                keys = LayerSlots(live.positions, live.valid, live.all_valid())
            else:
                keys = previous.extend(live.positions, live.valid, live.all_valid())
            if cache is not None:
                state.slots[layer] = keys
                if getattr(cache, STATE_ATTR, None) is not state:
                    setattr(cache, STATE_ATTR, state)
            if live.prefill:
                state.computed[layer] += live.valid.sum(-1).cpu()
            if state.runtime is not None:
                state.runtime.seen[layer] += live.n_valid()

            kwargs["attention_mask"] = self._mask(live, keys, previous is not None, module)
            kwargs["position_embeddings"] = (live.cos, live.sin)
            kwargs["position_ids"] = live.positions
            probe = self._probe(layer, live, keys)
            if probe is not None:
                kwargs[PROBE_KWARG] = probe
            return args, kwargs

        return hook

    def _mask(self, live: _Live, keys: LayerSlots, has_past: bool, layer: torch.nn.Module) -> torch.Tensor | None:
        """None when SDPA's own causal (or single-query) path is exact, else a (B, 1, Q, K) mask by
        original position: a query sees valid keys at or before its position, and its own slot.
        Bool for SDPA; additive (0 / dtype min) for eager attention, which applies no causal mask itself."""
        q = live.positions.shape[1]
        if self._kernel == "sdpa" and keys.all_valid() and ((live.in_order and not has_past) or q == 1):
            return None
        k = keys.positions.shape[1]
        allowed = keys.valid[:, None, :] & (keys.positions[:, None, :] <= live.positions[:, :, None])
        own = torch.arange(k - q, k, device=allowed.device)
        allowed[:, torch.arange(q, device=allowed.device), own] = True
        if self._kernel == "eager":
            dtype = next(layer.parameters()).dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)[:, None]
        return allowed[:, None]

    def _probe(self, layer: int, live: _Live, keys: LayerSlots) -> Probe | None:
        cfg = self.config
        if self.runtime is not None and not (layer in self.plan and live.prefill and self.method.needs_attention):
            if live.prefill:
                index, q_valid = last_valid_slots(live.valid, cfg.window)
                return self.runtime.prefill_probe(live, keys, index, q_valid)
            step = self.state.steps
            readmits = cfg.readmit_every and step % cfg.readmit_every == 0 and self.runtime.checks(layer)
            if step % cfg.score_every == 0 or readmits:
                return self.runtime.decode_probe(live, keys, keep_query=bool(readmits))
            return None
        if layer not in self.plan:
            return None
        if live.prefill and self.method.needs_attention:
            index, q_valid = last_valid_slots(live.valid, cfg.window)
            q_pos = live.positions.gather(1, index)

            def scorer(query, key, scaling):
                return last_query_attention(query, key, scaling, q_pos, keys.positions, keys.valid, q_valid, cfg.pool)

            return Probe(scorer, index)
        if not live.prefill and self.revive and layer in self.state.aux and self.state.steps % cfg.revive_every == 0:
            index = torch.full((live.positions.shape[0], 1), live.n_input - 1, device=keys.positions.device)
            q_pos = live.positions.gather(1, index)

            def scorer(query, key, scaling):
                return newest_query_attention(query, key, scaling, q_pos, keys.positions, keys.valid)

            return Probe(scorer, index)
        return None

    def _layer_post(self, layer: int):
        def hook(module, args, kwargs, output):
            live = self.live
            if live is None:
                return None
            probe = kwargs.get(PROBE_KWARG)
            if self.runtime is not None:
                if live.prefill:
                    self.runtime.after_prefill(layer, self.state, probe)
                else:
                    self.runtime.after_decode(layer, cache_from(kwargs), self.state, live, probe)
            if live.prefill and layer in self.plan:
                return self._prune(layer, output, probe)
            if probe is not None and self.revive and layer in self.plan:
                return self._revive(layer, output, probe)
            return None

        return hook

    # ---- prefill: prune ----------------------------------------------------------------------
    def _prune(self, layer: int, hidden: torch.Tensor, probe: Probe | None) -> torch.Tensor:
        """hidden (B, Q, D) -> (B, Q', D): keep the selected tokens, park the rest in the aux cache."""
        live, state, cfg = self.live, self.state, self.config
        inputs = ScoreInputs(
            layer=layer,
            positions=live.positions,
            valid=live.valid,
            lengths=state.prompt_lengths.to(hidden.device),
            hidden=hidden,
            attention=probe.scores if probe is not None else None,
            seed=cfg.seed,
        )
        scores = self.score(inputs).float()                               # (B, Q)
        if self.method.span_pool:
            scores = span_max_pool(scores.masked_fill(~live.valid, 0.0), cfg.span)
        lengths = inputs.lengths[:, None]
        protected = live.valid & ((live.positions < cfg.sinks) | (live.positions >= lengths - cfg.protect_last))
        n_valid, n_protected = live.valid.sum(-1), protected.sum(-1)
        if cfg.adaptive:
            counts = torch.minimum(
                mass_counts(scores, live.valid, cfg.mass, n_protected),
                ratio_counts(n_valid, self.plan[layer], n_protected),
            )
        else:
            counts = ratio_counts(n_valid, self.plan[layer], n_protected)
        index, kept = select(scores, live.valid, protected, counts)              # (B, K'), (B, K')

        keep_mask = torch.zeros_like(live.valid).scatter_(1, index, kept)        # (B, Q)
        dropped = live.valid & ~keep_mask
        self._park(layer, hidden, dropped)
        live.gather(index, kept)
        return _gather_rows(hidden, index)

    def _park(self, layer: int, hidden: torch.Tensor, dropped: torch.Tensor) -> None:
        """Move the dropped tokens' hidden states to the aux cache of `layer` (or count them as gone)."""
        live, state = self.live, self.state
        width = int(dropped.sum(-1).max())
        if width == 0:
            return
        if not self.revive:
            state.dropped_for_good += int(dropped.sum())
        order = torch.sort((~dropped).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # dropped first
        state.aux[layer] = AuxEntry(
            hidden=_gather_rows(hidden, order),
            positions=live.positions.gather(1, order),
            slots=order,  # no past in prefill: the slot in this layer's cache is the live index
            source=live.source.gather(1, order),
            waiting=dropped.gather(1, order),
        )

    # ---- decoding: revive --------------------------------------------------------------------
    def _revive(self, layer: int, hidden: torch.Tensor, probe: Probe) -> torch.Tensor:
        """hidden (B, Q, D) -> (B, Q + R, D): aux tokens of `layer` the new query attends to strongly."""
        live, state, cfg = self.live, self.state, self.config
        entry = state.aux[layer]
        keys = state.slots[layer]
        attention = probe.scores                                                  # (B, K)
        n_keys = keys.valid.sum(-1, keepdim=True).clamp(min=1)
        relative = attention.gather(1, entry.slots) * n_keys                      # (B, N) x uniform
        wanted = entry.waiting & (relative >= cfg.revive_threshold)
        width = min(cfg.revive_max, int(wanted.sum(-1).max()))
        if width == 0:
            return hidden
        top = relative.masked_fill(~wanted, -1.0).topk(width, dim=-1).indices     # (B, R)
        chosen = wanted.gather(1, top)                                            # (B, R)
        entry.waiting.scatter_(1, top, entry.waiting.gather(1, top) & ~chosen)
        state.revived[layer] += int(chosen.sum())

        positions = entry.positions.gather(1, top)
        extra = _gather_rows(entry.hidden, top)
        cos, sin = self.base.rotary_emb(extra, positions)
        live.extend(positions, chosen, cos.to(extra.device), sin.to(extra.device))
        return torch.cat([hidden, extra], dim=1)
