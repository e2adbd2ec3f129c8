"""The evaluation metrics on hand-made examples with known values, and the pure helpers of runs and
reports (variants, truncation, retention, Pareto front, tables, plots)."""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.errors import ConfigError, InputError
from trimformer_lab.evaluation import metrics as m
from trimformer_lab.evaluation.longbench import middle_truncate
from trimformer_lab.evaluation.report import format_table, pareto_front, write_plots
from trimformer_lab.evaluation.summary import retention
from trimformer_lab.evaluation.tasks import evenly
from trimformer_lab.evaluation.variants import Variant, parse_variants


# ---- QA ---------------------------------------------------------------------------------------------
def test_normalize_answer_as_squad():
    assert m.normalize_answer("The  Cat, sat!") == "cat sat"
    assert m.normalize_answer("An apple a day.") == "apple day"
    assert m.normalize_answer("Theater") == "theater"  # articles only as whole words


def test_qa_f1_known_values():
    # pred {cat, sat} vs ref {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert m.qa_f1_score("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    assert m.qa_f1_score("Bob Dylan.", "bob dylan") == 1.0
    assert m.qa_f1_score("", "anything") == 0.0
    assert m.qa_f1_score("no overlap", "different words") == 0.0
    # repeated tokens count with multiplicity: pred [a1, a1] vs ref [a1]: P = 1/2, R = 1, F1 = 2/3
    assert m.qa_f1_score("paris paris", "paris") == pytest.approx(2 / 3)


def test_best_score_takes_the_best_reference_and_first_line():
    assert m.best_score("qa_f1", "55 mph", ["55", "fifty-five"]) == pytest.approx(2 / 3)
    # few-shot tasks read only the first line (after leading newlines)
    assert m.best_score("qa_f1", "\nParis\nQuestion: what else?", ["Paris"], first_line_only=True) == 1.0
    assert m.best_score("qa_f1", "\nParis\nQuestion: what else?", ["Paris"]) < 1.0
    with pytest.raises(KeyError):
        m.best_score("bleu", "a", ["a"])


# ---- summarisation ----------------------------------------------------------------------------------
def test_rouge_l_known_values():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    assert m.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert m.rouge_l("A B C", "a b c") == pytest.approx(1.0)   # lower-cased
    # LCS of "a b c d" and "a c" is 2: P = 2/4, R = 2/2, F = 2/3
    assert m.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert m.rouge_l("", "a c") == 0.0


# ---- classification ---------------------------------------------------------------------------------
CLASSES = ["Food", "Date", "Other", "Other location", "City"]


def test_classification_score_known_values():
    assert m.classification_score("Date", "Date", all_classes=CLASSES) == 1.0
    assert m.classification_score("Date or Food", "Date", all_classes=CLASSES) == 0.5
    assert m.classification_score("Food", "Date", all_classes=CLASSES) == 0.0
    # "Other" is a part of the right class "Other location": not counted against it
    assert m.classification_score("Other location", "Other location", all_classes=CLASSES) == 1.0
    assert m.classification_score("nothing known", "Date", all_classes=CLASSES) == 0.0


# ---- synthetic tasks --------------------------------------------------------------------------------
def test_retrieval_and_count_scores_known_values():
    assert m.retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    assert m.retrieval_score("Paragraph 19 or Paragraph 3", "Paragraph 19") == 0.5
    assert m.retrieval_score("Paragraph 7", "Paragraph 19") == 0.0
    assert m.retrieval_score("I do not know", "Paragraph 19") == 0.0
    with pytest.raises(ValueError):
        m.retrieval_score("1", "19")
    assert m.count_score("There are 46 unique paragraphs", "46") == 1.0
    assert m.count_score("46, 47, 48 or 49", "46") == 0.25
    assert m.count_score("none", "46") == 0.0


# ---- code -------------------------------------------------------------------------------------------
def test_code_sim_known_values():
    # Indel distance abcd -> abce is 2 over 8 characters: similarity 1 - 2/8
    assert m.code_sim_score("abcd", "abce") == pytest.approx(0.75)
    assert m.code_sim_score("x = 1", "x = 1") == 1.0
    # comment and code-fence lines are skipped; only the first code line counts
    assert m.code_sim_score("\n# set x\n```\nx = 1\ny = 2", "x = 1") == 1.0
    assert m.code_sim_score("", "x = 1") == 0.0


def test_numbers_found_is_the_share_of_numbers_present():
    assert m.numbers_found("1,234,567\n7654321\nnothing", "1234567|7654321|1111111|2222222") == 0.5
    assert m.numbers_found("", "1234567") == 0.0
    assert m.best_score("numbers_found", "7654321 and 1234567", ["1234567|7654321"]) == 1.0


def test_number_match():
    assert m.number_match("The number is 2,058,756.", "2058756") == 1.0
    assert m.number_match("2058757", "2058756") == 0.0


# ---- fidelity ---------------------------------------------------------------------------------------
def test_token_agreement_and_prefix():
    assert m.token_agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == 0.75
    assert m.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == 0.5
    assert m.token_agreement([1, 2, 3, 4], [1, 2], 4) == 0.5            # missing positions are misses
    assert m.token_agreement([1, 2, 3, 4, 5, 6], [1, 2, 3, 0, 0, 0], 3) == 1.0  # only the first n
    assert m.token_agreement([], [], 8) == 1.0
    assert m.token_agreement([], [5], 8) == 0.0


def test_kl_divergence_known_value():
    p = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    q = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert m.kl_divergence(p, q) == pytest.approx(expected, abs=1e-9)
    assert m.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    # un-normalised log-probabilities (logits) are normalised first
    assert m.kl_divergence(p + 3.0, q - 1.0) == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError):
        m.kl_divergence(p, torch.zeros(3))


# ---- helpers of runs --------------------------------------------------------------------------------
def test_middle_truncate_keeps_head_and_tail():
    ids = list(range(100))
    assert middle_truncate(ids, 200) == ids
    out = middle_truncate(ids, 11)
    assert out == list(range(5)) + list(range(94, 100))
    with pytest.raises(InputError):
        middle_truncate(ids, 1)


def test_parse_variants():
    vs = parse_variants("lazy,random", "default,0.7")
    assert [v.label for v in vs] == ["lazy@default", "lazy@0.7", "random@default", "random@0.7"]
    vs = parse_variants("lazy@0.7,static,full", None)
    assert [v.label for v in vs] == ["lazy@0.7", "static@default"]
    assert Variant("lazy", 0.5).trim_config().keep == 0.5
    assert Variant("lazy").trim_config().keep is None  # TrimConfig's default schedule
    with pytest.raises(InputError):
        parse_variants("lazy", "1.5")
    with pytest.raises(ConfigError):
        parse_variants("magic", None)
    with pytest.raises(InputError):
        parse_variants("full", None)


def test_parse_variants_with_dict_and_list_options():
    # A JSON --config gives string keys; the variant must stay hashable and give back the same config.
    vs = parse_variants("sdtp,lazy", None, {"schedule": {"4": 0.5, "8": 0.7}, "layers": [4, 8]})
    assert len({v: 1 for v in vs}) == 2
    assert vs[0].label == "sdtp@default,layers=[4,8],schedule={4:0.5,8:0.7}"
    config = vs[1].trim_config()
    assert config.schedule == {4: 0.5, 8: 0.7} and list(config.layers) == [4, 8]


def test_retention_and_evenly():
    assert retention(0.5, 0.25) == 0.5
    assert retention(0.0, 0.0) == 1.0
    assert retention(0.0, 0.3) is None
    assert evenly(list(range(11)), 6) == [0, 2, 4, 6, 8, 10]
    assert evenly([1, 2, 3], None) == [1, 2, 3]
    assert evenly([1, 2, 3], 1) == [2]


# ---- reports ----------------------------------------------------------------------------------------
def _row(task, method, keep, full, trimmed, speedup, backend="trimformer"):
    return {"task": task, "method": method, "keep": keep, "label": f"{method}@{keep}", "backend": backend,
            "full_score": full, "trimmed_score": trimmed, "retention": retention(full, trimmed),
            "speedup": speedup, "full_ttft_s": 8.0, "kept": 0.4, "kv": 0.4, "items": 2}


def test_pareto_front():
    points = [(1.0, 1.0), (2.0, 0.9), (1.5, 0.8), (3.0, 0.5), (2.5, 0.4)]
    assert pareto_front(points) == [0, 1, 3]


def test_table_and_plots(tmp_path):
    rows = [_row("hotpotqa", "lazy", 0.5, 0.4, 0.3, 2.5), _row("trec", "lazy", 0.5, 0.5, 0.5, 2.4),
            _row("average", "lazy", 0.5, 0.45, 0.4, 2.45), _row("hotpotqa", "snapkv", 0.41, 0.4, 0.2, 0.98, "kvpress")]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| task | variant |")
    assert lines[-1].startswith("| average | lazy@0.5 ")                  # average last
    assert any("kvpress:snapkv@0.41" in ln and "0.98x" in ln for ln in lines)
    written = write_plots({"results": rows, "groups": [], "needle_grid": {
        "full": [{"length": 1024, "depth": 0.0, "score": 1.0}, {"length": 1024, "depth": 1.0, "score": 0.0}]}},
        tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["needle_heatmap.png", "pareto_average.png", "pareto_hotpotqa.png", "pareto_trec.png"]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
