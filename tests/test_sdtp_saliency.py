"""SDTP stage 1: saliency |sum_d dL/dh * h| per token and layer, checked against a direct autograd reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import left_pad, make_model, make_prompt
from trimformer.errors import InputError
from trimformer_lab.train.saliency import load_saliency_dir, run_saliency, token_saliency


def reference_saliency(model, ids, loss_mask, layer, attention_mask=None):
    """Cut the graph at `layer`'s output (a fresh leaf), rerun the plain model, differentiate the loss."""
    holder = {}

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        holder["h"] = leaf
        return leaf

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    finally:
        handle.remove()
    pred = loss_mask[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")    # (B, T-1)
    loss = ((ce * pred).sum(-1) / pred.sum(-1)).sum()
    (grad,) = torch.autograd.grad(loss, holder["h"])
    return (grad * holder["h"]).sum(-1).abs().detach()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_saliency_equals_autograd_reference(checkpointing):
    model = make_model("llama", seed=1)
    ids = make_prompt(40, seed=2)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 30:] = True
    res = token_saliency(model, ids, mask, hidden_layers=[2], checkpointing=checkpointing)
    assert res.saliency.shape == (1, 6, 40)
    for layer in range(6):
        ref = reference_saliency(model, ids, mask, layer)
        torch.testing.assert_close(res.saliency[:, layer], ref, rtol=1e-4, atol=1e-7)
    # the stored hidden state is the layer's output
    out = model(ids, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(res.hidden[2], out, rtol=1e-5, atol=1e-5)
    # backbone untouched: no parameter gradient, flags restored, eval mode kept
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_saliency_batched_rows_are_independent():
    model = make_model("llama", seed=3)
    rows = [make_prompt(30, seed=4)[0], make_prompt(22, seed=5)[0]]
    ids, attn = left_pad(rows)
    loss_mask = attn.bool().clone()
    res = token_saliency(model, ids, loss_mask, attention_mask=attn, checkpointing=False)
    for b, row in enumerate(rows):
        alone = token_saliency(model, row[None], checkpointing=False)
        torch.testing.assert_close(res.saliency[b, :, -len(row):], alone.saliency[0], rtol=1e-3, atol=1e-6)
        assert torch.all(res.saliency[b, :, : ids.shape[1] - len(row)] == 0)


def test_saliency_needs_a_loss_token():
    model = make_model("llama")
    ids = make_prompt(10)
    with pytest.raises(InputError):
        token_saliency(model, ids, torch.zeros_like(ids, dtype=torch.bool))


class CharTokenizer:
    """A tokenizer for the tiny models: one id per character (ids 1..127)."""

    bos_token_id = None
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 120) for c in text]}


def test_run_saliency_writes_resumable_folder(tmp_path):
    model = make_model("llama", seed=0)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    prompts = tmp_path / "qa.json"
    prompts.write_text(json.dumps([{"prompt": "Where does the fox jump? " * 5, "answer": "over the dog"}]))
    out = tmp_path / "sal"
    run_saliency(model, CharTokenizer(), out, "tiny", sources=[text, prompts], sequences=3, max_length=96,
                 tail=16, hidden_layers=[1, 3], progress=False)
    config, seqs = load_saliency_dir(out)
    assert config["sequences"] == 3 and config["hidden_layers"] == [1, 3]
    assert {s["source"].split("#")[0].split(":")[0] for s in config["items"]} == {"text.txt", "qa.json"}
    for seq in seqs:
        t = seq["input_ids"].shape[0]
        assert seq["saliency"].shape == (6, t) and seq["hidden.1"].shape == (t, 64)
        assert seq["hidden.3"].dtype == torch.float16
    # resumable: a missing shard is recomputed, the others are left as they are
    (out / "seq_00001.safetensors").unlink()
    before = (out / "seq_00000.safetensors").stat().st_mtime_ns
    run_saliency(model, CharTokenizer(), out, "tiny", sources=[text, prompts], sequences=3, max_length=96,
                 tail=16, hidden_layers=[1, 3], progress=False)
    assert (out / "seq_00001.safetensors").exists()
    assert (out / "seq_00000.safetensors").stat().st_mtime_ns == before
    _, again = load_saliency_dir(out)
    torch.testing.assert_close(again[1]["saliency"], seqs[1]["saliency"])


def test_calibration_prefers_prompt_answer_pairs(tmp_path):
    from trimformer_lab.train.data import calibration_items

    (tmp_path / "text.txt").write_text("Some plain text for chunks. " * 40)
    (tmp_path / "qa.json").write_text(json.dumps({str(k): {"origin_prompt": f"Question {k}? " * 8, "gold": [f"a{k}"]}
                                                  for k in range(5)}))
    items = calibration_items(CharTokenizer(), [tmp_path], sequences=4, max_length=128, tail=16)
    assert [it.source.split("/")[-1] for it in items] == ["qa.json:4", "qa.json:3", "qa.json:2", "qa.json:1"]
    for it in items:   # the loss covers the answer (no chat template: no end-of-turn token)
        assert len(it.input_ids) - it.loss_start == 2
    mixed = calibration_items(CharTokenizer(), [tmp_path], sequences=4, max_length=128, tail=16, text_share=0.5)
    assert sum("#" in it.source for it in mixed) == 2
    many = calibration_items(CharTokenizer(), [tmp_path], sequences=7, max_length=128, tail=16)
    assert sum(":" in it.source for it in many) == 5 and sum("#" in it.source for it in many) == 2
