"""TrimConfig's option groups and the registry: every spelling of a configuration means the same thing,
bad input names what is accepted, and methods, scorers and mechanisms are known in one place."""

import pytest
import torch

import trimformer
from trimformer import ConfigError, EvictOptions, PruneOptions, TrimConfig
from trimformer.registry import METHODS, SCORERS, get_method, method_names, methods_for, resolve
from trimformer.scorers.base import KINDS, NEEDS, Scorer, register
from conftest import make_model, make_prompt


def test_flat_group_and_dict_spellings_are_one_config():
    flat = TrimConfig(method="lazy+runtime", keep=0.4, layers=[1, 2], window=8, budget=0.5, decay=0.8)
    grouped = TrimConfig(method="lazy+runtime", keep=0.4, prune={"layers": [1, 2], "window": 8},
                         evict=EvictOptions(budget=0.5, decay=0.8))
    from_dict = TrimConfig.from_dict({"method": "lazy+runtime", "reduction_ratio": 0.6, "layers": [1, 2],
                                      "window": 8, "evict": {"budget": 0.5, "decay": 0.8}})
    assert flat == grouped
    assert flat.to_dict() == from_dict.to_dict() | {"keep": pytest.approx(0.4)}
    assert flat.prune.layers == (1, 2) and flat.evict.budget == 0.5
    assert flat.budget == 0.5 and flat.window == 8            # flat reads of grouped options
    assert TrimConfig(**flat.to_dict()) == flat


def test_replace_and_coerce_keep_the_rest():
    cfg = TrimConfig(method="lazy", keep=0.5, layers=(1,))
    changed = cfg.replace(window=4, budget=3)
    assert changed.prune.window == 4 and changed.evict.budget == 3 and changed.prune.layers == (1,)
    assert cfg.prune.window == 64                              # the original is unchanged
    assert TrimConfig.coerce(cfg, {"span": 5}).prune.span == 5
    assert TrimConfig.coerce("random", {"seed": 3}).seed == 3


def test_adaptive_spellings():
    assert TrimConfig(adaptive=True).adaptive.enabled
    assert TrimConfig(adaptive=True, mass=0.7, adaptive_mode="mass").adaptive.mass == 0.7
    assert TrimConfig(adaptive={"mass": 0.7}).adaptive.enabled
    assert not TrimConfig().adaptive.enabled


@pytest.mark.parametrize("options, match", [
    ({"windw": 3}, r"unknown option\(s\) \['windw'\]; accepted: .*window"),
    ({"prune": {"budget": 0.5}}, r"unknown prune option\(s\) \['budget'\]; accepted: .*window"),
    ({"evict": 0.5}, "evict must be a dict of its options or a EvictOptions"),
    ({"prune": PruneOptions(window=0)}, "window must be an integer >= 1"),
    ({"reduction_ratio": 1.0}, r"reduction_ratio must be a number in \[0, 1\)"),
    ({"keep": 0.5, "reduction_ratio": 0.5}, "either reduction_ratio or keep"),
    ({"adaptive": "yes"}, "adaptive must be True/False, a dict"),
    ({"budget": 1.5}, r"budget must be a share of the tokens in \(0, 1.0\]"),
    ({"tome_mode": "x"}, "tome_mode must be one of"),
    ({"adaptive_mode": "x"}, "adaptive_mode must be 'sampling', 'mass' or 'similarity'"),
])
def test_bad_options_name_what_is_accepted(options, match):
    with pytest.raises(ConfigError, match=match):
        TrimConfig(**options).validate()


def test_registry_knows_every_method_and_scorer():
    for name in method_names():
        method = get_method(name)
        assert method.applies_to, name
        if method.scorer is not None:
            assert method.scorer in SCORERS
    for name, scorer in SCORERS.items():
        assert scorer.name == name and scorer.needs <= NEEDS and scorer.applies_to <= KINDS
    assert {"lazy", "random", "static", "truncate", "sdtp", "runtime", "tome", "cls_attention", "tsdtp"} <= \
        set(method_names())
    assert "tome" in methods_for("encoder") and "lazy" not in methods_for("encoder")
    assert "lazy" in methods_for("decoder") and "tome" not in methods_for("decoder")
    assert set(METHODS) <= set(method_names())


def test_runtime_suffix_and_mechanisms_override():
    suffix = get_method("random+runtime")
    assert suffix.mechanisms == {"prune", "evict"} and suffix.scorer == "random" and not suffix.revive_default
    spelled = resolve(TrimConfig(method="lazy", scorer="random", mechanisms=["prune", "evict"]))
    assert (spelled.scorer, spelled.mechanisms, spelled.revive_default) == ("random", suffix.mechanisms, False)
    with pytest.raises(ConfigError, match="does not prune the prompt"):
        get_method("runtime+runtime")
    with pytest.raises(ConfigError, match="unknown method 'nope'; accepted: lazy, "):
        get_method("nope")
    with pytest.raises(ConfigError, match="unknown scorer 'nope'; accepted: "):
        resolve(TrimConfig(scorer="nope"))
    with pytest.raises(ConfigError, match="merge cannot be combined"):
        resolve(TrimConfig(mechanisms=["merge", "prune"]))
    with pytest.raises(ConfigError, match="scorer= chooses what prefill dropping"):
        resolve(TrimConfig(method="runtime", scorer="random"))


def test_scorer_registration_checks_its_declarations():
    with pytest.raises(TypeError, match="unknown needs"):
        @register
        class Bad(Scorer):                               # noqa: F811
            name = "bad"
            needs = frozenset({"telepathy"})
    assert "bad" not in SCORERS


def test_scorer_name_runs_as_a_method_and_equals_its_method():
    """A scorer's own name is a method: 'recency' is what 'static' runs, token for token."""
    ids = make_prompt(100, seed=5)
    logits = []
    for method in ("static", "recency"):
        model = make_model("llama")
        trimformer.trim(model, method=method, keep=0.5, layers=(1, 2))
        with torch.no_grad():
            logits.append(model(ids).logits)
        trimformer.untrim(model)
    assert torch.equal(logits[0], logits[1])


def test_methods_command_lists_the_registry(capsys):
    from trimformer.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.strip()}
    for name in method_names():
        assert name in rows, name
    assert rows["lazy"].split()[1:3] == ["last_query", "prune"]
    assert rows["key_norm"].split()[1:4] == ["keys", "decoder", "Devoto"]     # the scorer's own row


@pytest.mark.parametrize("old, new", [
    ("trimformer.methods", "trimformer.registry"),
    ("trimformer.models.decoder", "trimformer.patch"),
    ("trimformer.scoring.learned", "trimformer.scorers"),
    ("trimformer.evaluation.needle", "trimformer_lab.evaluation"),
    ("trimformer.tsdtp", "trimformer.pruners.tsdtp"),
])
def test_a_moved_module_names_its_replacement(old, new):
    import importlib

    with pytest.raises(ImportError, match=f"{old.split('.')[0]}.{old.split('.')[1]} has moved: use {new}"):
        importlib.import_module(old)


def test_replace_merges_groups_and_flat_writes_reach_them():
    cfg = TrimConfig(method="lazy", layers=(1, 2), window=8, mass=0.7, adaptive_mode="mass")
    changed = TrimConfig.coerce(cfg, {"adaptive": True, "prune": {"span": 3}})
    assert (changed.prune.layers, changed.prune.window, changed.prune.span) == ((1, 2), 8, 3)
    assert changed.adaptive.enabled and (changed.adaptive.mass, changed.adaptive.mode) == (0.7, "mass")
    assert not TrimConfig().adaptive and TrimConfig(adaptive=True).adaptive     # reads as the flag
    cfg.budget = 0.5
    cfg.adaptive = True
    assert cfg.evict.budget == 0.5 and cfg.adaptive.enabled
    assert TrimConfig(mechanisms="prune").mechanisms == ("prune",)
    with pytest.raises(ConfigError, match="scorer must be a scorer's name"):
        TrimConfig(scorer=["key_norm"]).validate()


def test_a_retrim_that_fails_keeps_the_previous_trim(monkeypatch):
    from trimformer.patch.llama import LlamaPatch

    ids = make_prompt(100, seed=9)
    model = make_model("llama")
    trimformer.trim(model, method="lazy", keep=0.5, layers=(1,))
    with torch.no_grad():
        before = model(ids).logits
    install = LlamaPatch._install

    def failing_for_random(self):
        install(self)                                    # half-installed, then a failure
        if self.method.name == "random":
            raise RuntimeError("hook failed")

    monkeypatch.setattr(LlamaPatch, "_install", failing_for_random)
    with pytest.raises(RuntimeError, match="hook failed"):
        trimformer.trim(model, method="random", keep=0.5, layers=(1,))
    assert trimformer.stats(model)["method"] == "lazy"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    trimformer.untrim(model)
