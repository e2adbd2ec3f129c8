"""Runtime pruning while decoding: KV eviction with a shadow set (issue: runtime token pruning)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unpatched, left_pad, make_model, make_prompt

import trimformer
from trimformer import ConfigError, TokenPruner
from trimformer.api import PATCH_ATTR
from trimformer.patch.cache_names import cache_kwargs


def _decode(model, ids, steps, mask=None):
    """Prefill + `steps` greedy steps with the cache; returns (tokens (B, steps), cache)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        tokens = [token]
        for _ in range(steps - 1):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=token[:, None], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
            tokens.append(token)
    return torch.stack(tokens, 1), cache


def _untrimmed_keys(model, ids):
    """Per-layer keys and values (B, Hkv, T, hd) of the untrimmed model's prefill."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_threshold_zero_equals_unpatched(llama):
    ids = make_prompt(120, seed=1)
    ref = llama.generate(ids, max_new_tokens=32, do_sample=False)
    trimformer.trim(llama, method="runtime", pruning_threshold=0.0)
    out = llama.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(out, ref)
    assert trimformer.stats(llama)["total_tokens_pruned"] == 0


def test_threshold_zero_batch_equals_unpatched(llama):
    ids, mask = left_pad([make_prompt(80, seed=2)[0], make_prompt(50, seed=3)[0]])
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    trimformer.trim(llama, method="runtime")
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def _step_logits(model, ids, steps, mask=None):
    """Prefill + `steps` greedy steps; returns the last-position logits of every step (B, steps + 1, V)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            out = model(input_ids=token[:, None], attention_mask=mask, **cache_kwargs(out.past_key_values),
                        use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scoring_every_step_keeps_the_model_output(attn):
    # a decode probe computes the layer's attention output itself (one softmax for output and scores):
    # with nothing evicted, every step's logits are the unpatched model's, padded batch included
    model = make_model("llama", attn=attn)
    ids, mask = left_pad([make_prompt(70, seed=12)[0], make_prompt(45, seed=13)[0]])
    ref = _step_logits(model, ids, 12, mask)
    trimformer.trim(model, method="runtime", pruning_threshold=0.0, score_every=1, readmit_every=1)
    out = _step_logits(model, ids, 12, mask)
    assert trimformer.stats(model)["total_tokens_pruned"] == 0
    assert (out - ref).abs().max() < 1e-5


def test_single_query_softmax_matches_sdpa():
    from trimformer.ops.attention import single_query_softmax

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 8, generator=generator)                  # 6 heads over 2 KV heads
    key, value = torch.randn(2, 2, 2, 11, 8, generator=generator)
    allowed = torch.rand(2, 11, generator=generator) > 0.3
    allowed[:, -1] = True
    probs, lse = single_query_softmax(query, key, 0.35, allowed)          # (2, 2, 3, 11), (2, 2, 3, 1)
    output = torch.matmul(probs, value).reshape(2, 6, 1, 8)
    expand = lambda x: x.repeat_interleave(3, dim=1)                       # (2, 6, 11, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, expand(key), expand(value), attn_mask=allowed[:, None, None], scale=0.35)
    assert torch.allclose(output, ref, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 3))
    assert bool((probs.reshape(2, 6, 11)[~allowed[:, None].expand(2, 6, 11)] == 0).all())
    logits = torch.einsum("bhd,bhkd->bhk", query[:, :, 0], expand(key)) * 0.35
    ref_lse = torch.logsumexp(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)   # (2, 6)
    assert torch.allclose(lse.reshape(2, 6), ref_lse, atol=1e-5)
    # every key allowed (None) and no log-sum-exp asked for: the same softmax as an all-True mask
    probs_all, no_lse = single_query_softmax(query, key, 0.35, None, with_lse=False)
    assert no_lse is None
    assert torch.equal(probs_all, single_query_softmax(query, key, 0.35, torch.ones_like(allowed))[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_move_slots_on_a_view_of_a_larger_buffer(batch):
    from trimformer.mechanisms.eviction import _move_slots

    generator = torch.Generator().manual_seed(batch)
    buffer = torch.randn(batch, 2, 20, 4, generator=generator)
    x = buffer[:, :, :15]                                   # (B, Hkv, 15, hd): a cache's view of its buffer
    dst = torch.stack([torch.randperm(15, generator=generator)[:5] for _ in range(batch)])    # distinct per row
    src = torch.randint(0, 15, (batch, 5), generator=generator)
    src[:, 1] = dst[:, 0]                                   # a slot written, then read by a later pair: read first
    expected = x.clone()
    for b in range(batch):
        for j in range(5):
            expected[b, :, dst[b, j]] = x[b, :, src[b, j]]
    spare = buffer[:, :, 15:].clone()
    _move_slots(x, dst, src)
    assert torch.equal(x, expected)
    assert torch.equal(buffer[:, :, 15:], spare)            # nothing outside the view is touched


@pytest.mark.parametrize("batch", [1, 3])
def test_gather_slots_on_a_view_of_a_larger_buffer(batch):
    from trimformer.mechanisms.eviction import _gather_slots

    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 2, 20, 4, generator=generator)[:, :, :15]      # (B, Hkv, 15, hd)
    index = torch.randint(0, 15, (batch, 6), generator=generator)
    expected = torch.stack([x[b][:, index[b]] for b in range(batch)])      # (B, Hkv, 6, hd)
    assert torch.equal(_gather_slots(x, index), expected)


def test_eviction_moves_exact_keys_and_values_to_the_shadow_set(llama):
    ids = make_prompt(100, seed=4)
    reference = _untrimmed_keys(llama, ids)
    trimformer.trim(llama, method="runtime", budget=0.5, evict_every=1, readmit_every=0, recent=8)
    _, cache = _decode(llama, ids, 3)
    state = cache._trimformer_state
    for layer, shadow in enumerate(state.runtime.shadow):
        assert shadow is not None and bool(shadow.valid.any())
        pos = shadow.positions[0][shadow.valid[0]]
        assert (pos < 100).all(), "only prompt tokens can have been evicted this early"
        keys = shadow.keys[0][:, shadow.valid[0]]
        ref_keys, ref_values = reference[layer]
        assert torch.equal(keys, ref_keys[0][:, pos])
        assert torch.equal(shadow.values[0][:, shadow.valid[0]], ref_values[0][:, pos])
        # the cache keeps the budget: ceil(0.5 * tokens seen) live slots
        assert int(state.slots[layer].valid.sum()) == -(-(100 + state.steps) // 2)


def test_evicting_layers_together_equals_one_at_a_time(llama):
    # lazy+runtime on a padded batch: layers of different widths and rows with filler, stacked for one
    # selection; the result must be what evicting each layer alone gives
    ids, mask = left_pad([make_prompt(120, seed=8)[0], make_prompt(90, seed=9)[0]])
    trimformer.trim(llama, method="lazy+runtime", budget=40, evict_every=1000, readmit_every=0, recent=4)
    _, cache = _decode(llama, ids, 6, mask=mask)
    runtime = getattr(llama, PATCH_ATTR).runtime
    state = cache._trimformer_state
    widths = {state.slots[layer].positions.shape[1] for layer in range(len(cache.layers))}
    assert len(widths) > 1, "the prefill pruning should leave layers of different widths"
    newest = torch.tensor([[state.next_position.max().item() - 1]] * 2)
    together, alone = copy.deepcopy((cache, state)), copy.deepcopy((cache, state))
    layers = list(range(len(cache.layers)))
    runtime._evict(layers, together[0], together[1], newest)
    for layer in layers:
        runtime._evict([layer], alone[0], alone[1], newest)
    assert sum(together[1].runtime.evicted) > 0
    for layer in layers:
        a, b = together[1].slots[layer], alone[1].slots[layer]
        assert torch.equal(a.positions, b.positions) and torch.equal(a.valid, b.valid)
        assert torch.equal(together[1].runtime.scores[layer], alone[1].runtime.scores[layer])
        assert torch.equal(together[0].layers[layer].keys, alone[0].layers[layer].keys)
        assert torch.equal(together[0].layers[layer].values, alone[0].layers[layer].values)
        sa, sb = together[1].runtime.shadow[layer], alone[1].runtime.shadow[layer]
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert torch.equal(sa.positions, sb.positions) and torch.equal(sa.keys, sb.keys)
    assert together[1].runtime.evicted == alone[1].runtime.evicted


def test_readmission_restores_exact_keys_at_their_positions(llama):
    ids = make_prompt(100, seed=5)
    reference = _untrimmed_keys(llama, ids)
    # evict at step 1, readmit everything worth any attention at step 2
    trimformer.trim(llama, method="runtime", budget=0.5, evict_every=1, readmit_every=2,
                    readmit_threshold=0.0, readmit_max=5, recent=8, readmit_layers=None)
    _, cache = _decode(llama, ids, 3)
    state = cache._trimformer_state
    assert trimformer.stats(llama)["total_tokens_reintroduced"] > 0
    for layer in range(len(cache.layers)):
        slots = state.slots[layer]
        back = slots.positions.shape[1] - 5                         # readmitted slots were appended last
        pos = slots.positions[0, back:]
        assert bool(slots.valid[0, back:].all())
        ref_keys, ref_values = reference[layer]
        assert torch.equal(cache.layers[layer].keys[0][:, back:], ref_keys[0][:, pos])
        assert torch.equal(cache.layers[layer].values[0][:, back:], ref_values[0][:, pos])


def test_readmit_layers_bring_tokens_back_in_every_layer(llama):
    ids = make_prompt(100, seed=5)
    reference = _untrimmed_keys(llama, ids)
    # evict at step 2; at step 3 only layer 2 checks its shadow set, and what it readmits comes back in
    # every layer whose shadow set holds the same positions, with the exact keys and values
    trimformer.trim(llama, method="runtime", budget=0.5, evict_every=2, readmit_every=3, readmit_threshold=0.0,
                    readmit_max=5, recent=8, readmit_layers=[2])
    with torch.no_grad():
        out = llama(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(2):
            out = llama(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True)
        state = cache._trimformer_state
        shadow_before = [set(s.positions[0][s.valid[0]].tolist()) for s in state.runtime.shadow]
        width_before = [s.positions.shape[1] for s in state.slots]
        llama(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), use_cache=True)
    newest = ids.shape[1] + 2                       # the token of step 3 (layers after 2 get it after the rest)
    added = [state.slots[layer].positions[0, width_before[layer]:] for layer in range(6)]
    asked = set(added[2].tolist()) - {newest}
    assert len(asked) == 5 and asked <= shadow_before[2]
    for layer in range(len(cache.layers)):
        back = added[layer] != newest
        assert int(back.sum()) == len(added[layer]) - 1
        pos = added[layer][back]
        assert set(pos.tolist()) == asked & shadow_before[layer], layer
        assert state.runtime.readmitted[layer] == len(pos)
        ref_keys, ref_values = reference[layer]
        assert torch.equal(cache.layers[layer].keys[0][:, width_before[layer]:][:, back], ref_keys[0][:, pos])
        assert torch.equal(cache.layers[layer].values[0][:, width_before[layer]:][:, back], ref_values[0][:, pos])
        in_shadow = state.runtime.shadow[layer]
        assert not (set(in_shadow.positions[0][in_shadow.valid[0]].tolist()) & asked)
    assert sum(len(asked & shadow_before[layer]) for layer in range(6)) > 5   # some came back elsewhere too


def test_readmit_layers_auto_is_three_depths():
    from trimformer.mechanisms.eviction import readmit_layers

    assert readmit_layers("auto", 30) == {5, 15, 25}
    assert readmit_layers("auto", 6) == {1, 3, 5}
    assert readmit_layers(None, 6) is None and readmit_layers((0, 2), 6) == {0, 2}
    with pytest.raises(ConfigError, match="out of range"):
        readmit_layers((2, 30), 30)


def test_scores_accumulate_on_scoring_steps_only(llama):
    # readmission checks on the steps between scoring steps must not add to the accumulated attention
    ids = make_prompt(90, seed=11)

    def scores(**options):
        trimformer.trim(llama, method="runtime", score_every=3, readmit_threshold=1e9, **options)
        try:
            _, cache = _decode(llama, ids, 8)
            return [s.clone() for s in cache._trimformer_state.runtime.scores]
        finally:
            trimformer.untrim(llama)

    # (the steps with a probe compute attention themselves, not with SDPA: equal up to float rounding)
    for a, b in zip(scores(readmit_every=1), scores(readmit_every=0)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["runtime", "lazy+runtime"])
def test_every_token_is_in_cache_shadow_or_dropped(llama, method):
    ids, mask = left_pad([make_prompt(90, seed=6)[0], make_prompt(70, seed=7)[0]])
    options = dict(keep=0.6, layers=(1, 3), sinks=2, protect_last=4, window=8, span=3) if "lazy" in method else \
        dict(readmit_layers=(0, 4))
    trimformer.trim(llama, method=method, budget=0.5, evict_every=2, readmit_every=3, readmit_threshold=1.0,
                    shadow_size=10, recent=4, **options)
    _decode(llama, ids, 12, mask)
    info = trimformer.stats(llama)
    assert info["total_tokens_pruned"] > 0 and info["total_tokens_dropped"] > 0
    for row in info["per_layer"]:
        assert row["seen"] == row["in_cache"] + row["in_shadow"] + row["dropped"], row
        assert row["in_shadow"] <= 2 * 10                               # bounded: 10 per row
    assert info["total_tokens_seen"] == sum(r["seen"] for r in info["per_layer"])


def test_batch_rows_equal_rows_alone(llama):
    rows = [make_prompt(90, seed=8)[0], make_prompt(60, seed=9)[0]]
    ids, mask = left_pad(rows)
    options = dict(method="runtime", budget=0.5, evict_every=2, readmit_every=2, recent=4)
    trimformer.trim(llama, **options)
    batch, _ = _decode(llama, ids, 10, mask)
    for b, row in enumerate(rows):
        alone, _ = _decode(llama, row[None], 10)
        assert torch.equal(batch[b], alone[0]), b


@pytest.mark.parametrize("bad", [
    {"budget": 1.5}, {"budget": 0}, {"budget": -3}, {"budget": True}, {"decay": 2.0},
    {"pruning_threshold": -1}, {"readmit_threshold": -0.5}, {"shadow_size": -1},
    {"shadow_dtype": "int8"}, {"evict_every": 0}, {"method": "runtime+runtime"},
    {"readmit_layers": []}, {"readmit_layers": 3}, {"readmit_layers": [1, -1]}, {"readmit_layers": [6]},
    {"method": "lazy+runtime", "revive": True},   # revival reads slots that eviction moves
])
def test_bad_runtime_options_raise(llama, bad):
    options = {"method": "runtime", **bad}
    with pytest.raises(ConfigError) as info:
        trimformer.trim(llama, **options)
    assert str(info.value)
    assert_unpatched(llama)


def test_token_pruner_standalone():
    pruner = TokenPruner(pruning_threshold=0.5, reintroduce_threshold=1.0, protect_first=1, protect_last=1)
    # 1 head, 2 queries over 5 tokens: mean attention received = [0.3, 0.05, 0.4, 0.05, 0.2]
    weights = torch.tensor([[[0.4, 0.1, 0.3, 0.1, 0.1], [0.2, 0.0, 0.5, 0.0, 0.3]]])
    scores = pruner.score_tokens(weights, [10, 11, 12, 13, 14])
    assert torch.allclose(scores, torch.tensor([0.3, 0.05, 0.4, 0.05, 0.2]))
    hidden = torch.arange(10.0).view(5, 2)
    tokens, kept = pruner.prune_tokens(["a", "b", "c", "d", "e"], hidden)
    # uniform = 0.2, threshold 0.5 x uniform = 0.1: tokens 11 and 13 go to the shadow set
    assert tokens == ["a", "c", "e"]
    assert torch.equal(kept, hidden[[0, 2, 4]])
    assert sorted(pruner.shadow) == [11, 13]
    back = pruner.reintroduce({11: 0.5, 13: 0.01}, live_tokens=3)   # 0.5 x 3 >= 1.0; 0.03 < 1.0
    assert [i for i, _, _ in back] == [11] and torch.equal(back[0][2], hidden[1])
    stats = pruner.get_pruning_stats()
    assert (stats["total_tokens_seen"], stats["total_tokens_pruned"], stats["total_tokens_reintroduced"]) == (5, 2, 1)
    assert stats["shadow_bytes"] == 2 * 4                               # one (2,) float32 hidden left


def test_token_pruner_on_a_model_matches_trim(llama):
    ids = make_prompt(100, seed=10)
    pruner = TokenPruner(pruning_threshold=0.0, budget=0.5, evict_every=2, readmit_every=0, recent=8)
    pruner.apply(llama)
    _decode(llama, ids, 6)
    stats = pruner.get_pruning_stats()
    assert stats["total_tokens_pruned"] > 0
    assert stats["kv_bytes"] < 2 * 6 * 105 * 2 * 16 * 4                # below the full cache's bytes
    assert all(r["seen"] == r["in_cache"] + r["in_shadow"] + r["dropped"] for r in stats["per_layer"])
