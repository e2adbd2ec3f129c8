"""Adapter for decoder-only Llama-family models (Llama, Qwen2, Qwen3, Mistral, SmolLM).

It hooks the base model and each decoder layer; transformers' own forward runs unchanged. Per forward:

* the base model's pre-hook fixes the original position and validity of every input token;
* each layer's pre-hook gives the layer the mask, rotary embeddings and positions of the tokens still
  live, and records which original position each of the layer's KV-cache slots holds;
* the attention wrapper (`attention_hook.py`) hands the mechanisms what they asked for (a `Probe`);
* after a layer, prefill dropping (`mechanisms/prefill.py`) drops or revives tokens at the layers of its
  schedule, and decode-time eviction (`mechanisms/eviction.py`) accumulates scores and evicts;
* the base model's post-hook gives back one output per input token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..config import TrimConfig
from ..errors import ConfigError, InputError, TrimformerError, UnsupportedModelError
from ..mechanisms.eviction import RuntimeEviction
from ..mechanisms.kv_buffer import use_in_place
from ..mechanisms.prefill import PrefillDrop
from ..mechanisms.probe import Probe
from ..mechanisms.state import LayerSlots, RuntimeState, TrimState
from ..ops.flops import prefill_flops
from ..registry import Method
from .attention_hook import PROBE_KWARG, original_kernel, wrapped_name
from .base import Patch
from .cache_names import CACHE_KWARG, cache_from, keep_every_slot
from .live import Live, cached_slots, execution_device

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
ATTENTION_KERNELS = ("sdpa", "eager")
STATE_ATTR = "_trimformer_state"


def layer_windows(config) -> list[int | None]:
    """The sliding window of each layer (None for a layer with global attention): from `layer_types` where
    the config has them (Gemma 3, Qwen2/Qwen3 with `use_sliding_window`), else Mistral's `sliding_window`."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" else None for kind in types[:n]]
    return [window if config.model_type == "mistral" else None] * n


def check_supported(model: torch.nn.Module, supported: tuple[str, ...] = SUPPORTED) -> None:
    name = type(model).__name__
    if name not in supported:
        raise UnsupportedModelError(
            f"trimformer has no adapter for {name}; supported decoder architectures: {', '.join(supported)}"
        )
    kernel = original_kernel(model.config._attn_implementation)
    if kernel not in ATTENTION_KERNELS:
        raise UnsupportedModelError(
            f"attention implementation {kernel!r} is not supported; load the model with "
            f"attn_implementation in {ATTENTION_KERNELS}"
        )


class LlamaPatch(Patch):
    """Hooks that make a Llama-family model prune tokens layer by layer; `remove` undoes them exactly."""

    kind = "decoder"
    architectures = SUPPORTED

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        check_supported(model, self.architectures)
        if config.cls_only_last:
            raise ConfigError("cls_only_last is for encoders read through [CLS] (BERT-family classifiers); a "
                              "decoder's output is its last token's")
        super().__init__(model, config, method, plan)
        self.base = model.model
        self.num_layers = len(self.base.layers)
        self.windows = layer_windows(model.config)     # per layer: sliding window, or None for global attention
        if method.evicts and any(self.windows):
            raise ConfigError(
                f"{method.name!r} evicts from the KV cache while decoding, which trimformer does not do on models "
                "with sliding-window layers; use a prefill method (e.g. 'lazy' or 'sdtp')"
            )
        self.revive = method.revive_default if config.prune.revive is None else config.prune.revive
        if self.revive and method.evicts and method.prunes_prefill:
            raise ConfigError(
                f"revive=True cannot be combined with {method.name!r}: revival finds a pruned prompt token by its "
                "slot in the layer's KV cache, and decode-time eviction moves those slots. Use revive=False (the "
                "runtime's shadow set brings evicted tokens back) or the prefill method alone"
            )
        self.prefill = PrefillDrop(config, method, plan, method.build_scorer(config, model, plan), self.revive,
                                   self._rotary) if method.prunes_prefill else None
        self.runtime = RuntimeEviction(config, self.num_layers) if method.evicts else None
        self.live: Live | None = None
        self.state: TrimState | None = None     # state of the sequence in flight (also kept for stats)
        self._original_attn: str | None = None
        self._kernel = original_kernel(model.config._attn_implementation)   # "sdpa" or "eager"
        self._mask_memo: tuple | None = None    # (inputs, window, mask) of the last mask: layers between stages share it

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return getattr(getattr(model, "model", None), "layers", None) is not None

    @classmethod
    def layers(cls, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.model.layers

    # ---- install / remove --------------------------------------------------------------------
    def _install(self) -> None:
        self.hooks.add(self.base.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self.hooks.add(self.base.register_forward_hook(self._on_end, with_kwargs=True))
        for index, layer in enumerate(self.base.layers):
            self.hooks.add(layer.register_forward_pre_hook(self._layer_pre(index), with_kwargs=True))
            if index in self.plan or self.runtime is not None:
                self.hooks.add(layer.register_forward_hook(self._layer_post(index), with_kwargs=True))
        self._original_attn = self.model.config._attn_implementation
        self.model.config._attn_implementation = wrapped_name(self._original_attn)

    def remove(self) -> None:
        super().remove()
        if self._original_attn is not None:
            self.model.config._attn_implementation = self._original_attn
            self._original_attn = None
        self.live = None

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, N, hd) of the model's rotary table at `positions` (B, N)."""
        return self.base.rotary_emb(x, positions)

    def _position_embeddings(self, layer: int, live: Live) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embeddings layer `layer` takes for the live tokens."""
        return live.cos, live.sin

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        state = self.state
        if state is None:
            raise TrimformerError("no forward has run since trim(); stats describe the last prefill")
        lengths = [int(n) for n in state.prompt_lengths]
        computed = state.computed                                  # (L, B)
        full_rows = [lengths for _ in range(state.num_layers)]
        done = int(computed.sum())
        total = sum(lengths) * state.num_layers
        flops_full = prefill_flops(self.model.config, full_rows)
        flops_trimmed = prefill_flops(self.model.config, computed.tolist())
        result = {
            "method": self.config.method,
            "schedule": dict(self.plan),
            "prompt_tokens": lengths,
            "kept_tokens_per_layer": computed.sum(-1).tolist(),
            "kept_fraction": done / total if total else 1.0,
            "revived_per_layer": list(state.revived),
            "revived": int(sum(state.revived)),
            "waiting_in_aux": state.waiting_in_aux() if self.revive else 0,
            "dropped_for_good": state.dropped_for_good,
            "decode_steps": state.steps,
            "flops_full": flops_full,
            "flops_trimmed": flops_trimmed,
            "flop_ratio": flops_full / flops_trimmed if flops_trimmed else 1.0,
            "kv_bytes": self._kv_bytes(),
        }
        if self.runtime is not None and state.runtime is not None:
            result.update(self.runtime.stats(state))
        return result

    def _kv_bytes(self) -> int:
        """Bytes the KV cache holds now (every slot of every layer, keys and values)."""
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = next(self.model.parameters()).element_size()
        slots = sum(s.positions.numel() for s in self.state.slots if s is not None)
        return 2 * slots * config.num_key_value_heads * head_dim * element

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
                self.state.runtime = RuntimeState(self.num_layers)
        else:
            self.state = getattr(cache, STATE_ATTR, None)
            if self.state is None:
                lengths = [cache.get_seq_length(i) for i in range(self.num_layers)]
                self.state = TrimState.for_untrimmed_cache(self.num_layers, lengths, batch, device)
            self.state.steps += 1
            if self.runtime is not None:
                use_in_place(cache)   # an evicting cache appends in place (mechanisms/kv_buffer.py)
        if cache is None and prefill and any(self.windows) and self._uses_cache(kwargs):
            cache = kwargs[CACHE_KWARG] = DynamicCache(config=self.model.config)   # made here to keep every slot
        if cache is not None:
            if prefill:
                keep_every_slot(cache, self.windows)
            setattr(cache, STATE_ATTR, self.state)

        dtype = self.base.embed_tokens.weight.dtype
        cos, sin = self._rotary(torch.empty(0, dtype=dtype, device=device), positions)
        cos, sin = cos.to(device).expand(batch, -1, -1), sin.to(device).expand(batch, -1, -1)
        source = torch.arange(length, device=device).expand(batch, -1)
        self.live = Live(positions, valid, source, cos, sin, length, prefill, in_order=prefill)
        return args, kwargs

    def _uses_cache(self, kwargs) -> bool:
        use_cache = kwargs.get("use_cache")
        return bool(self.model.config.use_cache if use_cache is None else use_cache)

    def _on_end(self, module, args, kwargs, output):
        live, state = self.live, self.state
        self.live, self._mask_memo = None, None
        if live is None:
            return output
        if self.runtime is not None and not live.prefill:
            self.runtime.flush(cache_from(kwargs), state, live)     # layers that evict after the last check
        hidden = output.last_hidden_state                     # (B, Q_live, D), already normed
        if live.prefill and state.aux:
            hidden = PrefillDrop.restore_prompt_order(hidden, live, state, self.base.norm)
        elif hidden.shape[1] != live.n_input:
            hidden = hidden[:, : live.n_input]
        output.last_hidden_state = hidden
        state.next_position = live.positions[:, : live.n_input].max(-1).values + 1 if live.prefill else \
            live.positions[:, live.n_input - 1] + 1
        return output

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
            if previous is not None and previous.positions.shape[1] != cached_slots(cache, layer):
                raise InputError(
                    f"the KV cache of layer {layer} holds {cached_slots(cache, layer)} slots but trimformer "
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

            kwargs["attention_mask"] = self._mask(live, keys, previous is not None, module, self.windows[layer])
            kwargs["position_embeddings"] = self._position_embeddings(layer, live)
            kwargs["position_ids"] = live.positions
            probe = self._probe(layer, live, keys)
            if probe is not None:
                kwargs[PROBE_KWARG] = probe
            return args, kwargs

        return hook

    def _mask(self, live: Live, keys: LayerSlots, has_past: bool, layer: torch.nn.Module,
              window: int | None = None) -> torch.Tensor | None:
        """None when SDPA's own causal (or single-query) path is exact, else a (B, 1, Q, K) mask by
        original position: a query sees valid keys at or before its position (and, in a sliding-window layer,
        less than `window` positions back), and its own slot. Bool for SDPA; additive (0 / dtype min) for
        eager attention, which applies no causal mask itself."""
        q = live.positions.shape[1]
        plain = keys.all_valid() and ((live.in_order and not has_past) or q == 1)
        if window is not None and plain:
            plain = int(live.positions.max()) - int(keys.positions.min()) < window
        if self._kernel == "sdpa" and plain:
            return None
        inputs = (live.positions, live.valid, keys.positions, keys.valid)
        memo = self._mask_memo
        if memo is not None and memo[1] == window and all(a is b for a, b in zip(memo[0], inputs)):
            return memo[2]
        k = keys.positions.shape[1]
        allowed = keys.valid[:, None, :] & (keys.positions[:, None, :] <= live.positions[:, :, None])
        if window is not None:
            allowed &= keys.positions[:, None, :] > live.positions[:, :, None] - window
        own = torch.arange(k - q, k, device=allowed.device)
        allowed[:, torch.arange(q, device=allowed.device), own] = True
        if self._kernel == "eager":
            dtype = next(layer.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)[:, None]
        else:
            mask = allowed[:, None]
        self._mask_memo = (inputs, window, mask)
        return mask

    def _probe(self, layer: int, live: Live, keys: LayerSlots) -> Probe | None:
        """What the layer's attention computes besides its output: the eviction's scores (except at a pruning
        layer whose scorer reads attention, whose probe seeds them), the prefill scorer's or the revival's."""
        probe = None
        if self.runtime is not None and not (live.prefill and layer in self.plan and self.method.needs_attention):
            probe = self.runtime.probe(layer, live, keys, self.state)
        elif self.prefill is not None:
            probe = self.prefill.probe(layer, live, keys, self.state)
        if live.prefill and layer in self.plan and self.method.needs("keys"):
            probe = probe if probe is not None else Probe(None, None)
            probe.keep_keys = True
        return probe

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
                return self.prefill.prune(layer, output, probe, live, self.state)
            if probe is not None and self.revive and layer in self.plan:
                return self.prefill.revive_tokens(layer, output, probe, live, self.state)
            return None

        return hook
