"""Sliding-window layers (Gemma 3, Mistral, Qwen2 with use_sliding_window) keep their window in original
positions after pruning: a kept token further back than the window stays outside it, however few tokens
now lie between."""

from __future__ import annotations

import pytest
import torch

import trimformer
from conftest import make_model, make_prompt, trim_state
from trimformer.errors import ConfigError
from trimformer.patch.cache_names import cache_kwargs
from trimformer.patch.llama import layer_windows

WINDOW = 16


def _masks_seen(model, layers):
    """Register pre-hooks after trim()'s own: they see the attention mask trimformer handed each layer."""
    seen, handles = {}, []
    for index in layers:
        def hook(module, args, kwargs, index=index):
            seen[index] = kwargs["attention_mask"]
        handles.append(model.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_is_applied_by_original_position_after_pruning(attn):
    model = make_model("gemma3", attn=attn)
    ids = make_prompt(80, seed=7)
    trimformer.trim(model, method="random", keep=0.1, layers=(1,), sinks=4, protect_last=8, seed=0)
    seen, handles = _masks_seen(model, (2, 3))     # layer 2 is global, layer 3 slides
    with torch.no_grad():
        out = model(ids)
    for handle in handles:
        handle.remove()
    positions = trim_state(out).slots[3].positions[0]            # (N,) original positions, ascending
    assert len(positions) < WINDOW and int(positions[-1] - positions[0]) >= WINDOW   # few, spread wide
    q, k = positions[:, None], positions[None, :]
    expected_sliding = (k <= q) & (k > q - WINDOW)
    expected_global = k <= q
    if attn == "sdpa":
        assert seen[2] is None      # kept tokens in order, all valid: SDPA's causal path is exact
    for layer, expected in ((2, expected_global), (3, expected_sliding)):
        if seen[layer] is None:
            continue
        mask = seen[layer][0, 0]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        assert torch.equal(allowed, expected), layer
    # fewer than WINDOW kept tokens, yet the oldest are outside the newest token's window
    assert not expected_sliding[-1].all()


def test_layer_windows_per_family():
    assert layer_windows(make_model("gemma3").config) == [WINDOW, WINDOW, None, WINDOW, WINDOW, None]
    assert layer_windows(make_model("mistral-sliding").config) == [WINDOW] * 6
    assert layer_windows(make_model("qwen2-sliding").config) == [None] * 3 + [WINDOW] * 3
    assert layer_windows(make_model("mistral").config) == [None] * 6


def test_pruned_decoding_past_the_window_keeps_every_slot():
    """Sliding layers of the cache keep every slot (the window is in the mask), so the record of which slot
    holds which position matches the cache through decoding."""
    model = make_model("gemma3")
    ids = make_prompt(60, seed=8)
    trimformer.trim(model, method="lazy", keep=0.5, layers=(1, 3))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    state = getattr(cache, "_trimformer_state")
    for layer in range(6):
        assert cache.layers[layer].keys.shape[2] == state.slots[layer].positions.shape[1]
    assert trimformer.stats(model)["kept_tokens_per_layer"] == [60, 60, 30, 30, 20, 20]   # 4 sinks + 16 last kept


def test_eviction_is_refused_on_sliding_window_models():
    model = make_model("gemma3")
    with pytest.raises(ConfigError, match="sliding-window layers.*prefill method"):
        trimformer.trim(model, method="runtime", budget=0.5)
    assert not trimformer.is_trimmed(model)


def test_a_forward_without_a_cache_gets_one_that_keeps_every_slot():
    """model(ids) with use_cache makes its own cache inside the forward; the trimmed model makes it first, so
    decoding on from the returned cache works past the window."""
    model = make_model("gemma3")
    ids = make_prompt(60, seed=9)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    trimformer.trim(model, method="lazy", keep=1.0, layers=(1, 3))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, tokens = out.past_key_values, [out.logits[:, -1:].argmax(-1)]
        for _ in range(5):
            out = model(tokens[-1], use_cache=True, **cache_kwargs(cache))
            tokens.append(out.logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat([ids, *tokens], 1), reference)
    assert all(layer.keys.shape[2] == 65 for layer in cache.layers)
