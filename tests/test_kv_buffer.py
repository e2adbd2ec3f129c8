"""The decode-time KV machinery's data structures: in-place cache layers, slot compaction, the shadow
set's growing buffers, and the per-step decode FLOPs."""

from __future__ import annotations

import copy

import torch
from conftest import TINY, make_prompt
from transformers.cache_utils import DynamicLayer

import trimformer
from trimformer.mechanisms.state import ShadowLayer
from trimformer.ops.flops import decode_step_flops, layer_linear_flops_per_token
from trimformer.patch.cache_names import cache_kwargs
from trimformer.mechanisms.kv_buffer import InPlaceLayer, kv_bytes, use_in_place
from trimformer.ops.select import compaction_moves, eviction_mask, grouped_compaction_moves


def _greedy(model, ids, steps, in_place):
    """Prefill + `steps` greedy steps; returns (logits of every step (steps, V), cache)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        if in_place:
            use_in_place(cache)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1)
            out = model(input_ids=token[:, None], **cache_kwargs(cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(logits), cache


# ---- InPlaceLayer --------------------------------------------------------------------------------

def test_in_place_cache_decodes_exactly_like_dynamic_cache(llama):
    ids = make_prompt(40, seed=3)
    want, ref_cache = _greedy(llama, ids, 100, in_place=False)
    got, cache = _greedy(llama, ids, 100, in_place=True)
    assert all(type(layer) is InPlaceLayer for layer in cache.layers)
    assert torch.equal(got, want)
    for layer, ref in zip(cache.layers, ref_cache.layers):
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)


def test_in_place_layer_writes_into_its_buffer_and_regrows():
    layer = InPlaceLayer()
    k = torch.randn(1, 2, 100, 4)
    layer.update(k, -k)                                         # first update: buffer of 100 + 64 spare
    buffer = layer._key_buffer
    assert buffer.shape[2] == 164
    for step in range(64):                                      # fills the spare room without reallocating
        new = torch.full((1, 2, 1, 4), float(step))
        keys, values = layer.update(new, -new)
        assert layer._key_buffer is buffer and keys.data_ptr() == buffer.data_ptr()
    assert torch.equal(keys[:, :, :100], k) and torch.equal(keys[:, :, 100:, 0], torch.arange(64.0).expand(1, 2, 64))
    assert torch.equal(values, -keys)
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))   # full: a new, larger buffer
    assert layer._key_buffer is not buffer and layer.get_seq_length() == 165
    assert torch.equal(layer.keys[:, :, :100], k)


def test_in_place_layer_shrinks_after_a_large_cut_and_follows_outside_replacement():
    layer = InPlaceLayer()
    k = torch.randn(1, 2, 1000, 4)
    layer.update(k, k)
    assert layer.nbytes() == 2 * (1000 + 125) * 2 * 4 * 4
    layer.keys, layer.values = layer.keys[:, :, :300], layer.values[:, :, :300]   # an eviction's cut (views)
    keys, _ = layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert layer._key_buffer.shape[2] == 301 + 64                                 # mostly empty: given back
    assert torch.equal(keys[:, :, :300], k[:, :, :300]) and bool((keys[:, :, 300] == 1).all())
    buffer = layer._key_buffer                                                    # 301 slots in 365
    layer.keys, layer.values = layer.keys[:, :, :250], layer.values[:, :, :250]   # 251 + 2 spares >= 365:
    layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))                  # kept
    assert layer._key_buffer is buffer
    layer.keys, layer.values = layer.keys[:, :, :200], layer.values[:, :, :200]   # 201 + 2 spares < 365: given
    keys, _ = layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))        # back (not mostly empty)
    assert layer._key_buffer.shape[2] == 201 + 64 and torch.equal(keys[:, :, :200], k[:, :, :200])
    replaced = torch.randn(1, 2, 10, 4)                                           # e.g. a beam reorder
    layer.keys, layer.values = replaced, replaced.clone()
    keys, _ = layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert torch.equal(keys[:, :, :10], replaced) and keys.shape[2] == 11


def test_use_in_place_swaps_only_plain_dynamic_layers_and_copies_nothing(llama):
    with torch.no_grad():
        cache = llama(input_ids=make_prompt(20), use_cache=True).past_key_values
    before = [layer.keys for layer in cache.layers]
    odd = copy.copy(cache.layers[0])
    odd.__class__ = type("Sliding", (DynamicLayer,), {})
    cache.layers[0] = odd
    use_in_place(cache)
    assert type(cache.layers[0]).__name__ == "Sliding"
    assert all(type(layer) is InPlaceLayer for layer in cache.layers[1:])
    assert all(layer.keys is keys for layer, keys in zip(cache.layers[1:], before[1:]))
    assert kv_bytes(cache) == sum(k.numel() * 4 * 2 for k in before)


def test_runtime_trimmed_model_uses_in_place_layers_and_keeps_its_greedy_output(llama):
    ids = make_prompt(120, seed=1)
    ref = llama.generate(ids, max_new_tokens=24, do_sample=False)
    trimformer.trim(llama, method="runtime", pruning_threshold=0.0)
    out = llama.generate(ids, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert all(type(layer) is InPlaceLayer for layer in out.past_key_values.layers)


# ---- eviction_mask -------------------------------------------------------------------------------

def test_eviction_mask_takes_the_lowest_and_breaks_ties_by_slot_order():
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.1, 0.9, 0.1, 0.3],
                           [0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]])
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 6] = False                                                    # filler: never counted or evicted
    protected = torch.zeros(2, 7, dtype=torch.bool)
    protected[0, 1] = True                                                 # a sink: never evicted
    # row 0 keeps 4 of 7: the three lowest unprotected are 0.1 (slot 3), 0.1 (slot 5), 0.2 (slot 2)
    # row 1 keeps 3 of 6 equal scores: the first three in slot order go
    evict = eviction_mask(scores, valid, protected, torch.tensor([4, 3]), 0.0)
    assert evict.nonzero().tolist() == [[0, 2], [0, 3], [0, 5], [1, 0], [1, 1], [1, 2]]


def test_eviction_mask_threshold_counts_toward_the_budget_and_over_asking_evicts_all_candidates():
    scores = torch.tensor([[0.01, 0.30, 0.02, 0.40, 0.27]])                # 5 live: uniform is 0.2
    valid = torch.ones(1, 5, dtype=torch.bool)
    protected = torch.tensor([[False, False, False, False, True]])
    # under 0.5 x uniform (0.1): slots 0 and 2; a budget of 2 also takes the next lowest (slot 1)
    evict = eviction_mask(scores, valid, protected, torch.tensor([2]), 0.5)
    assert evict.tolist() == [[True, True, True, False, False]]
    # no budget: the threshold alone
    assert eviction_mask(scores, valid, protected, torch.tensor([99]), 0.5).tolist() == [[True, False, True, False, False]]
    # a budget under the protected count: every unprotected slot goes, the protected one stays
    assert eviction_mask(scores, valid, protected, torch.tensor([0]), 0.0).tolist() == [[True, True, True, True, False]]


# ---- compaction_moves ----------------------------------------------------------------------------

def test_compaction_moves_fill_holes_from_the_tail():
    keep = torch.tensor([[True, False, True, False, True, True, True],
                         [True, True, True, False, False, False, True]])
    width, dst, src = compaction_moves(keep)
    assert width == 5
    # row 0: holes 1, 3 get the kept slots 5, 6; row 1: hole 3 gets slot 6, its second pair is a no-op
    assert dst.tolist() == [[1, 3], [3, 4]]
    assert src.tolist() == [[5, 6], [6, 4]]
    slots = torch.arange(7).expand(2, 7)
    packed = slots.scatter(1, dst, slots.gather(1, src))[:, :width]
    kept = keep.scatter(1, dst, keep.gather(1, src))[:, :width]
    assert packed[0].tolist() == [0, 5, 2, 6, 4] and kept[0].all()
    assert packed[1][kept[1]].tolist() == [0, 1, 2, 6]                 # the 4 kept slots, one filler left
    assert sorted(packed[1][kept[1]].tolist()) == keep[1].nonzero().flatten().tolist()


def test_compaction_moves_nothing_when_the_holes_are_at_the_end():
    keep = torch.tensor([[True, True, True, False, False]])
    width, dst, src = compaction_moves(keep)
    assert width == 3 and dst.shape == (1, 0) and src.shape == (1, 0)


def test_grouped_compaction_moves_equal_each_group_alone():
    # 3 groups of 2 rows (e.g. 3 layers' caches of a 2-row batch, stacked), each packing into its own width
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 40, generator=generator) < torch.tensor([0.9, 0.3, 0.5, 0.5, 0.2, 0.95])[:, None]
    keep[2:4, 30:] = False                                             # a narrower layer, padded on the right
    widths, moves, dst, src = grouped_compaction_moves(keep, 2)
    for g in range(3):
        rows = slice(2 * g, 2 * g + 2)
        width, want_dst, want_src = compaction_moves(keep[rows])
        assert widths[g] == width and moves[g] == want_dst.shape[1]
        assert torch.equal(dst[rows, : moves[g]], want_dst) and torch.equal(src[rows, : moves[g]], want_src)
        # the columns after a group's own pairs copy a slot onto itself
        assert torch.equal(dst[rows, moves[g]:], src[rows, moves[g]:])
    assert widths == [int(keep[r: r + 2].sum(-1).max()) for r in (0, 2, 4)]


# ---- ShadowLayer ---------------------------------------------------------------------------------

def _entry(positions, fill):
    n = len(positions)
    return ShadowLayer(keys=torch.full((1, 2, n, 4), fill), values=torch.full((1, 2, n, 4), -fill),
                       positions=torch.tensor([positions]), valid=torch.ones(1, n, dtype=torch.bool),
                       scores=torch.full((1, n), fill))


def test_shadow_layer_append_keeps_everything_in_order_and_grows_geometrically():
    shadow = _entry([3, 7], 1.0)
    shadow.append(_entry([9], 2.0))
    capacity = shadow._positions.shape[1]
    assert capacity == 4 and shadow.size == 3                  # grown to 1.5 x 2 + 1
    shadow.append(_entry([11], 3.0))                           # fits: no new buffer
    assert shadow._positions.shape[1] == capacity
    assert shadow.positions.tolist() == [[3, 7, 9, 11]]
    assert shadow.keys[0, 0, :, 0].tolist() == [1.0, 1.0, 2.0, 3.0]
    assert torch.equal(shadow.values, -shadow.keys) and shadow.valid.all()
    assert shadow.bytes() == 2 * capacity * 2 * 4 * 4


# ---- decode FLOPs --------------------------------------------------------------------------------

def test_decode_step_flops_by_hand():
    hd = TINY["hidden_size"] // TINY["num_attention_heads"]
    slots = [10, 20]
    want = (2 * layer_linear_flops_per_token(_Config()) + 4 * TINY["num_attention_heads"] * hd * 30
            + 2 * TINY["hidden_size"] * TINY["vocab_size"])
    assert decode_step_flops(_Config(), slots) == want


class _Config:
    hidden_size = TINY["hidden_size"]
    num_attention_heads = TINY["num_attention_heads"]
    num_key_value_heads = TINY["num_key_value_heads"]
    intermediate_size = TINY["intermediate_size"]
    vocab_size = TINY["vocab_size"]
