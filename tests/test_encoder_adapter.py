"""Encoder adapter (BERT, ViT, DeiT, CLIP vision): exactness, padding, untrim, errors, stats, adaptive."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

import trimformer
from trimformer import ConfigError, InputError, TrimformerError, UnsupportedModelError, stats, trim, untrim

torch.set_num_threads(1)
VISION = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=4)


def bert(cls=BertModel, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    config._attn_implementation = attn
    return cls(config).eval()


def vision(name, attn="sdpa", seed=0):
    torch.manual_seed(seed)
    if name == "vit":
        config, cls = ViTConfig(**VISION, num_labels=5), ViTForImageClassification
    elif name == "deit":
        config, cls = DeiTConfig(**VISION, num_labels=5), DeiTForImageClassificationWithTeacher
    else:
        config, cls = CLIPVisionConfig(**VISION), CLIPVisionModel
    config._attn_implementation = attn
    return cls(config).eval()


def text_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 14), generator=g)
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def pixels(seed=0, batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs(model, **inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [v for v in (getattr(out, k, None) for k in ("last_hidden_state", "pooler_output", "logits"))
            if v is not None]


def max_diff(a, b, mask=None):
    """Largest difference; with a (B, T) mask, the padding positions of (B, T, D) outputs are left out
    (their outputs mean nothing: a trimmed encoder gives zeros there)."""
    out = 0.0
    for x, y in zip(a, b):
        if mask is not None and x.dim() == 3:
            x, y = x[mask.bool()], y[mask.bool()]
        out = max(out, float((x - y).abs().max()))
    return out


# ---- nothing merged or dropped: the model's own outputs --------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("options", [dict(method="tome", r=0), dict(method="tome", r=0, prop_attn=False),
                                     dict(method="cls_attention", keep=1.0, layers=[0, 2]),
                                     dict(method="random", keep=1.0)])
def test_bert_nothing_reduced_is_exact(attn, options):
    model = bert(attn=attn)
    ids, mask = text_batch()
    ref = outputs(model, input_ids=ids, attention_mask=mask)
    trim(model, **options)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref, mask) < 1e-4
    assert stats(model)["kept_fraction"] == 1.0


@pytest.mark.parametrize("name", ["vit", "deit", "clip"])
@pytest.mark.parametrize("options", [dict(method="tome", r=0), dict(method="cls_attention", keep=1.0)])
def test_vision_nothing_reduced_is_exact(name, options):
    model = vision(name)
    x = pixels()
    ref = outputs(model, pixel_values=x)
    trim(model, **options)
    assert max_diff(outputs(model, pixel_values=x), ref) < 1e-4


def test_sequence_classification_head_and_untrim_exact():
    model = bert(BertForSequenceClassification)
    ids, mask = text_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    ref = outputs(model, input_ids=ids, attention_mask=mask)
    trim(model, method="tome", r=3)
    merged = outputs(model, input_ids=ids, attention_mask=mask)
    assert merged[0].shape == ref[0].shape and stats(model)["merged_per_layer"][0] > 0
    untrim(model)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref) == 0.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == attn
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not trimformer.is_trimmed(model)


@pytest.mark.parametrize("name", ["vit", "deit", "clip"])
def test_vision_merging_and_untrim(name):
    model = vision(name)
    x = pixels()
    ref = outputs(model, pixel_values=x)
    trim(model, method="tome", r=6, trace_source=True)
    out = outputs(model, pixel_values=x)
    s = stats(model)
    protected = 2 if name == "deit" else 1
    n = 64 + protected
    assert s["kept_tokens_per_layer"][0] == 2 * n and s["mlp_tokens_per_layer"][0] == 2 * (n - 6)
    assert s["flop_ratio"] > 1.2 and 0 < s["kept_fraction"] < 1
    assert out[0].shape == ref[0].shape
    owner = model._trimformer_patch.state.owner
    for p in range(protected):   # [CLS] (and distillation) alone in their slot, at their place
        assert torch.equal(owner[:, p], torch.full((2,), p))
        assert int((owner == p).sum()) == 2
    untrim(model)
    assert max_diff(outputs(model, pixel_values=x), ref) == 0.0


# ---- padded batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(method="tome", r=2), dict(method="tome", r=[3, 1, 0, 2], prop_attn=False),
                                     dict(method="cls_attention", keep=0.5, layers=[0, 1]),
                                     dict(method="tome", reduction_ratio=0.3),
                                     dict(method="tome", reduction_ratio=0.3, adaptive=True),
                                     dict(method="tome", adaptive=True, adaptive_mode="similarity", merge_threshold=0.2),
                                     dict(method="cls_attention", keep=0.7, layers=[0, 2], adaptive=True,
                                          adaptive_mode="mass")])
def test_padded_rows_match_rows_alone_and_keep_cls(options):
    model = bert()
    ids, mask = text_batch()
    trim(model, **options)
    batch = outputs(model, input_ids=ids, attention_mask=mask)
    owner = model._trimformer_patch.state.owner
    assert torch.all(owner[:, 0] == 0)                           # [CLS] kept, alone, at slot 0
    assert torch.all((owner == 0).sum(-1) == 1)
    lengths = mask.sum(-1)
    assert torch.all(owner[mask == 0] == -1)                      # padding never owned by a slot
    for row in range(3):
        n = int(lengths[row])
        alone = outputs(model, input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n])
        assert float((alone[0][0] - batch[0][row, :n]).abs().max()) < 1e-4
        assert float((alone[1][0] - batch[1][row]).abs().max()) < 1e-4


def duplicate_tokens():
    """A BERT without position embeddings and a padded batch of paired equal tokens: (model, ids, mask,
    its unpatched outputs). Equal tokens then have equal states in every layer."""
    model = bert()
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    ids = torch.tensor([[1, 5, 5, 7, 7, 9, 9, 11, 11, 2], [1, 5, 5, 8, 8, 2, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    return model, ids, mask, outputs(model, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("metric", ["keys", "hidden"])
def test_merging_duplicate_tokens_is_exact_and_pools_to_the_full_embedding(metric):
    # Without position embeddings, equal tokens have equal states in every layer; merging each pair at layer 0
    # and counting it twice in attention (proportional attention) must then change nothing: not the per-token
    # outputs, not the mean-pooled sentence embedding (padding excluded). Without proportional attention the
    # merged tokens lose half their weight, and the outputs change.
    from trimformer_lab.embedding import mean_pool

    model, ids, mask, ref = duplicate_tokens()
    trim(model, method="tome", r=[4, 0, 0, 0], merge_metric=metric)
    out = outputs(model, input_ids=ids, attention_mask=mask)
    assert stats(model)["merged_per_layer"][0] == 4 + 2
    assert max_diff(out, ref, mask) < 1e-4
    assert torch.allclose(mean_pool(out[0], mask), mean_pool(ref[0], mask), atol=1e-5)
    trim(model, method="tome", r=[4, 0, 0, 0], merge_metric=metric, prop_attn=False)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref, mask) > 1e-3


def test_similarity_mode_merges_exactly_the_pairs_alike_enough():
    # adaptive_mode "similarity": every matched pair at least merge_threshold alike merges, so the count
    # depends on the input: here the 4 + 2 equal pairs at layer 0 and nothing after; the outputs stay exact
    model, ids, mask, ref = duplicate_tokens()
    trim(model, method="tome", adaptive=True, adaptive_mode="similarity", merge_threshold=0.9999)
    out = outputs(model, input_ids=ids, attention_mask=mask)
    s = stats(model)
    assert s["merged_per_layer"] == [6, 0, 0, 0]
    assert s["final_tokens"] == [6, 4]                              # 10 - 4 and 6 - 2 real tokens per row
    assert max_diff(out, ref, mask) < 1e-4
    trim(model, method="tome", r=1, adaptive=True, adaptive_mode="similarity", merge_threshold=0.9999)
    outputs(model, input_ids=ids, attention_mask=mask)
    assert stats(model)["merged_per_layer"][0] == 2                 # r caps it: 1 per row
    model, (plain, plain_mask) = bert(), text_batch()              # with position embeddings: no two alike
    reference = outputs(model, input_ids=plain, attention_mask=plain_mask)
    trim(model, method="tome", adaptive=True, adaptive_mode="similarity", merge_threshold=0.99)
    assert max_diff(outputs(model, input_ids=plain, attention_mask=plain_mask), reference, plain_mask) < 1e-4
    assert stats(model)["kept_fraction"] == 1.0
    with pytest.raises(ConfigError, match="merge_threshold"):
        trim(model, method="tome", adaptive=True, adaptive_mode="similarity", merge_threshold=1.5)
    with pytest.raises(ConfigError, match="similarity"):
        trim(model, method="cls_attention", keep=0.5, adaptive=True, adaptive_mode="similarity")


def test_text_merges_by_hidden_states_unless_told_otherwise():
    model = bert()
    ids, mask = text_batch()
    trim(model, method="tome", r=2)
    assert model._trimformer_patch.metric == "hidden"
    trim(model, method="tome", r=2, merge_metric="keys")
    assert model._trimformer_patch.metric == "keys"
    vit = vision("vit")
    trim(vit, method="tome", r=2)
    assert vit._trimformer_patch.metric == "keys"                  # ToMe's choice on images
    with pytest.raises(ConfigError, match="merge_metric"):
        trim(model, method="tome", r=2, merge_metric="values")


def test_dropped_tokens_keep_their_hidden_state_and_stats_count_them():
    model = bert()
    ids, mask = text_batch()
    trim(model, method="cls_attention", keep=0.5, layers=[1])
    outputs(model, input_ids=ids, attention_mask=mask)
    s = stats(model)
    assert s["dropped_per_layer"][1] == sum(int(n) - -(-int(n) // 2) for n in mask.sum(-1))
    assert s["kept_tokens_per_layer"][:2] == [int(mask.sum())] * 2
    kept = model._trimformer_patch.state.kept
    assert torch.all(kept[:, 0]) and int(kept[mask.bool()].sum()) == sum(-(-int(n) // 2) for n in mask.sum(-1))


def test_adaptive_keeps_a_number_that_depends_on_the_input():
    model = vision("vit")
    x = pixels(batch=4)
    x[1] = 0.0                   # a flat image
    trim(model, method="tome", r=4, adaptive=True)
    outputs(model, pixel_values=x)
    final = stats(model)["final_tokens"]
    assert len(set(final)) > 1 and max(final) <= 65 - 4 * 4


def test_decreasing_schedule_and_reduction_ratio():
    model = vision("vit")
    trim(model, method="tome", r=4, r_schedule="decreasing")
    outputs(model, pixel_values=pixels())
    assert stats(model)["schedule"]["r"] == [8, 5, 2, 0]
    trim(model, {"method": "tome", "reduction_ratio": 0.3})
    outputs(model, pixel_values=pixels())
    s = stats(model)
    assert 0.6 < s["kept_fraction"] < 0.8


# ---- errors -----------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    model = bert()
    ids, mask = text_batch()
    trim(model, method="tome", r=2)
    left = mask.flip(-1)
    with pytest.raises(InputError, match="right-padded"):
        model(input_ids=ids, attention_mask=left)
    with pytest.raises(InputError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    untrim(model)
    with pytest.raises(TrimformerError, match="not trimmed"):
        stats(model)
    trim(model, method="tome", r=1)
    with pytest.raises(TrimformerError, match="no forward"):
        stats(model)
    with pytest.raises(ConfigError, match="r must be"):
        trim(bert(), method="tome", r=-1)
    with pytest.raises(ConfigError, match="either r"):
        trim(bert(), method="tome", r=2, keep=0.5)
    with pytest.raises(ConfigError, match="adaptive_mode"):
        trim(bert(), method="tome", adaptive=True, adaptive_mode="sometimes")
    for method in ("runtime", "lazy", "lazy+runtime"):
        with pytest.raises(UnsupportedModelError, match="runs on decoders"):
            trim(bert(), method=method)
    with pytest.raises(UnsupportedModelError, match="attention implementation"):
        trim(bert(attn="flex_attention"), method="tome", r=1)
    fresh = bert()
    with pytest.raises(UnsupportedModelError):
        trim(torch.nn.Linear(2, 2), method="tome")
    assert not trimformer.is_trimmed(fresh)


def test_tome_on_a_decoder_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ConfigError, match="runs on encoders"):
        trim(model, method="tome")
    assert not trimformer.is_trimmed(model)


# ---- tome_mode="merge_unmerge" (ToMe for Stable Diffusion) ---------------------------------------------
UNMERGE_VARIANTS = [dict(), dict(unmerge_attention="queries"), dict(unmerge_attention="keys_values"),
                    dict(unmerge_attention="none"), dict(unmerge_mlp=False)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", UNMERGE_VARIANTS)
def test_merge_unmerge_nothing_merged_is_exact(attn, variant):
    model = bert(attn=attn)
    ids, mask = text_batch()
    ref = outputs(model, input_ids=ids, attention_mask=mask)
    trim(model, method="tome", tome_mode="merge_unmerge", r=0, **variant)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref, mask) < 1e-5
    assert stats(model)["kept_fraction"] == 1.0 and stats(model)["merged_per_layer"] == [0] * 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", UNMERGE_VARIANTS)
def test_merge_unmerge_row_that_merges_nothing_is_exact(attn, variant):
    # per-row schedules from keep: a 3-token row ([CLS] x [SEP]) cannot merge, the others do; that row goes
    # through the merge-unmerge code (own attention call, masks, unmerge) and must equal the model's output
    model = bert(attn=attn)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 2], [1, 7, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    ref = outputs(model, input_ids=ids, attention_mask=mask)
    trim(model, method="tome", tome_mode="merge_unmerge", reduction_ratio=0.3, **variant)
    out = outputs(model, input_ids=ids, attention_mask=mask)
    s = stats(model)
    assert sum(s["merged_per_layer"]) > 0
    r = s["schedule"]["r_attention" if variant.get("unmerge_attention", "qkv") != "none" else "r_mlp"]
    assert all(layer[1] == 0 for layer in r) and any(layer[0] > 0 for layer in r)
    assert float((out[0][1, :3] - ref[0][1, :3]).abs().max()) < 1e-5
    assert float((out[0][0] - ref[0][0]).abs().max()) > 1e-4          # the long row did merge


@pytest.mark.parametrize("variant", UNMERGE_VARIANTS)
def test_merge_unmerge_of_duplicate_tokens_is_exact(variant):
    # as in the merge mode: without position embeddings equal tokens have equal states in every layer, so
    # merging each pair for a block's computation and unmerging its output changes nothing
    model, ids, mask, ref = duplicate_tokens()
    trim(model, method="tome", tome_mode="merge_unmerge", r=4, **variant)
    out = outputs(model, input_ids=ids, attention_mask=mask)
    s = stats(model)
    blocks = (variant.get("unmerge_attention", "qkv") != "none") + variant.get("unmerge_mlp", True)
    assert s["merged_per_layer"] == [blocks * (4 + 2)] * 4
    assert max_diff(out, ref, mask) < 1e-4


def test_merge_unmerge_stats_count_the_work_done():
    model = bert()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[:, -1] = 1, 2
    n, layers = 12, 4
    expected = {   # (query-side, key/value-side, MLP) tokens per row and layer with r=3
        "qkv": (n - 3, n - 3, n - 3), "queries": (n - 3, n, n - 3), "keys_values": (n, n - 3, n - 3),
        "none": (n, n, n - 3)}
    for mode, (q, kv, mlp) in expected.items():
        trim(model, method="tome", tome_mode="merge_unmerge", r=3, unmerge_attention=mode)
        out = outputs(model, input_ids=ids)
        s = stats(model)
        assert out[0].shape == (2, n, 32)
        assert s["kept_tokens_per_layer"] == [2 * q] * layers
        assert s["kv_tokens_per_layer"] == [2 * kv] * layers
        assert s["mlp_tokens_per_layer"] == [2 * mlp] * layers
        assert s["kept_fraction"] == pytest.approx(((q + kv) / 2 + mlp) / (2 * n))
        assert s["merge_flops"] > 0 and s["flops_trimmed"] < s["flops_full"]
        d, ff = 32, 64
        flops = layers * 2 * (2 * 2 * d * d * (q + kv) + 4 * d * q * kv + 2 * 2 * d * ff * mlp)
        assert s["flops_trimmed"] == int(flops) + s["merge_flops"]
    # from keep: each row by its own length, the realised share at least the asked 0.7
    trim(model, method="tome", tome_mode="merge_unmerge", reduction_ratio=0.3)
    outputs(model, input_ids=ids)
    assert 0.7 <= stats(model)["kept_fraction"] < 0.75
    untrim(model)


def test_merge_unmerge_untrim_is_exact():
    model = bert()
    ids, mask = text_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = outputs(model, input_ids=ids, attention_mask=mask)
    trim(model, method="tome", tome_mode="merge_unmerge", r=3)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref, mask) > 1e-4
    untrim(model)
    assert max_diff(outputs(model, input_ids=ids, attention_mask=mask), ref) == 0.0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_merge_unmerge_bad_options_raise_clear_errors():
    model = bert()
    with pytest.raises(ConfigError, match="tome_mode must be one of"):
        trim(model, method="tome", r=2, tome_mode="unmerge")
    with pytest.raises(ConfigError, match="unmerge_attention must be one of"):
        trim(model, method="tome", r=2, tome_mode="merge_unmerge", unmerge_attention="keys")
    with pytest.raises(ConfigError, match="unmerge_mlp must be True or False"):
        trim(model, method="tome", r=2, tome_mode="merge_unmerge", unmerge_mlp="yes")
    with pytest.raises(ConfigError, match="merges nothing"):
        trim(model, method="tome", r=2, tome_mode="merge_unmerge", unmerge_attention="none", unmerge_mlp=False)
    with pytest.raises(ConfigError, match="applies to method 'tome'"):
        trim(model, method="cls_attention", keep=0.5, tome_mode="merge_unmerge")
    with pytest.raises(ConfigError, match="adaptive"):
        trim(model, method="tome", r=2, tome_mode="merge_unmerge", adaptive=True)
    with pytest.raises(ConfigError, match="merge_metric"):
        trim(model, method="tome", r=2, tome_mode="merge_unmerge", merge_metric="keys")
    with pytest.raises(UnsupportedModelError, match="BERT-family"):
        trim(vision("vit"), method="tome", r=2, tome_mode="merge_unmerge")
    assert not trimformer.is_trimmed(model)

