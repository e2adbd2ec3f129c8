"""Token merging pure functions on hand-made examples (ToMe bipartite matching, sizes, schedules, ATS)."""

import math

import pytest
import torch

from trimformer.errors import ConfigError, TrimformerError
from trimformer.ops.merge import (
    attention_bias,
    ats_counts,
    bipartite_soft_matching,
    merge_owner,
    merge_valid,
    merge_wavg,
    parse_r,
    r_for_keep,
    set_compaction,
    source_matrix,
    token_counts,
    unmerge,
    unmerge_schedule,
)


def _tome_reference(metric, r, x, distill=False):
    """ToMe's algorithm (class token protected) written out for one dense batch."""
    protected = 2 if distill else 1
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -math.inf
    if distill:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(-1)
    edge = node_max.argsort(-1, descending=True)[..., None]
    unm, src = edge[:, r:].sort(dim=1)[0], edge[:, :r]
    dst = node_idx[..., None].gather(1, src)

    def merge(v):
        s, d = v[:, ::2], v[:, 1::2]
        n, t1, c = s.shape
        u = s.gather(1, unm.expand(n, t1 - r, c))
        d = d.scatter_reduce(1, dst.expand(n, r, c), s.gather(1, src.expand(n, r, c)), reduce="sum")
        if distill:
            return torch.cat([u[:, :1], d[:, :1], u[:, 1:], d[:, 1:]], 1)
        return torch.cat([u, d], 1)

    size = torch.ones(x.shape[0], t, 1)
    return merge(x * size) / merge(size), merge(size)[..., 0]


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("t,r", [(17, 4), (10, 3), (11, 100), (9, 0)])
def test_matches_tome_reference(distill, t, r):
    torch.manual_seed(t + r)
    metric, x = torch.randn(2, t, 6), torch.randn(2, t, 5)
    ref_x, ref_size = _tome_reference(metric, r, x, distill)
    m = bipartite_soft_matching(metric, r, protected=2 if distill else 1)
    out, size = merge_wavg(m, x)
    assert out.shape == ref_x.shape
    assert torch.allclose(out, ref_x, atol=1e-5)
    assert torch.equal(size, ref_size)


def test_sizes_add_up_and_weighted_average_is_exact():
    # slots 0..5; keys make slot 2 (A) match slot 3 (B) and slot 4 (A) match slot 3 too
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0.1, 1], [1, 1, 0]]])
    x = torch.tensor([[[0.0], [10.0], [2.0], [4.0], [8.0], [6.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 2.0, 1.0]])
    m = bipartite_soft_matching(metric, 2)
    out, new_size = merge_wavg(m, x, size)
    assert float(new_size.sum()) == float(size.sum())                     # sizes add up
    assert out.shape[1] == 4
    # dst slot 3 holds slots 2 (size 3, x 2), 3 (size 1, x 4), 4 (size 2, x 8)
    j = int((new_size == 6).nonzero()[0, 1])
    assert out[0, j, 0].item() == pytest.approx((3 * 2 + 1 * 4 + 2 * 8) / 6, abs=1e-6)
    assert out[0, 0, 0].item() == 0.0 and new_size[0, 0].item() == 1.0    # [CLS] untouched at slot 0


def test_protected_tokens_never_merged():
    torch.manual_seed(0)
    metric = torch.randn(3, 21, 4)
    metric[:, 0] = metric[:, 2]   # [CLS] identical to a neighbour: still never merged
    metric[:, 1] = metric[:, 3]   # distillation token identical to one: never a target nor merged
    x = torch.randn(3, 21, 2)
    owner = torch.arange(21).expand(3, -1)
    for _ in range(4):
        m = bipartite_soft_matching(metric, 5, protected=2)
        t = x.shape[1]
        x, size = merge_wavg(m, x, None if t == 21 else size)  # noqa: F821
        metric, _ = merge_wavg(m, metric)
        owner = merge_owner(m, owner, t)
        assert torch.equal(owner[:, 0], torch.zeros(3, dtype=torch.long))
        assert torch.equal(owner[:, 1], torch.ones(3, dtype=torch.long))
        assert torch.all(size[:, :2] == 1)
        assert (owner == 0).sum() == 3 and (owner == 1).sum() == 3


def test_owner_map_and_source_matrix_agree_with_sizes():
    torch.manual_seed(1)
    metric, x = torch.randn(2, 30, 8), torch.randn(2, 30, 3)
    owner = torch.arange(30).expand(2, -1)
    size = None
    for r in (6, 5, 4):
        m = bipartite_soft_matching(metric, r)
        t = x.shape[1]
        x, size = merge_wavg(m, x, size)
        metric, _ = merge_wavg(m, metric)
        owner = merge_owner(m, owner, t)
    assert torch.equal(source_matrix(owner, x.shape[1]).sum(-1).float(), size)


def test_padding_never_merged_into_and_rows_do_not_see_each_other():
    torch.manual_seed(2)
    metric = torch.randn(2, 12, 4)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 7:] = False
    m = bipartite_soft_matching(metric, 3, valid=valid)
    size = valid.float()
    new_valid = set_compaction(m, merge_valid(m, valid))
    x, new_size = merge_wavg(m, torch.randn(2, 12, 3), size)
    assert torch.equal(new_valid, new_size > 0)
    assert float(new_size[1].sum()) == 7.0 and float(new_size[0].sum()) == 12.0
    # the padded row merges what it merges alone
    alone = bipartite_soft_matching(metric[1:, :7], 3)
    assert int(alone.merged.sum()) == int(m.merged[1].sum()) == 3


def test_pooling_merged_tokens_by_owner_keeps_the_padded_mean():
    # sentence-transformers' mean pooling of a merged sequence: each input token reads its slot (the owner
    # map), padding is left out. That is the size-weighted mean of the slots, so with no layer in between
    # it equals the mean of the unmerged tokens exactly, padded rows included; a plain mean of slots is not.
    torch.manual_seed(3)
    metric, x0 = torch.randn(2, 16, 4), torch.randn(2, 16, 3)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, 9:] = False
    full = (x0 * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    x, size, live = x0, valid.float(), valid
    owner = torch.where(valid, torch.arange(16).expand(2, -1), -1)
    for r in (3, 2, 2):
        m = bipartite_soft_matching(metric, r, valid=live)
        t = x.shape[1]
        live = set_compaction(m, merge_valid(m, live))
        x, size = merge_wavg(m, x, size)
        metric, _ = merge_wavg(m, metric)
        owner = merge_owner(m, owner, t)
    per_token = x.gather(1, owner.clamp(min=0)[..., None].expand(-1, -1, 3))       # (B, N, C)
    pooled = (per_token * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    assert torch.allclose(pooled, full, atol=1e-5)
    assert torch.allclose((x * size[..., None]).sum(1) / size.sum(1, keepdim=True), full, atol=1e-5)
    plain = (x * live[..., None]).sum(1) / live.sum(1, keepdim=True)
    assert not torch.allclose(plain, full, atol=1e-3)


def test_r_schedules():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    dec = parse_r(12, 13, "decreasing")
    assert dec[0] == 26 and dec[-1] == 0 and all(a >= b for a, b in zip(dec, dec[1:]))
    inc = parse_r(12, 13, "increasing")
    assert inc[0] == 0 and inc[-1] == 26
    assert parse_r(5, [4, 2]) == [4, 2, 0, 0, 0]
    assert token_counts(197, parse_r(12, 13))[-1] == (54, 41)   # ToMe ViT-B r=13: 197 -> 41 tokens
    assert r_for_keep(100, 10, 0.7) == 6
    for bad in (-1, 1.5, [1, -2]):
        with pytest.raises(ConfigError):
            parse_r(4, bad)
    with pytest.raises(ConfigError, match="r_schedule"):
        parse_r(4, 2, "wavy")
    with pytest.raises(TrimformerError, match="r lists 5 layers"):
        parse_r(4, [1, 1, 1, 1, 1])


def test_proportional_attention_bias():
    size = torch.tensor([[1.0, 2.0, 0.0]])
    bias = attention_bias(size, True, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == 0 and bias[0, 0, 0, 1] == pytest.approx(math.log(2))
    assert bias[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert torch.equal(attention_bias(size, False, torch.float32)[0, 0, 0, :2], torch.zeros(2))


def test_ats_sampling_keeps_fewer_for_peaked_scores():
    cand = torch.ones(3, 8, dtype=torch.bool)
    flat = torch.ones(8)
    peaked = torch.tensor([100.0, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
    two = torch.tensor([50.0, 50.0, 0, 0, 0, 0, 0, 0])
    counts = ats_counts(torch.stack([flat, peaked, two]), cand, torch.tensor([6, 6, 6]))
    assert counts.tolist() == [6, 1, 2]
    cand[0, 4:] = False   # never picks a non-candidate
    assert ats_counts(flat[None], cand[:1], torch.tensor([8])).item() == 4


# ---- merge and unmerge (ToMe for Stable Diffusion) ------------------------------------------------
def test_unmerge_of_a_hand_made_merge_gives_each_token_its_group():
    # slots 0..5: A = 0, 2, 4; B = 1, 3, 5. Slot 2 is parallel to slot 3 and slot 4 to slot 5; [CLS] (0)
    # is protected, so r=2 merges 2 -> 3 and 4 -> 5 and keeps A = [0], B = [1, 3, 5].
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 1.0], [3.0, -1.0], [6.0, -2.0]]])
    m = bipartite_soft_matching(x, 2)
    merged, size = merge_wavg(m, x)
    assert size.tolist() == [[1.0, 1.0, 2.0, 2.0]]
    assert merged[0].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.5, 1.5], [4.5, -1.5]]
    y = torch.tensor([[[10.0], [11.0], [12.0], [13.0]]])           # a block's output on the merged slots
    assert unmerge(m, y, 6)[0, :, 0].tolist() == [10.0, 11.0, 12.0, 12.0, 13.0, 13.0]
    assert torch.equal(unmerge(m, merged, 6)[0, [0, 1]], x[0, [0, 1]])   # unmerged tokens: their own rows


def test_unmerge_after_compaction_and_padding():
    # row 1 is padded after slot 4 (invalid slots are removed for free, and get 0 back)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, generator=g)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    m = bipartite_soft_matching(x, torch.tensor([2, 1]), valid=valid)
    new_valid = set_compaction(m, merge_valid(m, valid))
    merged, size = merge_wavg(m, x, valid.float())
    assert new_valid.sum(-1).tolist() == [6, 4] and size.sum(-1).tolist() == [8.0, 5.0]
    back = unmerge(m, merged, 8)
    owner = merge_owner(m, torch.arange(8).expand(2, -1), 8)
    for b in range(2):
        for t in range(8):
            if not valid[b, t]:
                assert owner[b, t] == -1 or size[b, owner[b, t]] == 0 or torch.equal(back[b, t], merged[b, owner[b, t]])
            else:
                assert torch.equal(back[b, t], merged[b, owner[b, t]])
                if size[b, owner[b, t]] == 1:
                    assert torch.allclose(back[b, t], x[b, t])


def test_unmerge_schedule_counts_the_work_of_each_block():
    n, layers = 40, 6
    for costs in ((1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0)):
        rs = unmerge_schedule(n, layers, 0.7, protected=2, costs=costs)
        done = sum(2 * n - costs[0] * a - costs[1] * m for a, m in rs) / (2 * n * layers)
        assert done >= 0.7 - 1e-9                                   # never less work than asked
        assert all(a <= 19 and m <= 19 for a, m in rs)              # capped at half the unprotected tokens
        assert all(a == 0 for a, _ in rs) if costs[0] == 0 else True
    assert unmerge_schedule(40, 6, 0.7, 2) == [(12, 12)] * 6       # 30% of 2 x 40 x 6 = 144 merges
    assert unmerge_schedule(40, 6, 0.7, 2, (0.0, 1.0)) == [(0, 19)] * 6   # MLP only: the cap binds (kept 0.76)
    assert unmerge_schedule(12, 6, 1.0, 2) == [(0, 0)] * 6
    with pytest.raises(ConfigError, match="keep"):
        unmerge_schedule(12, 6, 0.0)


def test_threshold_merges_only_pairs_alike_enough():
    # A slots 0, 2, 4, 6; B slots 1, 3, 5, 7. Slot 2 equals slot 3 (cosine 1), slot 4 is close to slot 5
    # (cosine 0.8), slot 6 is orthogonal to every B slot; slot 0 is [CLS]
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[2], e[2], 0.8 * e[3] + 0.6 * e[1], e[3], -e[0], e[1]])[None]
    for threshold, expected in ((0.9, [False, True, False, False]), (0.7, [False, True, True, False]),
                                (None, [False, True, True, True])):
        m = bipartite_soft_matching(metric, 3, threshold=threshold)
        assert m.merged[0].tolist() == expected, threshold
    assert bipartite_soft_matching(metric, 1, threshold=0.7).merged[0].tolist() == [False, True, False, False]
