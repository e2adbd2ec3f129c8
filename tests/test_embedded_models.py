"""The larger embedded models: Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M, whose GGUF files ship in parts
across PyPI packages; `load_model` joins the parts, checks the joined file's sha256 and converts it once.
Each test skips, naming the command, when the model's packages are not installed."""

import pytest
import torch

from trimformer import ModelLoadError, load_model, stats, trim, untrim
from trimformer.loading import EMBEDDED_MODELS, EmbeddedModel, _joined_gguf, embedded_installed

CASES = [
    # name, class, layers, greedy continuation of "def fib(n):" (8 tokens)
    ("qwen2.5-coder-0.5b", "Qwen2ForCausalLM", 24, "\n    if n <= 1:\n"),
    ("gemma-3-270m", "Gemma3ForCausalLM", 18, "\n    if n == 0:"),
]


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def embedded(request):
    """(case, model, tokenizer): each embedded model loaded once for this module."""
    name = request.param[0]
    if not embedded_installed(name):
        pytest.skip(f"{name} is not installed: {EMBEDDED_MODELS[name].install}")
    model, tokenizer = load_model(name)
    yield request.param, model, tokenizer
    del model


@pytest.mark.slow
def test_embedded_model_loads_and_answers(embedded):
    (name, cls, layers, continuation), model, tokenizer = embedded
    assert type(model).__name__ == cls and model.config.num_hidden_layers == layers
    ids = tokenizer("def fib(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == continuation


@pytest.mark.slow
def test_nothing_pruned_equals_the_unpatched_model(embedded):
    """keep=1.0 at every layer of the schedule: the same logits and greedy tokens as the stock model, on a
    prompt longer than Gemma 3's 512-token sliding window, decoding on past it."""
    _, model, tokenizer = embedded
    torch.set_num_threads(2)
    ids = torch.randint(100, 5000, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits[0, -64:]
        greedy = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        trim(model, method="lazy", keep=1.0)
        try:
            logits = model(ids).logits[0, -64:]
            trimmed_greedy = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            pruned = None
        finally:
            untrim(model)
        trim(model, method="lazy", keep=0.5)
        try:
            pruned = model.generate(ids, max_new_tokens=4, do_sample=False)
            kept = stats(model)["kept_fraction"]
        finally:
            untrim(model)
        torch.set_num_threads(1)
    assert (logits - reference).abs().max().item() < 1e-3
    assert torch.equal(trimmed_greedy, greedy)
    assert pruned.shape[1] > ids.shape[1] and kept < 0.8     # and it prunes


def test_parts_that_do_not_join_to_the_recorded_hash_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMFORMER_CACHE", str(tmp_path / "cache"))
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(b"not a model %d" % i)
    entry = EmbeddedModel(parts=(("a", "x"), ("b", "y")), install="pip install the-parts", hub_id="x/y",
                          gguf_name="m.gguf", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="join to sha256 .*expected 0000.*reinstall them with: pip install the-parts"):
        _joined_gguf(entry, parts)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []        # no partial file left behind
