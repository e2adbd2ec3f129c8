"""Kept and revived tokens keep their original positions: the keys in the KV cache are RoPE'd there."""

from __future__ import annotations

import pytest
import torch

import trimformer
from trimformer.patch.cache_names import cache_kwargs
from conftest import keys_by_hand, make_model, make_prompt, row_positions, trim_state


def _untrimmed_keys(model, ids):
    with torch.no_grad():
        cache = model(ids).past_key_values
    return [cache.layers[layer].keys.clone() for layer in range(len(model.model.layers))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_cache_keys_up_to_the_pruning_layer_equal_untrimmed(arch):
    model = make_model(arch)
    ids = make_prompt(100, seed=21)
    reference = _untrimmed_keys(model, ids)
    trimformer.trim(model, method="lazy", keep=0.5, layers=(2, 4))
    with torch.no_grad():
        out = model(ids)
    state = trim_state(out)
    cache = out.past_key_values
    for layer in (0, 1, 2):     # nothing was pruned before layer 2's attention ran
        positions = state.slots[layer].positions[0]
        assert positions.tolist() == list(range(100))
        assert torch.equal(cache.layers[layer].keys, reference[layer][:, :, positions])
    # layer 3 sees only the kept tokens, but their input (layer 2's output) is unchanged, and so are
    # their keys when RoPE'd at the original positions
    positions = state.slots[3].positions[0]
    assert cache.layers[3].keys.shape[2] == 50
    assert positions.tolist() != list(range(50))
    assert torch.equal(cache.layers[3].keys, reference[3][:, :, positions])
    # from layer 4 on the kept tokens' inputs changed (layer 3 attended to fewer tokens)
    positions = state.slots[4].positions[0]
    assert not torch.allclose(cache.layers[4].keys, reference[4][:, :, positions], atol=1e-3)
    trimformer.untrim(model)


def test_kept_tokens_keys_use_original_positions(llama, prompt100):
    """At layers after a pruning stage, each cache key is RoPE(k_proj(norm(h)), original position) of that
    layer's input h -- not of the token's index among the kept tokens."""
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    inputs = {}
    handles = [
        llama.model.layers[layer].register_forward_pre_hook(
            lambda m, a, kw, layer=layer: inputs.__setitem__(layer, (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for layer in (2, 4, 5)
    ]
    try:
        with torch.no_grad():
            out = llama(prompt100)
    finally:
        for handle in handles:
            handle.remove()
    state = trim_state(out)
    for layer in (2, 4, 5):
        positions = state.slots[layer].positions
        assert inputs[layer].shape[1] == positions.shape[1]
        assert positions[0].tolist() != list(range(positions.shape[1]))   # there are gaps
        with torch.no_grad():
            expected = keys_by_hand(llama, layer, inputs[layer], positions)
            wrong = keys_by_hand(llama, layer, inputs[layer], torch.arange(positions.shape[1])[None])
        keys = out.past_key_values.layers[layer].keys
        assert torch.allclose(keys, expected, atol=1e-5)
        assert not torch.allclose(keys, wrong, atol=1e-3)


def test_decoded_token_key_at_next_position(llama, prompt100):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive=False)
    inputs = {}
    handle = llama.model.layers[4].register_forward_pre_hook(
        lambda m, a, kw: inputs.__setitem__(4, (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = llama(prompt100)
            token = out.logits[:, -1].argmax(-1)
            out = llama(token[:, None], **cache_kwargs(out.past_key_values))
    finally:
        handle.remove()
    state = trim_state(out)
    assert row_positions(state, 4)[-1] == 100
    with torch.no_grad():
        expected = keys_by_hand(llama, 4, inputs[4], torch.tensor([[100]]))
    assert torch.allclose(out.past_key_values.layers[4].keys[:, :, -1:], expected, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 3])
def test_revived_token_key_at_original_position(llama, prompt100, layer):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive=True, revive_threshold=0.0,
                    revive_max=16)
    with torch.no_grad():
        out = llama(prompt100)
        prefill_slots = out.past_key_values.layers[layer + 1].keys.shape[2]
        aux_before = trim_state(out).aux[layer]
        hidden_before = aux_before.hidden.clone()
        token = out.logits[:, -1].argmax(-1)
        out = llama(token[:, None], **cache_kwargs(out.past_key_values))
    state = trim_state(out)
    entry = state.aux[layer]
    assert torch.equal(entry.hidden, hidden_before)   # aux hidden states are not touched by revival
    nxt = layer + 1
    positions = state.slots[nxt].positions[0]
    valid = state.slots[nxt].valid[0]
    keys = out.past_key_values.layers[nxt].keys
    # slot prefill_slots is the new token; then tokens revived at earlier stages, then this stage's
    assert positions[prefill_slots].item() == 100
    revived = trimformer.stats(llama)["revived_per_layer"]
    assert revived[1] == revived[3] == 16
    expected_slots = prefill_slots + 1 + (16 if layer == 3 else 0) + 16
    assert positions.shape[0] == expected_slots
    revived_slots = list(range(expected_slots - 16, expected_slots))
    checked = 0
    for slot in revived_slots:
        assert bool(valid[slot])
        p = int(positions[slot])
        assert p < 100
        assert p not in positions[:prefill_slots].tolist()   # it had been pruned
        match = (entry.positions[0] == p).nonzero()
        assert match.numel() == 1
        i = int(match[0, 0])
        assert not bool(entry.waiting[0, i])                   # no longer waiting
        h = entry.hidden[:, i : i + 1]                          # (1, 1, D)
        with torch.no_grad():
            expected = keys_by_hand(llama, nxt, h, torch.tensor([[p]]))[:, :, 0]   # (1, Hkv, hd)
            wrong = keys_by_hand(llama, nxt, h, torch.tensor([[slot]]))[:, :, 0]
        assert torch.allclose(keys[:, :, slot], expected, atol=1e-5), f"revived position {p} (slot {slot})"
        assert not torch.allclose(keys[:, :, slot], wrong, atol=1e-3)
        checked += 1
    assert checked == 16
