"""Pruna integration: the config mapping always; the algorithm itself when pruna is installed."""

import importlib.util

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


def test_model_check():
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8))
    assert model_supported(model)
    assert not model_supported(torch.nn.Linear(2, 2))


@pytest.mark.skipif(importlib.util.find_spec("pruna") is None,
                    reason="pruna is not installed (optional; pruna 0.3.4 pulls torch 2.14 + CUDA libraries, so it "
                           "is kept out of this CPU venv): pip install pruna")
def test_smash_with_token_optimizer():  # pragma: no cover - needs pruna
    from pruna import SmashConfig, smash

    from trimformer.integrations.pruna import register

    register()
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8)).eval()
    config = SmashConfig()
    config["token_optimizer"] = {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    smashed = smash(model=model, smash_config=config)
    with torch.no_grad():
        smashed(torch.randn(1, 3, 32, 32))
    assert is_trimmed(model) and stats(model)["kept_fraction"] < 1.0
