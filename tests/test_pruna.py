"""Pruna integration: the config mapping always; the algorithm itself when pruna is installed. Encoders,
decoders and diffusers pipelines."""

import importlib.util
import os

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from trimformer import ConfigError, is_trimmed, stats
from trimformer.integrations.pruna import model_supported, trim_options

torch.set_num_threads(1)


def test_seed_config_maps_to_trim_options():
    seed = {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    assert trim_options(seed) == {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    assert trim_options({"method": "tome", "r": 8, "reduction_ratio": 0.3}) == {"method": "tome", "adaptive": False,
                                                                                "r": 8}
    assert trim_options({"method": "lazy", "options": {"keep": 0.5}})["keep"] == 0.5
    with pytest.raises(ConfigError):
        trim_options({"options": [1, 2]})


def test_methods_offered_are_the_registrys():
    from trimformer.integrations.pruna import METHODS_OFFERED
    from trimformer.registry import methods_for

    assert set(METHODS_OFFERED) == set(methods_for("encoder")) | set(methods_for("decoder")) | set(
        methods_for("diffusion"))
    assert {"tome", "tsdtp", "lazy", "runtime"} <= set(METHODS_OFFERED)


def test_model_check():
    assert model_supported(_vit())
    assert not model_supported(torch.nn.Linear(2, 2))


def test_model_check_takes_diffusers_pipelines_and_denoisers():
    pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusion]'")
    from trimformer_lab.diffusion.pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    assert model_supported(pipe) and model_supported(pipe.unet)
    assert not model_supported(pipe.vae)


needs_pruna = pytest.mark.skipif(
    importlib.util.find_spec("pruna") is None,
    reason="pruna is not installed (optional; pruna 0.3.4 pulls torch 2.14 + CUDA libraries, so it is kept out of "
           "this CPU venv): benchmarks/pruna_check.sh runs this file against it in benchmarks/.venv-pruna")


def _vit():
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=32, patch_size=8)).eval()


@pytest.fixture
def pruna_registered():  # pragma: no cover - needs pruna
    os.environ.setdefault("PRUNA_METRICS_ENABLED", "false")      # no telemetry calls from a test
    from trimformer.integrations.pruna import register

    return register()


@needs_pruna
def test_algorithm_is_a_pruna_pruner(pruna_registered):  # pragma: no cover - needs pruna
    from pruna.algorithms import AlgorithmRegistry
    from pruna.algorithms.base.pruna_base import PrunaAlgorithmBase
    from pruna.algorithms.base.tags import AlgorithmTag
    from pruna.config.smash_space import SMASH_SPACE

    from trimformer.integrations.pruna import register

    assert register() is pruna_registered                          # idempotent
    algorithm = AlgorithmRegistry["token_optimizer"]
    assert isinstance(algorithm, PrunaAlgorithmBase) and algorithm.algorithm_name == "token_optimizer"
    assert "token_optimizer" in AlgorithmRegistry.get_algorithms_by_tag(AlgorithmTag.PRUNER)
    assert "token_optimizer" in SMASH_SPACE.get_all_algorithms()
    names = {hp.name for hp in SMASH_SPACE.get_hyperparameters()}
    assert {f"token_optimizer_{n}" for n in ("method", "reduction_ratio", "adaptive", "r", "options")} <= names
    assert algorithm.model_check_fn(_vit()) and not algorithm.model_check_fn(torch.nn.Linear(2, 2))


@needs_pruna
def test_smash_config_selects_it_and_smash_applies_it(pruna_registered):  # pragma: no cover - needs pruna
    from pruna import SmashConfig, smash

    config = SmashConfig(device="cpu")
    config["token_optimizer"] = {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    assert config.get_active_algorithms() == ["token_optimizer"]
    assert config["token_optimizer_reduction_ratio"] == pytest.approx(0.3)
    assert config["token_optimizer_adaptive"] is True and config["token_optimizer_method"] == "tome"
    model = _vit()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = model(x).logits
    smashed = smash(model=model, smash_config=config)
    with torch.no_grad():
        out = smashed(x).logits
    assert out.shape == full.shape
    assert is_trimmed(model) and stats(model)["kept_fraction"] < 1.0 and stats(model)["adaptive"]

    config = SmashConfig(device="cpu")
    config.add({"token_optimizer": {"method": "tome", "r": 2, "options": {"prop_attn": False}}})
    model = _vit()
    smash(model=model, smash_config=config)(x)
    assert stats(model)["schedule"]["r"] == [2, 2] and not model._trimformer_patch.config.prop_attn


@needs_pruna
def test_smash_refuses_a_model_it_cannot_trim(pruna_registered):  # pragma: no cover - needs pruna
    from pruna import SmashConfig, smash

    config = SmashConfig(device="cpu")
    config["token_optimizer"] = {"method": "tome"}
    with pytest.raises(ValueError, match="not compatible with token_optimizer"):
        smash(model=torch.nn.Sequential(torch.nn.Linear(2, 2)), smash_config=config)


@needs_pruna
def test_smash_merges_tokens_in_a_diffusers_pipeline(pruna_registered):  # pragma: no cover - needs pruna
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    from pruna import SmashConfig, smash

    from trimformer_lab.diffusion.pipeline import sample_latents, tiny_pipeline

    pipe = tiny_pipeline()
    full = sample_latents(pipe, steps=2)
    config = SmashConfig(device="cpu")
    config["token_optimizer"] = {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    smashed = smash(model=pipe, smash_config=config)
    merged = sample_latents(smashed, steps=2)
    assert is_trimmed(pipe.unet) and stats(pipe.unet)["reduction_ratio"] == pytest.approx(0.3)
    assert stats(pipe.unet)["adaptive"] and stats(pipe.unet)["merging_blocks"] > 0
    assert merged.shape == full.shape and not torch.equal(merged, full)
