"""The larger embedded models: Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M, whose GGUF files ship in parts
across PyPI packages; `load_model` joins the parts, checks the joined file's sha256 and converts it once.
Each test skips, naming the command, when the model's packages are not installed."""

import pytest
import torch

from trimformer import ModelLoadError, load_model
from trimformer.loading import EMBEDDED_MODELS, EmbeddedModel, _joined_gguf, embedded_installed

CASES = [
    # name, class, layers, greedy continuation of "def fib(n):" (8 tokens)
    ("qwen2.5-coder-0.5b", "Qwen2ForCausalLM", 24, "\n    if n <= 1:\n"),
    ("gemma-3-270m", "Gemma3ForCausalLM", 18, "\n    if n == 0:"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, cls, layers, continuation", CASES)
def test_embedded_model_loads_and_answers(name, cls, layers, continuation):
    if not embedded_installed(name):
        pytest.skip(f"{name} is not installed: {EMBEDDED_MODELS[name].install}")
    model, tokenizer = load_model(name)
    assert type(model).__name__ == cls and model.config.num_hidden_layers == layers
    ids = tokenizer("def fib(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]) == continuation
    del model


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
