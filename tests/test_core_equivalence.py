"""A schedule that prunes nothing must leave the model's outputs unchanged; untrim must restore it exactly."""

from __future__ import annotations

import pytest
import torch

import trimformer
from conftest import assert_unpatched, left_pad, make_model, make_prompt

NO_PRUNING = [
    pytest.param(dict(method="lazy", keep=1.0, layers=(1, 3)), id="keep=1.0"),
    pytest.param(dict(method="lazy", schedule={1: 1.0, 3: 1.0, 4: 1.0}), id="schedule-1.0"),
    pytest.param(dict(method="lazy", keep=1.0), id="keep=1.0-default-layers"),
]


FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "gemma3", "mistral-sliding", "qwen2-sliding"]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("options", NO_PRUNING)
def test_no_pruning_prefill_logits_equal(arch, options):
    model = make_model(arch)
    ids = make_prompt(60, seed=1)
    with torch.no_grad():
        reference = model(ids).logits
        trimformer.trim(model, **options)
        out = model(ids)
    assert out.logits.shape == reference.shape
    assert (out.logits - reference).abs().max().item() < 1e-4
    stats = trimformer.stats(model)
    assert stats["kept_tokens_per_layer"] == [60] * 6
    assert stats["kept_fraction"] == 1.0
    assert stats["flop_ratio"] == pytest.approx(1.0)
    trimformer.untrim(model)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("options", NO_PRUNING[:2])
def test_no_pruning_greedy_generation_identical(arch, options):
    model = make_model(arch)
    ids = make_prompt(40, seed=2)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        trimformer.trim(model, **options)
        out = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert out.shape == reference.shape == (1, 72)
    assert torch.equal(out, reference)
    assert trimformer.stats(model)["decode_steps"] == 31
    trimformer.untrim(model)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_no_pruning_batch_with_padding_equal(arch):
    model = make_model(arch)
    rows = [make_prompt(50, seed=3)[0], make_prompt(35, seed=4)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        trimformer.trim(model, method="lazy", keep=1.0, layers=(1, 3))
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (out[real] - reference[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", FAMILIES)
def test_untrim_restores_bit_identical(arch):
    model = make_model(arch)
    ids = make_prompt(80, seed=5)
    with torch.no_grad():
        before = model(ids).logits
        trimformer.trim(model, method="lazy", keep=0.5, layers=(1, 3))
        assert trimformer.is_trimmed(model)
        assert model.config._attn_implementation != "sdpa"
        trimmed = model(ids).logits
        assert not torch.allclose(trimmed[0, :-16], before[0, :-16])  # it really pruned
        trimformer.untrim(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert_unpatched(model, "sdpa")


def test_untrim_restores_eager_implementation():
    model = make_model("llama", attn="eager")
    ids = make_prompt(40, seed=6)
    with torch.no_grad():
        before = model(ids).logits
        trimformer.trim(model, method="random", keep=0.5, layers=(2,))
        model(ids)
        trimformer.untrim(model)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert_unpatched(model, "eager")


def test_untrim_untrimmed_model_raises(llama):
    with pytest.raises(trimformer.TrimformerError, match="not trimmed"):
        trimformer.untrim(llama)
    with pytest.raises(trimformer.TrimformerError, match="not trimmed"):
        trimformer.stats(llama)


@pytest.mark.parametrize("options", NO_PRUNING[:2])
def test_no_pruning_prefill_logits_equal_eager(options):
    model = make_model("llama", attn="eager")
    ids = make_prompt(60, seed=1)
    with torch.no_grad():
        reference = model(ids).logits
        trimformer.trim(model, **options)
        out = model(ids).logits
    assert (out - reference).abs().max().item() < 1e-4


def test_trimmed_model_does_not_depend_on_attention_kernel():
    ids = make_prompt(100, seed=8)
    logits = {}
    for attn in ("sdpa", "eager"):
        model = make_model("llama", attn=attn)
        trimformer.trim(model, method="lazy", keep=0.5, layers=(1, 3))
        with torch.no_grad():
            logits[attn] = model(ids).logits[0, -1]
    assert (logits["sdpa"] - logits["eager"]).abs().max().item() < 1e-4


def test_eager_batch_with_padding_matches_untrimmed():
    model = make_model("llama", attn="eager")
    rows = [make_prompt(50, seed=3)[0], make_prompt(35, seed=4)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        trimformer.trim(model, method="lazy", keep=1.0, layers=(1, 3))
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (out[real] - reference[real]).abs().max().item() < 1e-4


def test_input_forms_agree_when_trimmed(llama):
    """input_ids, inputs_embeds, no cache, explicit positions, an all-ones mask and the base model called
    positionally all give the same trimmed result."""
    ids = make_prompt(100, seed=3)
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    with torch.no_grad():
        reference = llama(ids).logits
        variants = {
            "no cache": llama(ids, use_cache=False).logits,
            "inputs_embeds": llama(inputs_embeds=llama.model.embed_tokens(ids)).logits,
            "base positional": llama.lm_head(llama.model(ids).last_hidden_state),
            "position_ids": llama(ids, position_ids=torch.arange(100)[None]).logits,
            "ones mask": llama(ids, attention_mask=torch.ones(1, 100, dtype=torch.long)).logits,
        }
    for name, logits in variants.items():
        assert (logits - reference).abs().max().item() < 1e-5, name
    assert trimformer.stats(llama)["kept_tokens_per_layer"] == [100, 100, 50, 50, 25, 25]
