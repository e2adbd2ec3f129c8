"""Pruning happens as scheduled: counts, statistics, cache slot bookkeeping, baselines, adaptivity, revival."""

from __future__ import annotations

import math

import pytest
import torch

import trimformer
from trimformer.ops.flops import prefill_flops
from trimformer.patch.cache_names import cache_kwargs
from conftest import expected_counts, make_model, make_prompt, row_positions, trim_state

LAYERS = 6


# ---- 2. counts, stats and slot positions ------------------------------------------------------------


@pytest.mark.parametrize(
    "n, keep, sinks, protect_last, expected",
    [
        # 100 -> ceil(0.5*100)=50 after layer 1 -> ceil(0.5*50)=25 after layer 3
        (100, 0.5, 4, 16, [100, 100, 50, 50, 25, 25]),
        # 101 -> ceil(50.5)=51 -> ceil(25.5)=26
        (101, 0.5, 4, 16, [101, 101, 51, 51, 26, 26]),
        # 101 -> ceil(30.3)=31 -> ceil(9.3)=10, raised to the 4+16=20 protected tokens
        (101, 0.3, 4, 16, [101, 101, 31, 31, 20, 20]),
        # 100 -> ceil(30)=30 -> ceil(9)=9, raised to the 2+8=10 protected tokens
        (100, 0.3, 2, 8, [100, 100, 30, 30, 10, 10]),
    ],
)
def test_kept_counts_and_stats(llama, n, keep, sinks, protect_last, expected):
    ids = make_prompt(n, seed=7)
    trimformer.trim(llama, method="lazy", keep=keep, layers=(1, 3), sinks=sinks, protect_last=protect_last)
    with torch.no_grad():
        out = llama(ids)
    assert out.logits.shape == (1, n, 128)
    stats = trimformer.stats(llama)
    assert expected == expected_counts(n, {1: keep, 3: keep}, LAYERS, sinks + protect_last)  # helper sanity
    assert stats["kept_tokens_per_layer"] == expected
    assert stats["prompt_tokens"] == [n]
    assert stats["kept_fraction"] == pytest.approx(sum(expected) / (n * LAYERS))
    assert stats["schedule"] == {1: keep, 3: keep}
    assert stats["method"] == "lazy"
    assert stats["flops_full"] == prefill_flops(llama.config, [[n]] * LAYERS)
    assert stats["flops_trimmed"] == prefill_flops(llama.config, [[c] for c in expected])
    assert stats["flop_ratio"] > 1.0
    assert stats["flop_ratio"] == pytest.approx(stats["flops_full"] / stats["flops_trimmed"])

    state = trim_state(out)
    for layer in range(LAYERS):
        assert out.past_key_values.layers[layer].keys.shape[2] == expected[layer]
        assert state.slots[layer].positions.shape == (1, expected[layer])
        assert bool(state.slots[layer].valid.all())


def test_stats_flops_by_hand(llama, prompt100):
    """flops for the tiny config worked out by hand (see test_core_pure for the per-term formulas)."""
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    with torch.no_grad():
        llama(prompt100)
    stats = trimformer.stats(llama)
    per_token = 73728                                   # 2 * (q 4096 + kv 4096 + o 4096 + mlp 24576)

    def layer(n):
        return per_token * n + 128 * n * (n + 1)        # 4 * H * hd * n(n+1)/2 with H * hd = 64

    head = 2 * 64 * 128
    assert stats["flops_full"] == 6 * layer(100) + head == 52009984
    assert stats["flops_trimmed"] == 2 * layer(100) + 2 * layer(50) + 2 * layer(25) + head == 29225984


@pytest.mark.parametrize("method", ["lazy", "random", "static", "truncate"])
def test_slot_positions_sorted_protected_progressive(llama, prompt100, method):
    sinks, protect_last = 4, 16
    trimformer.trim(llama, method=method, keep=0.5, layers=(1, 3), sinks=sinks, protect_last=protect_last)
    with torch.no_grad():
        out = llama(prompt100)
    state = trim_state(out)
    previous = None
    for layer in range(LAYERS):
        positions = row_positions(state, layer)
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        assert set(range(sinks)) <= set(positions), f"layer {layer} lost a sink"
        assert set(range(100 - protect_last, 100)) <= set(positions), f"layer {layer} lost a protected tail token"
        if previous is not None:
            assert set(positions) <= set(previous), f"layer {layer} holds a token layer {layer - 1} dropped"
        previous = positions
    assert row_positions(state, 0) == list(range(100))
    assert row_positions(state, 1) == list(range(100))
    assert row_positions(state, 2) == row_positions(state, 3)
    assert row_positions(state, 4) == row_positions(state, 5)
    assert len(row_positions(state, 2)) == 50 and len(row_positions(state, 4)) == 25


def test_aux_holds_exactly_the_dropped_tokens(llama, prompt100):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    with torch.no_grad():
        out = llama(prompt100)
    state = trim_state(out)
    assert sorted(state.aux) == [1, 3]
    for layer, nxt in [(1, 2), (3, 4)]:
        entry = state.aux[layer]
        dropped = entry.positions[0][entry.waiting[0]].tolist()
        expected = sorted(set(row_positions(state, layer)) - set(row_positions(state, nxt)))
        assert sorted(dropped) == expected
        # the slot index points at the same original position in that layer's cache
        slot_pos = state.slots[layer].positions[0].gather(0, entry.slots[0][entry.waiting[0]])
        assert slot_pos.tolist() == entry.positions[0][entry.waiting[0]].tolist()
        assert entry.source[0][entry.waiting[0]].tolist() == dropped  # no padding: input index = position
    assert trimformer.stats(llama)["waiting_in_aux"] == 75


def test_outputs_keep_input_shape_pruned_tokens_get_their_drop_state(llama, prompt100):
    """Kept tokens' final states sit at their input index; a pruned token's output is norm(h at drop)."""
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    captured = []
    handle = llama.model.norm.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
    try:
        with torch.no_grad():
            out = llama.model(input_ids=prompt100)
    finally:
        handle.remove()
    hidden = out.last_hidden_state
    assert hidden.shape == (1, 100, 64)
    state = trim_state(out)
    final_positions = state.slots[5].positions[0]
    # first norm call is the base model's own, on the 25 tokens that reached the end
    assert captured[0].shape == (1, 25, 64)
    assert torch.equal(hidden[0, final_positions], captured[0][0])
    for layer in (1, 3):
        entry = state.aux[layer]
        waiting = entry.waiting[0]
        expected = llama.model.norm(entry.hidden[0][waiting])
        assert torch.allclose(hidden[0, entry.source[0][waiting]], expected, atol=1e-6)
    # every one of the 100 outputs was filled in
    assert bool((hidden[0].abs().sum(-1) > 0).all())


# ---- 6. baselines --------------------------------------------------------------------------------


def _kept_sets(model, ids, **options):
    trimformer.trim(model, keep=0.5, layers=(1, 3), sinks=4, protect_last=16, **options)
    with torch.no_grad():
        state = trim_state(model(ids))
    return row_positions(state, 2), row_positions(state, 4)


def test_static_keeps_sinks_and_most_recent(llama, prompt100):
    stage1, stage2 = _kept_sets(llama, prompt100, method="static")
    assert stage1 == list(range(4)) + list(range(54, 100))    # 4 sinks + 46 most recent = 50
    assert stage2 == list(range(4)) + list(range(79, 100))    # 4 sinks + 21 most recent = 25
    assert trimformer.stats(llama)["revived"] == 0


def test_truncate_keeps_head_and_tail(llama, prompt100):
    stage1, stage2 = _kept_sets(llama, prompt100, method="truncate")
    # 20 protected + the 30 tokens nearest either end: distances 4..15 (head only), 16..24 (both ends)
    assert stage1 == list(range(25)) + list(range(75, 100))
    # then 20 protected + 5 more: distances 4..8 from the head
    assert stage2 == list(range(9)) + list(range(84, 100))


def test_baselines_do_not_depend_on_content(llama):
    a, b = make_prompt(100, seed=11), make_prompt(100, seed=12)
    for method in ("static", "truncate", "random"):
        assert _kept_sets(llama, a, method=method) == _kept_sets(llama, b, method=method)


def test_random_seeded(llama, prompt100):
    first = _kept_sets(llama, prompt100, method="random", seed=3)
    second = _kept_sets(llama, prompt100, method="random", seed=3)
    other = _kept_sets(llama, prompt100, method="random", seed=4)
    assert first == second
    assert first != other
    assert len(first[0]) == 50 and len(other[0]) == 50
    # random is not secretly recency or head/tail
    assert first[0] != _kept_sets(llama, prompt100, method="static")[0]
    assert first[0] != _kept_sets(llama, prompt100, method="truncate")[0]


def test_lazy_depends_on_content(llama):
    a, b = make_prompt(100, seed=11), make_prompt(100, seed=12)
    # a narrow span: the default (33) covers a third of this 100-token prompt
    assert _kept_sets(llama, a, method="lazy", span=3)[0] != _kept_sets(llama, b, method="lazy", span=3)[0]


# ---- 7. adaptive ---------------------------------------------------------------------------------


def _sharpened(scale: float = 4.0):
    """Tiny random models attend almost uniformly; sharpen layers 1 and 3 so content matters."""
    model = make_model("llama")
    with torch.no_grad():
        for layer in (1, 3):
            model.model.layers[layer].self_attn.q_proj.weight.mul_(scale)
            model.model.layers[layer].self_attn.k_proj.weight.mul_(scale)
    return model


def test_adaptive_dict_form_caps_and_varies():
    model = _sharpened()
    trimformer.trim(model, {"method": "lazy", "reduction_ratio": 0.5, "adaptive": True, "mass": 0.5,
                            "layers": (1, 3)})
    counts = []
    for seed in range(4):
        with torch.no_grad():
            model(make_prompt(100, seed=seed))
        kept = trimformer.stats(model)["kept_tokens_per_layer"]
        assert kept[0] == kept[1] == 100
        assert 20 <= kept[2] <= math.ceil(0.5 * 100)
        assert 20 <= kept[4] <= max(math.ceil(0.5 * kept[2]), 20)
        assert kept[2] == kept[3] and kept[4] == kept[5]
        counts.append(kept[2])
    assert len(set(counts)) > 1, f"adaptive counts did not vary with the input: {counts}"
    trimformer.untrim(model)


def test_adaptive_default_mass_never_exceeds_ratio(llama):
    trimformer.trim(llama, {"method": "lazy", "reduction_ratio": 0.5, "adaptive": True})
    patch_plan = {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}      # default stages of a 6-layer model
    with torch.no_grad():
        llama(make_prompt(100, seed=1))
    stats = trimformer.stats(llama)
    assert stats["schedule"] == patch_plan
    ceiling = expected_counts(100, patch_plan, LAYERS, 20)
    kept = stats["kept_tokens_per_layer"]
    for layer in range(1, LAYERS):
        if layer - 1 in patch_plan:     # each stage keeps at most ceil(0.5 * live), or the 20 protected
            assert kept[layer] <= max(math.ceil(0.5 * kept[layer - 1]), 20)
        assert kept[layer] <= ceiling[layer]
        assert kept[layer] >= 20


# ---- 9. revival accounting -----------------------------------------------------------------------


def _decode(model, out, steps: int):
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1)
    sizes = []
    for _ in range(steps):
        out = model(token[:, None], **cache_kwargs(cache))
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1)
        sizes.append([cache.layers[layer].keys.shape[2] for layer in range(LAYERS)])
    return out, sizes


def test_revive_off_drops_for_good_and_adds_one_slot_per_step(llama, prompt100):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive=False, revive_threshold=0.0)
    with torch.no_grad():
        out = llama(prompt100)
        assert trimformer.stats(llama)["dropped_for_good"] == 75
        out, sizes = _decode(llama, out, 4)
    stats = trimformer.stats(llama)
    assert stats["dropped_for_good"] == 75 == 100 - stats["kept_tokens_per_layer"][-1]
    assert stats["revived"] == 0 and stats["revived_per_layer"] == [0] * LAYERS
    assert stats["waiting_in_aux"] == 0
    assert stats["decode_steps"] == 4
    prefill = [100, 100, 50, 50, 25, 25]
    for step, row in enumerate(sizes, start=1):
        assert row == [n + step for n in prefill]
    state = trim_state(out)
    for layer in range(LAYERS):
        assert row_positions(state, layer)[-4:] == [100, 101, 102, 103]


@pytest.mark.parametrize("method", ["static", "truncate", "random"])
def test_baselines_do_not_revive_by_default(llama, prompt100, method):
    trimformer.trim(llama, method=method, keep=0.5, layers=(1, 3), revive_threshold=0.0)
    with torch.no_grad():
        out = llama(prompt100)
        _, sizes = _decode(llama, out, 2)
    stats = trimformer.stats(llama)
    assert stats["revived"] == 0
    assert stats["dropped_for_good"] == 75
    assert sizes[-1] == [102, 102, 52, 52, 27, 27]


@pytest.mark.parametrize("threshold, revive_max", [(0.0, 16), (1.0, 4), (1.0, 16)])
def test_revive_on_statistics_add_up(llama, prompt100, threshold, revive_max):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive=True,
                    revive_threshold=threshold, revive_max=revive_max)
    steps = 5
    with torch.no_grad():
        out = llama(prompt100)
        out, sizes = _decode(llama, out, steps)
    stats = trimformer.stats(llama)
    state = trim_state(out)
    kept = stats["kept_tokens_per_layer"]
    revived = stats["revived_per_layer"]
    assert stats["dropped_for_good"] == 0
    assert stats["decode_steps"] == steps
    assert revived[1] > 0, "threshold this low must revive something"
    for layer, nxt in [(1, 2), (3, 4)]:
        dropped_here = kept[layer] - kept[nxt]
        waiting = int(state.aux[layer].waiting.sum())
        assert dropped_here == waiting + revived[layer]
        assert revived[layer] <= revive_max * steps
    assert stats["waiting_in_aux"] == sum(int(e.waiting.sum()) for e in state.aux.values())
    assert stats["revived"] == sum(revived)
    assert all(r == 0 for i, r in enumerate(revived) if i not in (1, 3))
    # every revived token took exactly one new slot in each later layer
    final = sizes[-1]
    assert final[0] == final[1] == 100 + steps
    assert final[2] == final[3] == 50 + steps + revived[1]
    assert final[4] == final[5] == 25 + steps + revived[1] + revived[3]
    for layer in range(LAYERS):
        positions = row_positions(state, layer)
        assert len(positions) == final[layer]
        assert len(set(positions)) == len(positions), f"layer {layer} holds a position twice"
    # revived tokens are exactly the ones no longer waiting, and they are in the next layers' caches
    for layer, nxt in [(1, 2), (3, 4)]:
        entry = state.aux[layer]
        gone = set(entry.positions[0][~entry.waiting[0]].tolist())
        assert len(gone) == revived[layer]
        assert gone <= set(row_positions(state, nxt))
        assert gone.isdisjoint(row_positions(state, nxt)[: kept[nxt]])


def test_revive_threshold_zero_eventually_revives_everything(llama, prompt100):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive_threshold=0.0, revive_max=16)
    with torch.no_grad():
        out = llama(prompt100)
        out, _ = _decode(llama, out, 4)       # 50 in aux[1] at <= 16 per step: 4 steps
    stats = trimformer.stats(llama)
    assert stats["revived_per_layer"][1] == 50
    assert stats["revived_per_layer"][3] == 25
    assert stats["waiting_in_aux"] == 0
    state = trim_state(out)
    assert set(row_positions(state, 5)) == set(range(104))


def test_revive_every_skips_steps(llama, prompt100):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), revive_threshold=0.0, revive_max=2,
                    revive_every=2)
    with torch.no_grad():
        out = llama(prompt100)
        _, sizes = _decode(llama, out, 3)          # checks at steps 2 only
    assert trimformer.stats(llama)["revived_per_layer"][1] == 2
    assert sizes[0][2] == 51 and sizes[1][2] == 52 + 2 and sizes[2][2] == 53 + 2


def test_baseline_revives_when_asked(llama, prompt100):
    """revive=True overrides a baseline's default: the newest query's attention revives its dropped tokens."""
    trimformer.trim(llama, method="static", keep=0.5, layers=(1, 3), revive=True, revive_threshold=0.0,
                    revive_max=16)
    with torch.no_grad():
        out = llama(prompt100)
        out, sizes = _decode(llama, out, 1)
    stats = trimformer.stats(llama)
    assert stats["revived_per_layer"] == [0, 16, 0, 16, 0, 0]
    assert stats["dropped_for_good"] == 0
    assert sizes[0] == [101, 101, 50 + 1 + 16, 50 + 1 + 16, 25 + 1 + 32, 25 + 1 + 32]
