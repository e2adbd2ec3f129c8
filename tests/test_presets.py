"""Presets: the architecture fingerprint, the file format and its errors, and the lookup order (an explicit
file, then the cache folder, then the shipped presets, else one warning and the depth-fraction schedule)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2Config

from trimformer import TrimConfig, presets
from trimformer.errors import ConfigError
from trimformer.presets import fingerprint, find_preset, load_preset, preset_for, save_preset

from conftest import TINY

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64)
SMOLLM2_SCHEDULE = {7: 0.4, 14: 0.5, 18: 0.5, 23: 0.5}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty cache root per test, and a fresh record of warnings given."""
    monkeypatch.setenv("TRIMFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "_WARNED", set())
    return tmp_path / "cache"


def tiny_config(**changes) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **changes})


# ---- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_ignores_name_and_weights_but_not_the_architecture():
    base = tiny_config()
    renamed = tiny_config()
    renamed._name_or_path = "someone/tiny-instruct"
    assert fingerprint(base) == fingerprint(renamed)
    assert len(fingerprint(base)) == 16
    for change in ({"num_hidden_layers": 7}, {"hidden_size": 128}, {"num_key_value_heads": 4},
                   {"intermediate_size": 256}, {"vocab_size": 256}):
        assert fingerprint(tiny_config(**change)) != fingerprint(base), change
    assert fingerprint(Qwen2Config(**TINY)) != fingerprint(base)          # model_type counts


def test_fingerprint_treats_an_all_full_layer_list_as_none_and_keeps_sliding_layers():
    config = Qwen2Config(**TINY, use_sliding_window=False)
    assert presets.architecture(config)["layer_types"] is None
    sliding = Qwen2Config(**TINY, layer_types=["sliding_attention", "full_attention"] * 3)
    assert presets.architecture(sliding)["layer_types"] == ["sliding_attention", "full_attention"] * 3
    assert fingerprint(sliding) != fingerprint(config)


def test_fingerprint_head_dim_defaults_to_hidden_over_heads():
    explicit = tiny_config(head_dim=16)
    assert presets.architecture(tiny_config())["head_dim"] == 16
    assert fingerprint(explicit) == fingerprint(tiny_config())


# ---- shipped presets -------------------------------------------------------------------------------
def test_smollm2_finds_its_shipped_preset():
    config = LlamaConfig(**SMOLLM2)
    assert preset_for(config) == SMOLLM2_SCHEDULE
    found = find_preset(config)
    assert found["source"] == "shipped" and found["model"]["name"] == "smollm2-135m"


def test_shipped_presets_are_well_formed_and_distinct():
    shipped = presets.shipped_presets()
    assert shipped, "no preset ships with trimformer"
    prints = [p["model"]["fingerprint"] for p in shipped]
    assert len(prints) == len(set(prints))
    for p in shipped:
        layers = p["model"]["num_hidden_layers"]
        assert max(p["schedule"]) <= layers - 2 and all(0 < k <= 1 for k in p["schedule"].values())
        assert p["method"] == "lazy"


def test_real_smollm2_config_matches_the_shipped_fingerprint():
    folder = Path.home() / ".cache" / "trimformer" / "models" / "smollm2-135m"
    if not (folder / "config.json").exists():
        pytest.skip("SmolLM2-135M is not converted on this machine")
    from transformers import AutoConfig
    assert preset_for(AutoConfig.from_pretrained(folder)) == SMOLLM2_SCHEDULE


# ---- lookup order ----------------------------------------------------------------------------------
def test_lookup_order_path_then_cache_then_shipped(tmp_path, cache):
    config = LlamaConfig(**SMOLLM2)
    cached = save_preset(presets.cache_path(config), config, {5: 0.6, 10: 0.5})
    assert cached.parent == cache / "presets"
    assert preset_for(config) == {5: 0.6, 10: 0.5}                      # the cache wins over the shipped one
    assert find_preset(config)["source"] == "cache"
    explicit = save_preset(tmp_path / "mine.json", config, {3: 0.7})
    assert preset_for(config, explicit) == {3: 0.7}                     # an explicit file wins over both
    assert find_preset(config, str(explicit))["source"] == "path"


def test_explicit_preset_for_another_model_names_the_model_it_was_made_for(tmp_path):
    path = save_preset(tmp_path / "smol.json", LlamaConfig(**SMOLLM2), SMOLLM2_SCHEDULE, name="smollm2-135m")
    with pytest.raises(ConfigError, match=r"made for smollm2-135m.*calibrate schedule"):
        preset_for(tiny_config(), path)


def test_no_preset_warns_once_per_architecture():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert preset_for(tiny_config()) is None
        assert preset_for(tiny_config()) is None
        assert preset_for(tiny_config(num_hidden_layers=8)) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2
    assert "20/40/60/80%" in messages[0] and "trimformer calibrate schedule --model M --out preset.json" in messages[0]


def test_explicit_layers_win_over_the_preset():
    config = TrimConfig(layers=[2, 4])
    assert config.resolve_schedule(30, SMOLLM2_SCHEDULE) == {2: 0.5, 4: 0.5}
    assert TrimConfig(schedule={3: 0.3}).resolve_schedule(30, SMOLLM2_SCHEDULE) == {3: 0.3}
    assert TrimConfig().resolve_schedule(30, SMOLLM2_SCHEDULE) == SMOLLM2_SCHEDULE


# ---- the file format -------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    config = tiny_config()
    path = save_preset(tmp_path / "sub" / "p.json", config, {1: 0.5, 3: 0.25}, name="tiny",
                       options={"window": 8}, target={"work_share": 0.5}, measured={"kl": 0.01},
                       calibration={"prompts": 2})
    raw = json.loads(path.read_text())
    assert raw["schedule"] == {"1": 0.5, "3": 0.25} and raw["format"] == 1
    assert raw["model"]["num_hidden_layers"] == 6 and raw["model"]["fingerprint"] == fingerprint(config)
    loaded = load_preset(path)
    assert loaded["schedule"] == {1: 0.5, 3: 0.25}
    assert loaded["measured"] == {"kl": 0.01} and loaded["options"] == {"window": 8}


def test_save_refuses_a_layer_past_the_model():
    with pytest.raises(ConfigError, match="has 6 layers"):
        save_preset("/nonexistent/p.json", tiny_config(), {5: 0.5})


@pytest.mark.parametrize("content, message", [
    ("not json", "not readable JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format": 2}', "format must be 1"),
    ('{"format": 1, "model": {}}', "fingerprint"),
    ('{"format": 1, "model": {"fingerprint": "x"}, "schedule": {}}', "non-empty object"),
    ('{"format": 1, "model": {"fingerprint": "x"}, "schedule": {"a": 0.5}}', "layer indices"),
    ('{"format": 1, "model": {"fingerprint": "x"}, "schedule": {"3": 1.5}}', r"schedule\[3\].*\(0, 1\]"),
    ('{"format": 1, "model": {"fingerprint": "x"}, "schedule": {"3": 0.5}, "measured": 3}', "'measured' must"),
])
def test_malformed_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_preset(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "none.json")


# ---- the preset option -----------------------------------------------------------------------------
def test_trim_config_preset_option_is_validated(tmp_path):
    path = save_preset(tmp_path / "p.json", tiny_config(), {1: 0.5})
    config = TrimConfig(preset=path)
    assert config.preset == str(path)                                  # a Path is kept as a string
    config.validate()
    assert TrimConfig(**config.to_dict()).preset == str(path)
    with pytest.raises(ConfigError, match="does not exist"):
        TrimConfig(preset=str(tmp_path / "none.json")).validate()
    with pytest.raises(ConfigError, match="path of a preset JSON file"):
        TrimConfig(preset=3).validate()


def test_a_preset_for_an_encoder_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    import trimformer

    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    path = tmp_path / "p.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="presets are decoder schedules.*BertModel is an encoder"):
        trimformer.trim(model, method="cls_attention", keep=0.5, preset=str(path))
    assert not trimformer.is_trimmed(model)


def test_evaluations_record_the_schedule_trim_prunes_with(tmp_path):
    """The eval backend describes a variant with the schedule trim() will use: the preset file given, the
    user's layers over any preset."""
    from conftest import make_model
    from trimformer_lab.evaluation.backend import TrimformerBackend
    from trimformer_lab.evaluation.variants import Variant

    model = make_model("llama")
    path = save_preset(tmp_path / "mine.json", model.config, {2: 0.6, 4: 0.3})
    backend = TrimformerBackend()
    by_file = backend.describe(model, Variant("lazy", options=(("preset", str(path)),)))
    assert by_file["schedule"] == {"2": 0.6, "4": 0.3}
    by_layers = backend.describe(model, Variant("lazy", options=(("layers", (1,)), ("preset", str(path)))))
    assert by_layers["schedule"] == {"1": 0.5}
