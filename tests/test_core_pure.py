"""Pure functions: keep policies, scorers, smoothing, FLOPs, config helpers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

import trimformer
from trimformer.config import TrimConfig, default_layers
from trimformer.ops.flops import attention_flops, layer_linear_flops_per_token, prefill_flops
from trimformer.ops.select import mass_counts, ratio_counts, select
from trimformer.ops.attention import accumulate, last_query_attention, newest_query_attention, shadow_attention
from trimformer.ops.smoothing import span_max_pool
from trimformer.scorers.base import ScoreInputs
from trimformer.scorers.head_tail import HeadTail
from trimformer.scorers.random import random_scores
from trimformer.scorers.recency import Recency
from conftest import TINY, make_model, make_prompt, row_positions, trim_state


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ---- policy.ratio_counts -------------------------------------------------------------------------


def test_ratio_counts_ceil_and_bounds():
    n = torch.tensor([100, 101, 7, 10, 0])
    assert ratio_counts(n, 0.5, torch.zeros(5, dtype=torch.long)).tolist() == [50, 51, 4, 5, 0]
    assert ratio_counts(n, 0.3, torch.zeros(5, dtype=torch.long)).tolist() == [30, 31, 3, 3, 0]
    assert ratio_counts(n, 1.0, torch.zeros(5, dtype=torch.long)).tolist() == [100, 101, 7, 10, 0]
    # never fewer than the protected tokens, never more than the live ones
    protected = torch.tensor([20, 20, 20, 2, 0])
    assert ratio_counts(n, 0.1, protected).tolist() == [20, 20, 7, 2, 0]


# ---- policy.mass_counts --------------------------------------------------------------------------


def test_mass_counts_hand_examples():
    scores = _t([[4.0, 3.0, 2.0, 1.0]])          # shares 0.4, 0.3, 0.2, 0.1
    valid = torch.ones(1, 4, dtype=torch.bool)
    none = torch.zeros(1, dtype=torch.long)
    assert mass_counts(scores, valid, 0.3, none).tolist() == [1]
    assert mass_counts(scores, valid, 0.4, none).tolist() == [1]
    assert mass_counts(scores, valid, 0.5, none).tolist() == [2]
    assert mass_counts(scores, valid, 0.7, none).tolist() == [2]
    assert mass_counts(scores, valid, 0.75, none).tolist() == [3]
    assert mass_counts(scores, valid, 0.9, none).tolist() == [3]
    assert mass_counts(scores, valid, 1.0, none).tolist() == [4]
    # order does not matter
    assert mass_counts(_t([[1.0, 3.0, 4.0, 2.0]]), valid, 0.75, none).tolist() == [3]
    # protected minimum
    assert mass_counts(scores, valid, 0.3, torch.tensor([3])).tolist() == [3]


def test_mass_counts_batch_invalid_and_degenerate():
    scores = _t([
        [100.0, 4.0, 3.0, 2.0, 1.0],    # first slot invalid: ignored (same as the 4-token row)
        [1.0, 1.0, 1.0, 1.0, 1.0],      # uniform: 0.9 of the mass needs 5 of 5 (0.8 < 0.9)
        [0.0, 0.0, 0.0, 0.0, 0.0],      # no signal: keep every valid token
        [-5.0, 8.0, 2.0, 0.0, 0.0],     # negative scores count as 0
    ])
    valid = torch.tensor([
        [False, True, True, True, True],
        [True, True, True, True, True],
        [True, True, True, False, False],
        [True, True, True, True, True],
    ])
    counts = mass_counts(scores, valid, 0.75, torch.zeros(4, dtype=torch.long))
    assert counts.tolist() == [3, 4, 3, 1]
    counts = mass_counts(scores, valid, 0.9, torch.zeros(4, dtype=torch.long))
    assert counts.tolist() == [3, 5, 3, 2]


# ---- policy.select -------------------------------------------------------------------------------


def test_select_top_protected_sorted():
    scores = _t([[0.1, 0.9, 0.3, 0.8, 0.2, 0.05]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    protected = torch.tensor([[True, False, False, False, False, True]])
    index, kept = select(scores, valid, protected, torch.tensor([3]))
    assert index.tolist() == [[0, 1, 5]]            # protected 0 and 5 beat 0.8
    assert kept.tolist() == [[True, True, True]]
    index, kept = select(scores, valid, protected, torch.tensor([4]))
    assert index.tolist() == [[0, 1, 3, 5]]


def test_select_batch_invalid_never_kept_filler_marked():
    scores = _t([
        [0.5, 0.1, 0.7, 0.2, 0.9, 0.3],
        [9.0, 9.0, 0.1, 0.7, 0.2, 0.4],
    ])
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    protected = torch.zeros(2, 6, dtype=torch.bool)
    index, kept = select(scores, valid, protected, torch.tensor([4, 2]))
    assert index.shape == kept.shape == (2, 4)
    assert index[0].tolist() == [0, 2, 4, 5]
    assert kept[0].all()
    assert sorted(index[1].tolist()) == index[1].tolist()
    kept_index = index[1][kept[1]].tolist()
    assert kept_index == [3, 5]                       # the two best valid ones (0.7, 0.4)
    assert int(kept[1].sum()) == 2
    for i, k in zip(index[1].tolist(), kept[1].tolist()):
        if not valid[1, i]:
            assert not k, "an invalid slot was marked kept"


def test_select_counts_zero_and_all():
    scores = _t([[0.3, 0.2, 0.1]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    protected = torch.zeros(1, 3, dtype=torch.bool)
    index, kept = select(scores, valid, protected, torch.tensor([3]))
    assert index.tolist() == [[0, 1, 2]] and kept.all()
    index, kept = select(scores, valid, protected, torch.tensor([0]))
    assert index.shape == (1, 0)


def test_select_ties_do_not_depend_on_padding():
    row = _t([0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2])
    alone_index, _ = select(row[None], torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool),
                            torch.tensor([4]))
    for pad in (1, 2, 3, 5, 30):
        scores = torch.cat([torch.zeros(pad), row])[None]
        valid = torch.cat([torch.zeros(pad, dtype=torch.bool), torch.ones(10, dtype=torch.bool)])[None]
        index, kept = select(scores, valid, torch.zeros_like(valid), torch.tensor([4]))
        assert (index[kept] - pad).tolist() == alone_index[0].tolist(), f"left padding {pad}"


def test_select_filler_uses_invalid_slots_first():
    scores = _t([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],
        [0.0, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.7],      # 3 left-padding slots
    ])
    valid = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    index, kept = select(scores, valid, torch.zeros_like(valid), torch.tensor([5, 3]))
    filler = index[1][~kept[1]]
    assert not valid[1, filler].any(), f"filler slots {filler.tolist()} are real tokens"


# ---- scoring.span_max_pool -----------------------------------------------------------------------


def test_span_max_pool():
    scores = _t([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    assert torch.equal(span_max_pool(scores, 1), scores)
    assert span_max_pool(scores, 3).tolist() == [[0.0, 5.0, 5.0, 5.0, 0.0, 1.0, 1.0, 1.0]]
    assert span_max_pool(scores, 5).tolist() == [[5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0]]
    assert span_max_pool(scores, 9).shape == scores.shape
    batch = torch.stack([scores[0], scores[0].flip(0)])
    pooled = span_max_pool(batch, 3)
    assert torch.equal(pooled[1], pooled[0].flip(0))


# ---- scoring.last_query_attention / newest_query_attention ----------------------------------------


def _reference_probs(query, key, scaling, q_pos, k_pos, k_valid):
    """Direct eager attention, GQA through transformers' repeat_kv, causal by original position."""
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups)                                               # (B, H, K, hd)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling                # (B, H, W, K)
    allowed = k_valid[:, None, None, :] & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, w, k, hd = 2, 4, 2, 3, 7, 8
    query = torch.randn(b, h, w, hd, generator=g) * 2
    key = torch.randn(b, hkv, k, hd, generator=g) * 2
    # row 0: keys at gappy positions, all valid; row 1: two padding slots first
    k_pos = torch.tensor([[0, 2, 3, 7, 8, 9, 12], [0, 0, 0, 1, 2, 3, 4]])
    k_valid = torch.tensor([[True] * 7, [False, False, True, True, True, True, True]])
    q_pos = torch.tensor([[8, 9, 12], [2, 3, 4]])
    q_valid = torch.tensor([[True, True, True], [True, False, True]])
    return query, key, 8 ** -0.5, q_pos, k_pos, k_valid, q_valid


def test_last_query_attention_matches_eager_gqa(qk):
    query, key, scaling, q_pos, k_pos, k_valid, q_valid = qk
    probs = _reference_probs(query, key, scaling, q_pos, k_pos, k_valid) * q_valid[:, None, :, None]
    got_max = last_query_attention(query, key, scaling, q_pos, k_pos, k_valid, q_valid, "max")
    assert got_max.shape == (2, 7)
    assert torch.allclose(got_max, probs.amax(dim=(1, 2)), atol=1e-6)
    got_mean = last_query_attention(query, key, scaling, q_pos, k_pos, k_valid, q_valid, "mean")
    n = (q_valid.sum(-1) * 4).float()
    assert torch.allclose(got_mean, probs.sum(dim=(1, 2)) / n[:, None], atol=1e-6)
    # causal by position: keys after every window query get nothing
    assert got_max[0, 6] > 0 and got_max[1, :2].eq(0).all()
    # each valid query row is a distribution over allowed keys
    assert torch.allclose(probs[0].sum(-1), torch.ones(4, 3), atol=1e-5)


def test_last_query_attention_wrong_gqa_grouping_differs(qk):
    """Guard against the test being vacuous: pairing query heads with the wrong kv heads changes the answer."""
    query, key, scaling, q_pos, k_pos, k_valid, q_valid = qk
    got = last_query_attention(query, key, scaling, q_pos, k_pos, k_valid, q_valid, "max")
    wrong = (_reference_probs(query, key[:, [1, 0]], scaling, q_pos, k_pos, k_valid)
             * q_valid[:, None, :, None]).amax(dim=(1, 2))
    assert not torch.allclose(got, wrong, atol=1e-4)


def test_newest_query_attention(qk):
    query, key, scaling, q_pos, k_pos, k_valid, _ = qk
    newest, pos = query[:, :, -1:], q_pos[:, -1:]
    got = newest_query_attention(newest, key, scaling, pos, k_pos, k_valid)
    expected = _reference_probs(newest, key, scaling, pos, k_pos, k_valid).amax(dim=(1, 2))
    assert torch.allclose(got, expected, atol=1e-6)


def test_accumulate_decays_old_slots_and_starts_new_ones_from_zero():
    previous = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    attention = torch.tensor([[0.5, 0.5, 0.25], [0.0, 1.0, 0.5]])
    assert accumulate(previous, attention, 0.5).tolist() == [[1.0, 1.5, 0.25], [2.0, 1.0, 0.5]]
    assert attention.tolist() == [[0.5, 0.5, 0.25], [0.0, 1.0, 0.5]]        # inputs untouched


def test_shadow_attention_is_the_attention_a_key_would_get_against_the_cache(qk):
    query, key, scaling, *_ = qk                                          # (B, H, W, hd), (B, Hkv, K, hd)
    newest = query[:, :, -1:]
    cache, shadow = key[:, :, :5], key[:, :, 5:]
    logits = torch.einsum("bhd,bhkd->bhk", newest[:, :, 0], repeat_kv(cache, query.shape[1] // key.shape[1])) * scaling
    lse = torch.logsumexp(logits, dim=-1)                                # (B, H) over the live cache
    got = shadow_attention(newest, shadow, scaling, lse)                  # (B, N)
    s_logits = torch.einsum("bhd,bhkd->bhk", newest[:, :, 0], repeat_kv(shadow, query.shape[1] // key.shape[1])) * scaling
    expected = torch.exp(s_logits - lse[:, :, None]).amax(dim=1)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_lazy_scores_match_eager_attention_of_the_model(monkeypatch):
    """End to end: the scores the attention wrapper computes at a pruning layer are the max (over heads and
    the last `window` queries) of that layer's real attention probabilities, and the first stage keeps the
    protected tokens plus the top-scored others (span=1: no pooling)."""
    import trimformer.mechanisms.prefill as prefill

    ids = make_prompt(100, seed=41)
    reference_model = make_model("llama", attn="eager")
    with torch.no_grad():
        attentions = reference_model(ids, output_attentions=True).attentions
    window = 16
    reference = attentions[1][0, :, -window:, :].amax(dim=(0, 1))          # (100,)

    captured = []
    original = prefill.span_max_pool
    monkeypatch.setattr(prefill, "span_max_pool", lambda s, span: (captured.append(s.clone()), original(s, span))[1])
    model = make_model("llama", attn="sdpa")
    trimformer.trim(model, method="lazy", keep=0.5, layers=(1,), window=window, span=1)
    with torch.no_grad():
        state = trim_state(model(ids))
    assert len(captured) == 1
    scores = captured[0][0]
    assert torch.allclose(scores, reference, atol=1e-6)
    protected = set(range(4)) | set(range(84, 100))
    ranked = [p for p in scores.argsort(descending=True).tolist() if p not in protected]
    assert row_positions(state, 2) == sorted(protected | set(ranked[:30]))
    trimformer.untrim(model)


# ---- position scorers and random ----------------------------------------------------------------


def _position_inputs(positions: torch.Tensor, lengths: torch.Tensor) -> ScoreInputs:
    return ScoreInputs(layer=0, positions=positions, valid=torch.ones_like(positions, dtype=torch.bool),
                       lengths=lengths, hidden=torch.zeros(*positions.shape, 1), attention=None, seed=0)


def test_position_scorers():
    positions = torch.arange(10)[None]
    assert Recency().score(_position_inputs(positions, torch.tensor([10]))).tolist() == [list(map(float, range(10)))]
    assert HeadTail().score(_position_inputs(positions, torch.tensor([10]))).tolist() == [
        [0.0, -1.0, -2.0, -3.0, -4.0, -4.0, -3.0, -2.0, -1.0, 0.0]
    ]
    # per-row lengths
    scores = HeadTail().score(_position_inputs(torch.arange(6).expand(2, 6), torch.tensor([6, 4])))
    assert scores[1].tolist()[:4] == [0.0, -1.0, -1.0, 0.0]


def test_random_scores_seeded():
    positions = torch.arange(50).expand(2, 50)
    a, b, c = random_scores(positions, 7), random_scores(positions, 7), random_scores(positions, 8)
    assert a.shape == (2, 50)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_random_scores_depend_only_on_position():
    """A row's scores do not change with the batch it sits in (padding, other rows' lengths)."""
    alone = random_scores(torch.arange(30)[None], 3)
    batch = random_scores(torch.stack([torch.arange(30), torch.arange(100, 130)]), 3)
    assert torch.equal(batch[0], alone[0])
    assert not torch.equal(batch[1], alone[0])


# ---- flops ---------------------------------------------------------------------------------------


def test_prefill_flops_by_hand():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**TINY)
    # d=64, H=4, hd=16, Hkv=2, I=128: q 4096 + kv 4096 + o 4096 + mlp 24576 = 36864 params -> 73728 flops
    assert layer_linear_flops_per_token(cfg) == 73728
    assert attention_flops(cfg, 10) == 4 * 4 * 16 * 55 == 14080
    head = 2 * 64 * 128
    assert prefill_flops(cfg, [[10], [5]]) == 73728 * 15 + 14080 + 3840 + head == 1140224
    # two rows: each its own attention triangle and LM-head row
    assert prefill_flops(cfg, [[10, 4]]) == 73728 * 14 + 14080 + 4 * 4 * 16 * 10 + 2 * head
    assert prefill_flops(cfg, []) == 0
    # an explicit head_dim is honoured
    cfg2 = LlamaConfig(**{**TINY, "head_dim": 32})
    assert layer_linear_flops_per_token(cfg2) == 2 * (64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 128)


# ---- config helpers ------------------------------------------------------------------------------


def test_default_layers_and_schedule():
    assert default_layers(30) == (6, 12, 18, 24)
    assert default_layers(6) == (1, 2, 3, 4)
    assert default_layers(2) == (0,)
    assert TrimConfig(keep=0.5).resolve_schedule(6) == {1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}
    assert TrimConfig(schedule={3: 0.25, 1: 0.5}, keep=0.9).resolve_schedule(6) == {1: 0.5, 3: 0.25}


def test_from_dict_token_optimizer_form():
    cfg = TrimConfig.from_dict({"method": "lazy", "reduction_ratio": 0.5, "adaptive": True})
    assert cfg.keep == 0.5 and cfg.adaptive and cfg.method == "lazy"
    cfg = TrimConfig.coerce("random", {"keep": 0.25, "seed": 3})
    assert (cfg.method, cfg.keep, cfg.seed) == ("random", 0.25, 3)
    base = TrimConfig(method="static", keep=0.3)
    assert TrimConfig.coerce(base, {}) is base
    assert TrimConfig.coerce(base, {"keep": 0.7}).keep == 0.7 and base.keep == 0.3


def test_methods_registry():
    assert set(trimformer.METHODS) >= {"lazy", "random", "static", "truncate"}
    assert trimformer.METHODS["lazy"].revive_default is True
    assert all(not trimformer.METHODS[m].revive_default for m in ("random", "static", "truncate"))
    assert math.isclose(0.5, TrimConfig(keep=0.5).keep)


def test_hooks_remove_restores_the_module_exactly():
    from trimformer.patch.hooks import Hooks

    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    ref = layer(x)
    hooks = Hooks()
    hooks.add(layer.register_forward_hook(lambda module, args, output: output * 2))
    hooks.override_forward(layer, lambda inputs: torch.zeros(2, 3))
    assert torch.equal(layer(x), torch.zeros(2, 3))
    hooks.remove()
    hooks.remove()                                       # a second remove is harmless
    assert "forward" not in layer.__dict__ and not layer._forward_hooks
    assert torch.equal(layer(x), ref)
