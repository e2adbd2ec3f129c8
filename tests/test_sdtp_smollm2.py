"""SDTP on the real SmolLM2-135M-Instruct with the shipped pruner (skipped without the model package)."""

from __future__ import annotations

import torch

import trimformer
from test_smollm2 import model, smollm2  # noqa: F401  (fixtures: the model, loaded once)
from trimformer_lab.evaluation.needle import found, make_needle
from trimformer.generation import greedy


@torch.inference_mode()
def test_sdtp_shipped_pruner_keeps_a_needle_at_35_percent(model):  # noqa: F811
    model, tokenizer = model
    item = make_needle(tokenizer, 2048, 0.5, seed=3)
    trimformer.trim(model, method="sdtp", schedule={4: 0.5, 8: 0.7})      # pruner=None: the shipped one
    out = greedy(model, item.input_ids, 10, tokenizer.eos_token_id)
    info = trimformer.stats(model)
    assert info["method"] == "sdtp" and info["prompt_tokens"] == [2048]
    assert info["kept_tokens_per_layer"][-1] == 717          # ceil(0.7 * ceil(0.5 * 2048)): 35% of the prompt
    assert 0.45 < info["kept_fraction"] < 0.5 and info["flop_ratio"] > 2.0
    answer = tokenizer.decode(out.tokens)
    assert found(item.answer, answer), answer
