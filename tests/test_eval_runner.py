"""Runs on a tiny random Llama model: every cell stored, an interrupted run resumes without redoing
finished records, a changed configuration is not mistaken for a finished one, and the fidelity
measures are exact when nothing is pruned."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_prompt

import trimformer
from trimformer_lab.evaluation.backend import TrimformerBackend
from trimformer_lab.evaluation.items import EvalItem
from trimformer_lab.evaluation.runner import Evaluation
from trimformer_lab.evaluation.store import ResultStore
from trimformer_lab.evaluation.variants import Variant, parse_variants


class FakeTokenizer:
    """Just what a run needs: decode and an end-of-sequence id (the tiny model has a 128-token vocabulary)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


class CountingBackend(TrimformerBackend):
    """The trimformer backend, counting calls and optionally failing on the n-th timed one."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def generate(self, model, variant, input_ids, max_new_tokens, eos, stop=None, keep_logprobs=0):
        if max_new_tokens > 1:  # a timed call, not the one-token warm-up
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                raise KeyboardInterrupt("simulated interruption")
            self.calls.append(variant.label)
        return super().generate(model, variant, input_ids, max_new_tokens, eos, stop, keep_logprobs)


def _items(kind: str = "count") -> dict[str, list[EvalItem]]:
    out = {}
    for t, task in enumerate(["alpha", "beta"]):
        out[task] = [EvalItem(task=task, id=str(i), input_ids=make_prompt(64, seed=10 * t + i), references=["7"],
                              metric=kind, max_new_tokens=3) for i in range(2)]
    return out


def _evaluation(model, path, backend, variants=None, kind="needle", items=None, **kw):
    return Evaluation(kind=kind, model=model, tokenizer=FakeTokenizer(), items=items or _items(),
                      variants=variants or parse_variants("lazy,random", "0.5"), store=ResultStore(path),
                      settings={"model": "tiny"}, backend=backend, progress=False, **kw)


def test_run_writes_contract_rows_and_resume_redoes_nothing(llama, tmp_path):
    path = tmp_path / "out.json"
    first = CountingBackend()
    rows = _evaluation(llama, path, first).run()
    assert len(first.calls) == 2 * 2 * 3            # tasks x items x (full, lazy, random)
    data = json.loads(path.read_text())
    keys = {"task", "method", "keep", "full_score", "trimmed_score", "retention", "speedup"}
    assert rows == data["results"] and all(keys <= set(r) for r in rows)
    assert [(r["task"], r["method"]) for r in rows] == [
        ("alpha", "lazy"), ("beta", "lazy"), ("average", "lazy"),
        ("alpha", "random"), ("beta", "random"), ("average", "random")]
    assert all(isinstance(r["keep"], float) and r["keep"] == 0.5 for r in rows)
    assert all(isinstance(r[k], float) for r in rows for k in ("full_score", "trimmed_score", "speedup"))
    assert [r["method"] for r in data["full"]] == ["full"] * 3
    assert all(0.0 < r["kv"] < 1.0 for r in rows)     # something was pruned
    assert not trimformer.is_trimmed(llama)

    again = CountingBackend()
    assert _evaluation(llama, path, again).run() == rows
    assert again.calls == []                           # every finished cell skipped


def test_interrupted_run_resumes_where_it_stopped(llama, tmp_path):
    path = tmp_path / "out.json"
    broken = CountingBackend(fail_at=7)
    with pytest.raises(KeyboardInterrupt):
        _evaluation(llama, path, broken).run()
    assert not trimformer.is_trimmed(llama)             # never left patched
    saved = json.loads(path.read_text())
    assert sum(len(c["records"]) for c in saved["cells"].values()) == 7  # saved after every record

    resumed = CountingBackend()
    rows = _evaluation(llama, path, resumed).run()
    assert len(resumed.calls) == 12 - 7                # only what was missing
    reference = CountingBackend()
    fresh = _evaluation(llama, tmp_path / "fresh.json", reference).run()
    strip = lambda rs: [{k: v for k, v in r.items() if "ttft" not in k and k != "speedup"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(fresh)                 # same scores as an uninterrupted run


def test_changed_configuration_or_more_items_only_run_what_is_new(llama, tmp_path):
    path = tmp_path / "out.json"
    _evaluation(llama, path, CountingBackend()).run()
    other = CountingBackend()
    _evaluation(llama, path, other, variants=parse_variants("lazy", "0.5", {"window": 8})).run()
    assert other.calls == ["lazy@0.5,window=8"] * 4    # a new configuration: run; the full model: reused
    more = _items()
    more["beta"].append(EvalItem(task="beta", id="9", input_ids=make_prompt(64, seed=99), references=["7"],
                                 metric="count", max_new_tokens=3))
    grown = CountingBackend()
    _evaluation(llama, path, grown, items=more).run()
    assert sorted(grown.calls) == ["full", "lazy@0.5", "random@0.5"]  # only the new item


def test_fidelity_is_exact_when_nothing_is_pruned(llama, tmp_path):
    items = _items("fidelity")
    ev = _evaluation(llama, tmp_path / "fid.json", CountingBackend(), kind="fidelity", items=items,
                     variants=[Variant("lazy", 1.0), Variant("static", 0.3)], fidelity_tokens=6)
    rows = {(r["task"], r["method"]): r for r in ev.run()}
    exact = rows["average", "lazy"]
    assert exact["trimmed_score"] == 1.0 and exact["rouge_l"] == 1.0 and exact["prefix"] == 1.0
    assert exact["kl"] == pytest.approx(0.0, abs=1e-6)
    pruned = rows["average", "static"]
    assert pruned["kl"] > 1e-4                         # pruning 70% moves the next-token distribution
    assert pruned["kv"] < 0.9
    side = list((tmp_path / "fid.fidelity").glob("*.pt"))
    assert len(side) == 4 and torch.load(side[0]).shape == (128,)  # the full model's log-probabilities


def test_greedy_decode_matches_generate(llama):
    """The runner's decoding loop gives HF generate's greedy tokens (full and trimmed-with-keep-1)."""
    ids = make_prompt(50, seed=3)
    ref = llama.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 50:].tolist()
    backend = TrimformerBackend()
    assert backend.generate(llama, Variant("full"), ids, 5, []).tokens == ref
    assert backend.generate(llama, Variant("lazy", 1.0), ids, 5, []).tokens == ref


def test_store_reuses_a_cell_across_added_options_but_not_changed_values(tmp_path):
    path = tmp_path / "r.json"
    store = ResultStore(path)
    old = {"variant": {"config": {"keep": 0.5, "layers": (1, 2)}}, "settings": {"model": "m"}}
    store.cell("t", "lazy@0.5", old, {"method": "lazy", "keep": 0.5})["records"]["0"] = {"score": 1.0}
    store.save()
    reloaded = ResultStore(path)
    added = {"variant": {"config": {"keep": 0.5, "layers": (1, 2), "new_option": 3}}, "settings": {"model": "m"}}
    assert reloaded.cell("t", "lazy@0.5", added, {})["records"] == {"0": {"score": 1.0}}
    changed = {"variant": {"config": {"keep": 0.5, "layers": (1, 3)}}, "settings": {"model": "m"}}
    assert reloaded.cell("t", "lazy@0.5", changed, {})["records"] == {}
    other_settings = {"variant": {"config": {"keep": 0.5, "layers": (1, 2)}}, "settings": {"model": "n"}}
    assert reloaded.cell("t", "lazy@0.5", other_settings, {})["records"] == {}


def test_runtime_variant_reports_the_kv_share_left_at_the_end(llama):
    # Decode-time eviction keeps the whole prompt through the prefill; the share reported is what
    # the cache holds after decoding, of every token seen (prompt + generated, per layer).
    prompt = make_prompt(64, seed=3)
    variant = Variant("runtime", None, (("budget", 0.5), ("evict_every", 1), ("readmit_every", 0), ("recent", 8)))
    decoded = TrimformerBackend().generate(llama, variant, prompt, max_new_tokens=4, eos=[])
    assert decoded.compute_share == 1.0
    layers = len(llama.model.layers)
    seen = layers * (64 + 3)               # the last generated token is never fed back
    in_cache = layers * math.ceil(0.5 * (64 + 3))
    assert decoded.kv_share == pytest.approx(in_cache / seen)
    assert decoded.info["evicted"] == seen - in_cache and decoded.info["readmitted"] == 0
    described = TrimformerBackend().describe(llama, variant)
    assert described["keep"] == 0.5 and described["schedule"] == {}   # the budget; no prefill schedule


def test_two_runs_on_one_file_add_up(tmp_path):
    # Both stores load the (empty) file, then each saves its own cell and rows: the second save must
    # keep what the first wrote, and a row this run re-summarises replaces the stored one.
    path = tmp_path / "shared.json"
    first, second = ResultStore(path), ResultStore(path)
    for store, label in ((first, "lazy@0.5"), (second, "runtime@default")):
        cell = store.cell("alpha", label, {"variant": label}, {"method": label.split("@")[0], "keep": 0.5})
        cell["records"]["0"] = {"score": 1.0}
        store.data["results"] = [{"task": "alpha", "label": label, "trimmed_score": 1.0}]
        store.data["groups"] = [{"group": "qa", "label": label}]
        store.save()
    data = json.loads(path.read_text())
    assert sorted(c["label"] for c in data["cells"].values()) == ["lazy@0.5", "runtime@default"]
    assert sorted(r["label"] for r in data["results"]) == ["lazy@0.5", "runtime@default"]
    assert sorted(r["label"] for r in data["groups"]) == ["lazy@0.5", "runtime@default"]
    first.data["results"] = [{"task": "alpha", "label": "lazy@0.5", "trimmed_score": 0.5}]
    first.save()
    rows = {r["label"]: r["trimmed_score"] for r in json.loads(path.read_text())["results"]}
    assert rows == {"lazy@0.5": 0.5, "runtime@default": 1.0}
