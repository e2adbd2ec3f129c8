"""SDTP stage 2 and inference: the ranking loss, training, checkpoints, model checks, pruning with "sdtp"."""

from __future__ import annotations

import json
import math

import pytest
import torch

import trimformer
from conftest import expected_counts, make_model, make_prompt, trim_state
from test_sdtp_saliency import CharTokenizer
from trimformer.errors import ConfigError
from trimformer.pruners.sdtp import PrunerConfig, SaliencyPruner, model_signature
from trimformer_lab.train.pruner import TrainOptions, normalise_saliency, ranking_loss, train_pruner
from trimformer_lab.train.saliency import run_saliency

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 12


@pytest.fixture(scope="module")
def saliency_dir(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdtp")
    (root / "text.txt").write_text(TEXT)
    model = make_model("llama", seed=0)
    out = root / "sal"
    run_saliency(model, CharTokenizer(), out, "tiny", sources=[root / "text.txt"], sequences=6, max_length=160,
                 tail=24, hidden_layers=[1, 3], progress=False)
    return out


def test_ranking_loss_hand_made_example():
    p = torch.tensor([2.0, 1.0, 0.0])
    s = torch.tensor([3.0, 1.0, 2.0])
    i, j = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 2])
    # signs +1, -1, +1; p_i - p_j = 1, 1, 2
    expected = math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log1p(math.exp(-2))
    assert ranking_loss(p, s, i, j).item() == pytest.approx(expected, rel=1e-6)
    assert ranking_loss(p, s, i, j, reduction="mean").item() == pytest.approx(expected / 3, rel=1e-6)
    # a tie carries no order: left out
    assert ranking_loss(p, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0]), torch.tensor([1])).item() == 0.0


def test_normalised_saliency_is_standardised_log():
    s = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    z = normalise_saliency(s, torch.tensor([True, True, True, True]))
    assert z.mean().abs() < 1e-5 and (z.std() - 1).abs() < 1e-5
    assert torch.all(z[0, 1:] > z[0, :-1])


def test_training_lowers_the_loss_and_is_deterministic(saliency_dir, tmp_path):
    opts = dict(epochs=6, pairs=512, hidden=16, lr=3e-3, val_fraction=0.0)
    pruner, history = train_pruner(saliency_dir, tmp_path / "a", TrainOptions(**opts), progress=False)
    losses = [e["loss"] for e in history.epochs]
    assert losses[-1] < losses[0], losses
    assert pruner.layers == [1, 3] and pruner.config.hidden == 16
    again, _ = train_pruner(saliency_dir, tmp_path / "b", TrainOptions(**opts), progress=False)
    for key, value in pruner.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_training_resumes_to_the_same_result(saliency_dir, tmp_path):
    opts = dict(pairs=256, hidden=8, val_fraction=0.34, seed=3)
    full, hist = train_pruner(saliency_dir, tmp_path / "full", TrainOptions(epochs=4, **opts), progress=False)
    train_pruner(saliency_dir, tmp_path / "part", TrainOptions(epochs=2, **opts), progress=False)
    resumed, hist2 = train_pruner(saliency_dir, tmp_path / "part", TrainOptions(epochs=4, **opts), progress=False)
    assert [e["epoch"] for e in hist2.epochs] == [0, 1, 2, 3]
    assert "val" in hist2.epochs[-1]
    for key, value in full.state_dict().items():
        torch.testing.assert_close(value, resumed.state_dict()[key], rtol=0, atol=0)


def test_save_load_round_trip_gives_identical_scores(saliency_dir, tmp_path):
    pruner, _ = train_pruner(saliency_dir, tmp_path / "p", TrainOptions(epochs=1, pairs=64, hidden=8), progress=False)
    loaded = SaliencyPruner.load(tmp_path / "p.safetensors")
    assert loaded.config.layers == [1, 3] and loaded.config.signature == pruner.config.signature
    hidden = torch.randn(2, 50, 64)
    for layer in (1, 3):
        assert torch.equal(pruner(hidden, layer), loaded(hidden, layer))
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["signature"] == {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64}


def _random_pruner(path, signature, layers, hidden=8):
    torch.manual_seed(0)
    pruner = SaliencyPruner(PrunerConfig(signature=signature, layers=layers, hidden=hidden))
    pruner.save(path)
    return path


def test_pruner_for_another_model_raises_a_clear_error(tmp_path):
    model = make_model("llama")
    other = dict(model_signature(model.config), num_hidden_layers=30, hidden_size=576)
    path = _random_pruner(tmp_path / "other", other, [1, 3])
    with pytest.raises(ConfigError, match="trained for llama with 30 layers, hidden size 576"):
        trimformer.trim(model, method="sdtp", pruner=str(path), layers=[1, 3])
    assert not trimformer.is_trimmed(model)
    ok = _random_pruner(tmp_path / "mine", model_signature(model.config), [1, 3])
    with pytest.raises(ConfigError, match=r"MLPs only for layers \[1, 3\]"):
        trimformer.trim(model, method="sdtp", pruner=str(ok), layers=[1, 2])
    with pytest.raises(ConfigError, match="no SDTP pruner"):
        trimformer.trim(model, method="sdtp", pruner=str(tmp_path / "nothing"), layers=[1])
    with pytest.raises(ConfigError, match="needs a pruner checkpoint"):
        trimformer.trim(model, method="sdtp", layers=[1])    # no pruner ships for the tiny model


@pytest.mark.parametrize("schedule", [{1: 0.5, 3: 0.5}, {1: 0.7}, {3: 0.25}])
def test_sdtp_prunes_exactly_the_plan_counts(tmp_path, schedule):
    model = make_model("llama")
    path = _random_pruner(tmp_path / "p", model_signature(model.config), [1, 3])
    trimformer.trim(model, method="sdtp", pruner=str(path), schedule=schedule)
    ids = make_prompt(120, seed=1)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    protected = 4 + 16
    assert trimformer.stats(model)["kept_tokens_per_layer"] == expected_counts(120, schedule, 6, protected)
    state = trim_state(out)
    assert sorted(state.aux) == sorted(schedule)
    trimformer.untrim(model)


def test_sdtp_keeps_the_tokens_its_scores_rank_highest(tmp_path):
    """The learned scores decide the keep set: a pruner whose score is one hidden dimension keeps the
    tokens with the largest values of it (span pooling off)."""
    model = make_model("llama")
    sig = model_signature(model.config)
    path = _random_pruner(tmp_path / "p", sig, [2])
    pruner = SaliencyPruner.load(path)
    stage = pruner.stages["2"]
    with torch.no_grad():
        stage.fc1.weight.zero_()
        stage.fc1.bias.fill_(1.0)
        stage.fc1.weight[0, 5] = 1.0          # score = gelu(h[5] + 1) * 1: monotone in h[5] for h[5] > -1
        stage.fc2.weight.zero_()
        stage.fc2.weight[0, 0] = 1.0
        stage.fc2.bias.zero_()
        stage.std.fill_(100.0)                 # keep the GELU argument in its monotone range
    pruner.save(path)
    ids = make_prompt(80, seed=2)
    with torch.inference_mode():
        h2 = model(ids, output_hidden_states=True).hidden_states[3][0, :, 5]
    trimformer.trim(model, method="sdtp", pruner=str(path), schedule={2: 0.5}, span=1, revive=False)
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    kept = set(trim_state(out).slots[3].positions[0].tolist())
    free = [t for t in range(4, 80 - 16)]
    n_free = 40 - 20
    expected = set(range(4)) | set(range(64, 80)) | set(sorted(free, key=lambda t: -float(h2[t]))[:n_free])
    assert kept == expected
    trimformer.untrim(model)


def test_training_on_a_subset_of_sources(saliency_dir, tmp_path):
    pruner, _ = train_pruner(saliency_dir, tmp_path / "s", TrainOptions(epochs=1, pairs=64, hidden=8, val_fraction=0,
                                                                       sources=["text.txt"]), progress=False)
    assert pruner.config.training["sequences"] == 6 and pruner.config.training["sources"] == ["text.txt"]
    with pytest.raises(ConfigError, match=r"its sources: \['text.txt'\]"):
        train_pruner(saliency_dir, tmp_path / "t", TrainOptions(epochs=1, sources=["longbench"]), progress=False)


def test_shipped_pruner_for_smollm2_is_the_default_and_small():
    from transformers import LlamaConfig

    from trimformer.pruners.sdtp import default_pruner_path, shipped_pruners

    assert "smollm2-135m" in shipped_pruners()
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    path = default_pruner_path(config)
    assert path.name == "smollm2-135m.safetensors" and path.stat().st_size < 2_000_000
    pruner = SaliencyPruner.load(path)
    pruner.check_model(config)
    pruner.check_plan({7: 0.4, 14: 0.5, 18: 0.5, 23: 0.5})    # the SmolLM2 preset schedule
    pruner.check_plan({4: 0.5, 8: 0.7})                        # the ~35%-by-the-last-layer schedule
    scores = pruner(torch.randn(1, 10, 576), 4)
    assert scores.shape == (1, 10) and torch.isfinite(scores).all()
