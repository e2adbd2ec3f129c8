"""Answer agreement and first-token KL in LongBench runs (on a tiny random Llama and hand-made items):
exact for the full model, below 1 / above 0 where pruning changes the answer, and a results file
stored without them still loads and resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_prompt
from test_eval_runner import CountingBackend, FakeTokenizer

from trimformer_lab.evaluation import metrics
from trimformer_lab.evaluation.items import EvalItem
from trimformer_lab.evaluation.report import format_table
from trimformer_lab.evaluation.runner import Evaluation
from trimformer_lab.evaluation.store import ResultStore
from trimformer_lab.evaluation.variants import Variant


def _items() -> dict[str, list[EvalItem]]:
    return {"qa": [EvalItem(task="qa", id=str(i), input_ids=make_prompt(96, seed=40 + i), references=["7"],
                            metric="qa_f1", max_new_tokens=8) for i in range(3)]}


def _evaluation(model, path, backend):
    return Evaluation(kind="longbench", model=model, tokenizer=FakeTokenizer(), items=_items(),
                      variants=[Variant("lazy", 1.0), Variant("static", 0.2)], store=ResultStore(path),
                      settings={"model": "tiny"}, backend=backend, progress=False)


def test_kl_of_known_distributions():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    assert metrics.kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert metrics.kl_divergence(p, p) == 0.0


def test_answer_agreement_uses_the_task_metric_on_the_full_answer():
    assert metrics.answer_agreement("qa_f1", "the Eiffel tower", "Eiffel tower") == 1.0
    assert metrics.answer_agreement("qa_f1", "red house", "blue house") == pytest.approx(0.5)
    assert metrics.answer_agreement("rouge_l", "", "") == 1.0
    assert metrics.answer_agreement("rouge_l", "", "a summary") == 0.0
    assert metrics.answer_agreement("retrieval", "Paragraph 3", "It is Paragraph 3.") == 1.0
    assert metrics.answer_agreement("retrieval", "Paragraph 4", "Paragraph 3") == 0.0
    assert metrics.answer_agreement("count", "none", "no idea") == 1.0       # both name no number
    classes = ["Location", "Other location", "Person"]
    assert metrics.answer_agreement("classification", "Type: Person", "Person", classes) == 1.0
    assert metrics.answer_agreement("classification", "Location", "Other location", classes) == 0.0
    assert metrics.answer_agreement("qa_f1", "x\nextra", "x\nother", first_line_only=True) == 1.0
    assert metrics.answer_agreement("code_sim", "a = 1\nb", "# c\na = 1") == 1.0


def test_full_agrees_with_itself_and_pruning_lowers_agreement(llama, tmp_path):
    path = tmp_path / "lb.json"
    ev = _evaluation(llama, path, CountingBackend())
    ev.run()
    data = json.loads(path.read_text())
    full = {r["task"]: r for r in data["full"]}["average"]
    assert full["agreement"] == 1.0 and full["kl"] == 0.0
    rows = {(r["task"], r["method"]): r for r in data["results"]}
    exact, pruned = rows["average", "lazy"], rows["average", "static"]
    assert exact["agreement"] == 1.0 and exact["kl"] == pytest.approx(0.0, abs=1e-6)
    assert pruned["agreement"] < 1.0 and pruned["kl"] > 1e-4
    records = [c for c in data["cells"].values() if c["method"] == "static"][0]["records"]
    assert all(0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0 for r in records.values())
    table = format_table(data["full"] + data["results"])
    assert "agreement" in table and "| 1.000 | 0.0000 |" in table


def test_results_stored_without_agreement_still_load_and_resume(llama, tmp_path):
    path = tmp_path / "old.json"
    _evaluation(llama, path, CountingBackend()).run()
    data = json.loads(path.read_text())
    expected = {(r["task"], r["method"]): r["agreement"] for r in data["results"]}
    for cell in data["cells"].values():              # as written before these fields existed
        for rec in cell["records"].values():
            rec.pop("agreement"), rec.pop("kl")
    for row in data["results"] + data["full"]:
        row.pop("agreement"), row.pop("kl")
    path.write_text(json.dumps(data))
    for side in (tmp_path / "old.fidelity").glob("*.pt"):
        side.unlink()
    again = CountingBackend()
    _evaluation(llama, path, again).run()
    assert again.calls == []                          # nothing rerun
    resumed = json.loads(path.read_text())
    rows = {(r["task"], r["method"]): r for r in resumed["results"]}
    assert {k: r["agreement"] for k, r in rows.items()} == pytest.approx(expected)  # from the predictions
    assert all(r["kl"] is None for r in rows.values())  # no distributions stored: not known
    assert "n/a" in format_table(resumed["full"] + resumed["results"])


def test_a_missing_variant_record_reruns_the_full_model_when_its_distribution_is_gone(llama, tmp_path):
    path = tmp_path / "lb.json"
    _evaluation(llama, path, CountingBackend()).run()
    data = json.loads(path.read_text())
    [c for c in data["cells"].values() if c["method"] == "static"][0]["records"].pop("1")
    path.write_text(json.dumps(data))
    for side in (tmp_path / "lb.fidelity").glob("*.pt"):
        side.unlink()
    again = CountingBackend()
    _evaluation(llama, path, again).run()
    assert again.calls == ["full", "static@0.2"]     # the full model's first-token distribution is needed
    rec = [c for c in json.loads(path.read_text())["cells"].values() if c["method"] == "static"][0]["records"]["1"]
    assert rec["kl"] is not None
