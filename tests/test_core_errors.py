"""Bad input raises a TrimformerError that names the problem and what is accepted, and leaves the model as it was."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import trimformer
from trimformer import ConfigError, InputError, TrimConfig, TrimformerError, UnsupportedModelError
from conftest import TINY, assert_unpatched, hook_counts, left_pad, make_prompt

BAD_CONFIGS = [
    # (options, error class, regexes the message must contain: what was wrong, what is accepted)
    (dict(method="lazyy"), ConfigError, [r"unknown method 'lazyy'", r"lazy", r"random", r"static", r"truncate"]),
    (dict(method="lazy", keep=0), ConfigError, [r"keep", r"\(0, 1\]", r"got 0"]),
    (dict(method="lazy", keep=1.5), ConfigError, [r"keep", r"\(0, 1\]", r"1\.5"]),
    (dict(method="lazy", keep=-0.1), ConfigError, [r"keep", r"\(0, 1\]", r"-0\.1"]),
    (dict(method="lazy", keep=True), ConfigError, [r"keep", r"\(0, 1\]"]),
    (dict(method="lazy", schedule={99: 0.5}), ConfigError, [r"99", r"6 layers", r"0\.\.4"]),
    (dict(method="lazy", schedule={5: 0.5}), ConfigError, [r"\[5\]", r"0\.\.4"]),
    (dict(method="lazy", layers=(1, 99)), ConfigError, [r"99", r"0\.\.4"]),
    (dict(method="lazy", layers=(-1,)), ConfigError, [r"layer", r">= 0", r"-1"]),
    (dict(method="lazy", schedule={1: 0.0}), ConfigError, [r"schedule\[1\]", r"\(0, 1\]"]),
    (dict(method="lazy", schedule={}), ConfigError, [r"schedule", r"non-empty"]),
    (dict(method="lazy", span=4), ConfigError, [r"span", r"odd", r"4"]),
    (dict(method="lazy", span=0), ConfigError, [r"span", r">= 1"]),
    (dict(method="lazy", window=0), ConfigError, [r"window", r">= 1"]),
    (dict(method="lazy", protect_last=0), ConfigError, [r"protect_last", r">= 1"]),
    (dict(method="lazy", sinks=-1), ConfigError, [r"sinks", r">= 0"]),
    (dict(method="lazy", pool="median"), ConfigError, [r"pool", r"max", r"mean", r"median"]),
    (dict(method="lazy", mass=0.0), ConfigError, [r"mass", r"\(0, 1\]"]),
    (dict(method="lazy", revive_threshold=-1.0), ConfigError, [r"revive_threshold", r">= 0"]),
    (dict(method="lazy", revive_every=0), ConfigError, [r"revive_every", r">= 1"]),
    (dict(method="lazy", reduction_ratio=1.0), ConfigError, [r"reduction_ratio", r"\[0, 1\)"]),
    (dict(method="lazy", reduction_ratio=0.5, keep=0.5), ConfigError, [r"reduction_ratio", r"keep"]),
]


@pytest.mark.parametrize("options, error, patterns", BAD_CONFIGS, ids=[repr(o) for o, _, _ in BAD_CONFIGS])
def test_bad_config_raises_and_leaves_model_unpatched(llama, options, error, patterns):
    ids = make_prompt(40, seed=31)
    with torch.no_grad():
        before = llama(ids).logits
    with pytest.raises(error) as info:
        trimformer.trim(llama, **options)
    assert isinstance(info.value, TrimformerError)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    assert_unpatched(llama, "sdpa")
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)


@pytest.mark.parametrize("form", ["dict", "config", "string"])
def test_bad_config_in_every_form(llama, form):
    if form == "dict":
        call = lambda: trimformer.trim(llama, {"method": "lazy", "keep": 0})  # noqa: E731
    elif form == "config":
        call = lambda: trimformer.trim(llama, TrimConfig(method="lazy", keep=0))  # noqa: E731
    else:
        call = lambda: trimformer.trim(llama, "lazy", keep=0)  # noqa: E731
    with pytest.raises(ConfigError, match=r"keep must be a ratio in \(0, 1\]"):
        call()
    assert_unpatched(llama)


def test_bad_config_type(llama):
    with pytest.raises(ConfigError, match="TrimConfig, a dict or a method name"):
        trimformer.trim(llama, 0.5)
    assert_unpatched(llama)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def _bert():
    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("factory, name, accepted", [
    (_gpt2, "GPT2LMHeadModel", "LlamaForCausalLM"),
    (_bert, "BertModel", "LlamaForCausalLM"),
])
def test_unsupported_architecture(factory, name, accepted):
    torch.manual_seed(0)
    model = factory()
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError) as info:
        trimformer.trim(model, method="lazy", keep=0.5, layers=(0,))
    message = str(info.value)
    assert name in message
    assert accepted in message      # says what is supported
    assert not trimformer.is_trimmed(model)
    assert model.config._attn_implementation == attn
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_unsupported_model_with_llama_like_layout():
    """A model exposing model.layers but of another class is rejected by the adapter, not half-patched."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, max_position_embeddings=128)).eval()
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match="PhiForCausalLM.*LlamaForCausalLM"):
        trimformer.trim(model, method="lazy", keep=0.5, layers=(1,))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == attn
    assert not trimformer.is_trimmed(model)


@pytest.mark.parametrize("length", [5, 19, 20])
def test_short_prompt_raises_input_error_at_forward(llama, length):
    ids_ok = make_prompt(50, seed=32)
    with torch.no_grad():
        before = llama(ids_ok).logits
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3), sinks=4, protect_last=16)
    with pytest.raises(InputError) as info, torch.no_grad():
        llama(make_prompt(length, seed=33))
    message = str(info.value)
    assert f"{length} tokens" in message and "sinks=4" in message and "protect_last=16" in message
    # still usable trimmed with a longer prompt
    with torch.no_grad():
        llama(ids_ok)
    assert trimformer.stats(llama)["kept_tokens_per_layer"] == [50, 50, 25, 25, 20, 20]
    trimformer.untrim(llama)
    assert_unpatched(llama)
    with torch.no_grad():
        assert torch.equal(llama(ids_ok).logits, before)


def test_short_row_in_batch_raises(llama):
    ids, mask = left_pad([make_prompt(50, seed=1)[0], make_prompt(15, seed=2)[0]])
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    with pytest.raises(InputError, match="15 tokens"), torch.no_grad():
        llama(ids, attention_mask=mask)


def test_short_prompt_fine_with_empty_schedule(llama):
    trimformer.trim(llama, method="lazy", layers=())
    with torch.no_grad():
        llama(make_prompt(5, seed=3))
    assert trimformer.stats(llama)["kept_tokens_per_layer"] == [5] * 6


def test_four_d_mask_raises_input_error(llama):
    ids = make_prompt(40, seed=34)
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    mask4d = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    with pytest.raises(InputError) as info, torch.no_grad():
        llama(ids, attention_mask=mask4d)
    assert "2-D attention_mask" in str(info.value) and "4-D" in str(info.value)
    with torch.no_grad():
        llama(ids)                                 # still works
    trimformer.untrim(llama)
    assert_unpatched(llama)


@pytest.mark.parametrize("options", [dict(method="lazy", keep=0.5, layers=(1, 3)), dict(method="runtime", budget=0.5)],
                         ids=["lazy", "runtime"])
def test_cache_changed_outside_the_model_raises(llama, options):
    from trimformer.patch.cache_names import cache_kwargs, output_cache

    trimformer.trim(llama, **options)
    with torch.no_grad():
        out = llama(make_prompt(40, seed=35), use_cache=True)
        cache = output_cache(out)
        layer = cache.layers[2]
        kept = layer.keys.shape[-2]
        layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]     # one slot cut by hand
        with pytest.raises(InputError) as info:
            llama(make_prompt(1, seed=36), **cache_kwargs(cache), use_cache=True)
    message = str(info.value)
    assert "layer 2" in message and f"holds {kept - 1} slots" in message and f"tracked {kept}" in message
    trimformer.untrim(llama)
    assert_unpatched(llama)


def test_retrim_replaces_the_old_patch(llama):
    ids = make_prompt(100, seed=35)
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    first = hook_counts(llama)
    assert first == {"pre": 1 + 6, "post": 1 + 2}
    trimformer.trim(llama, method="static", keep=0.25, layers=(2,))
    assert hook_counts(llama) == {"pre": 1 + 6, "post": 1 + 1}
    assert llama.config._attn_implementation == "trimformer_sdpa"
    with torch.no_grad():
        llama(ids)
    stats = trimformer.stats(llama)
    assert stats["method"] == "static"
    assert stats["kept_tokens_per_layer"] == [100, 100, 100, 25, 25, 25]
    trimformer.untrim(llama)
    assert_unpatched(llama, "sdpa")


def test_failed_retrim_keeps_the_working_patch(llama):
    ids = make_prompt(100, seed=36)
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1, 3))
    with pytest.raises(ConfigError):
        trimformer.trim(llama, method="lazy", keep=2.0)
    assert trimformer.is_trimmed(llama)
    assert hook_counts(llama) == {"pre": 7, "post": 3}
    with torch.no_grad():
        llama(ids)
    assert trimformer.stats(llama)["kept_tokens_per_layer"] == [100, 100, 50, 50, 25, 25]


def test_stats_before_any_forward_raises(llama):
    trimformer.trim(llama, method="lazy", keep=0.5, layers=(1,))
    with pytest.raises(TrimformerError, match="no forward"):
        trimformer.stats(llama)


def test_layers_not_a_sequence(llama):
    with pytest.raises(ConfigError, match="layers"):
        trimformer.trim(llama, method="lazy", keep=0.5, layers=3)


def test_unknown_option_with_config_object(llama):
    with pytest.raises(ConfigError):
        trimformer.trim(llama, TrimConfig(method="lazy"), kepp=0.5)


def test_misspelled_option_is_rejected(llama):
    with pytest.raises(ConfigError, match="kepp"):
        trimformer.trim(llama, method="lazy", kepp=0.5, layers=(1,))
