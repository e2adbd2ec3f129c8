"""The public entry points: `trim`, `untrim`, `stats`, `is_trimmed`."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrimConfig
from .errors import TrimformerError, UnsupportedModelError
from .flops import prefill_flops
from .methods import get_method
from .models import patch_for
from .presets import preset_for

PATCH_ATTR = "_trimformer_patch"


def trim(model: torch.nn.Module, config: TrimConfig | dict | str | None = None, /, **options: Any) -> torch.nn.Module:
    """Patch `model` in place so its forward prunes tokens layer by layer; return it.

    ``trim(model, method="lazy", keep=0.5)``, ``trim(model, TrimConfig(...))`` or
    ``trim(model, {"method": "lazy", "reduction_ratio": 0.5, "adaptive": True})``.
    On any error the model is left exactly as it was.
    """
    cfg = TrimConfig.coerce(config, options)
    cfg.validate()
    method = get_method(cfg.method)
    layers = _decoder_layers(model)
    plan = cfg.resolve_schedule(len(layers), preset_for(model.config)) if method.prunes_prefill else {}
    patch = patch_for(model, cfg, method, plan)
    previous = getattr(model, PATCH_ATTR, None)
    if previous is not None:
        untrim(model)
    patch.install()
    setattr(model, PATCH_ATTR, patch)
    return model


def untrim(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every trimformer hook and setting: the model behaves exactly as before `trim`."""
    patch = getattr(model, PATCH_ATTR, None)
    if patch is None:
        raise TrimformerError("this model is not trimmed; call trim(model, ...) first")
    patch.remove()
    delattr(model, PATCH_ATTR)
    return model


def is_trimmed(model: torch.nn.Module) -> bool:
    return getattr(model, PATCH_ATTR, None) is not None


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the last prefill (and the decoding after it) kept, per layer and overall.

    Keys: ``method``, ``schedule``, ``prompt_tokens`` (per row), ``kept_tokens_per_layer`` (summed
    over rows), ``kept_fraction`` (share of token-layer computations done), ``revived_per_layer``,
    ``revived``, ``waiting_in_aux``, ``dropped_for_good``, ``decode_steps``, ``flops_full``,
    ``flops_trimmed``, ``flop_ratio`` (full / trimmed).
    """
    patch = getattr(model, PATCH_ATTR, None)
    if patch is None:
        raise TrimformerError("this model is not trimmed; call trim(model, ...) first")
    if hasattr(patch, "stats"):  # encoders (models/encoder.py) describe their own forward
        return patch.stats()
    state = patch.state
    if state is None:
        raise TrimformerError("no forward has run since trim(); stats describe the last prefill")
    lengths = [int(n) for n in state.prompt_lengths]
    computed = state.computed                                  # (L, B)
    full_rows = [lengths for _ in range(state.num_layers)]
    done = int(computed.sum())
    total = sum(lengths) * state.num_layers
    flops_full = prefill_flops(model.config, full_rows)
    flops_trimmed = prefill_flops(model.config, computed.tolist())
    result = {
        "method": patch.config.method,
        "schedule": dict(patch.plan),
        "prompt_tokens": lengths,
        "kept_tokens_per_layer": computed.sum(-1).tolist(),
        "kept_fraction": done / total if total else 1.0,
        "revived_per_layer": list(state.revived),
        "revived": int(sum(state.revived)),
        "waiting_in_aux": state.waiting_in_aux() if patch.revive else 0,
        "dropped_for_good": state.dropped_for_good,
        "decode_steps": state.steps,
        "flops_full": flops_full,
        "flops_trimmed": flops_trimmed,
        "flop_ratio": flops_full / flops_trimmed if flops_trimmed else 1.0,
        "kv_bytes": _kv_bytes(model, state),
    }
    if state.runtime is not None:
        result.update(runtime_stats(state))
    return result


def runtime_stats(state) -> dict[str, Any]:
    """Decode-time eviction counters: per layer and totals over layers (token-layer entries).
    For every layer, seen = in_cache + in_shadow + dropped."""
    rt = state.runtime
    in_cache = [int(s.valid.sum()) if s is not None else 0 for s in state.slots]
    in_shadow = [rt.in_shadow(layer) for layer in range(rt.num_layers)]
    return {
        "total_tokens_seen": sum(rt.seen),
        "total_tokens_pruned": sum(rt.evicted),
        "total_tokens_reintroduced": sum(rt.readmitted),
        "total_tokens_dropped": sum(rt.dropped),
        "per_layer": [
            {"layer": layer, "seen": rt.seen[layer], "in_cache": in_cache[layer], "in_shadow": in_shadow[layer],
             "dropped": rt.dropped[layer], "evicted": rt.evicted[layer], "reintroduced": rt.readmitted[layer]}
            for layer in range(rt.num_layers)
        ],
        "shadow_bytes": rt.shadow_bytes(),
    }


def _kv_bytes(model, state) -> int:
    """Bytes the KV cache holds now (every slot of every layer, keys and values)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    slots = sum(s.positions.numel() for s in state.slots if s is not None)
    return 2 * slots * config.num_key_value_heads * head_dim * element


def _decoder_layers(model: torch.nn.Module):
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:  # an encoder (BERT, ViT, DeiT, CLIP vision), see models/encoder.py
        from .models import encoder_layers

        layers = encoder_layers(model)
    if layers is None:
        raise UnsupportedModelError(
            f"trimformer has no adapter for {type(model).__name__}: expected a *ForCausalLM of the "
            "Llama family (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"
        )
    return layers
