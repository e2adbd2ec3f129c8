"""Every LongBench v1 task in English and code: LongBench's prompt template, generation length and
metric per task, LongBench's own JSONL records read and turned into prompts, and clear errors for an
unknown task or a malformed record (all on small hand-made records)."""

from __future__ import annotations

import json

import pytest

from trimformer.errors import InputError
from trimformer_lab.data import default_data_dir
from trimformer_lab.evaluation import longbench as lb
from trimformer_lab.evaluation.metrics import best_score
from trimformer_lab.evaluation.tasks import longbench_items

# LongBench's config/dataset2maxlen.json and eval.py's dataset2metric (English and code tasks),
# in LongBench's order; the metric names map to metrics.METRICS keys.
MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
          "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
          "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}
LONGBENCH_METRIC = {"narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
                    "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score", "musique": "qa_f1_score",
                    "gov_report": "rouge_score", "qmsum": "rouge_score", "multi_news": "rouge_score",
                    "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
                    "passage_count": "count_score", "passage_retrieval_en": "retrieval_score",
                    "lcc": "code_sim_score", "repobench-p": "code_sim_score"}
METRIC_KEY = {"qa_f1_score": "qa_f1", "rouge_score": "rouge_l", "classification_score": "classification",
              "count_score": "count", "retrieval_score": "retrieval", "code_sim_score": "code_sim"}

TREC_CLASSES = ["Food", "Location", "Other location", "Description of something"]


def record(**fields) -> dict:
    base = {"input": "", "context": "", "answers": ["x"], "length": 12, "dataset": "t", "language": "en",
            "all_classes": None, "_id": "id0"}
    base.update(fields)
    return base


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


class CharTokenizer:
    """One token per character, no chat template and no special tokens: prompts decode back to text."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


# ---- the task table ---------------------------------------------------------------------------------
def test_every_english_and_code_task_has_longbench_length_metric_and_chat_use():
    assert list(lb.TASKS) == list(MAXLEN)
    assert lb.task_names(None) == list(MAXLEN) == lb.task_names("all")
    for name, spec in lb.TASKS.items():
        assert spec.max_new_tokens == MAXLEN[name], name
        assert spec.metric == METRIC_KEY[LONGBENCH_METRIC[name]], name
        assert spec.template.count("{context}") == 1, name
        # LongBench's pred.py: no chat template on the few-shot and code tasks, first line scored on few-shot
        assert spec.chat == (name not in ("trec", "triviaqa", "samsum", "lcc", "repobench-p")), name
        assert spec.first_line == (name in ("trec", "triviaqa", "samsum")), name
    assert lb.GROUPS == {
        "single-doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
        "multi-doc QA": ["hotpotqa", "2wikimqa", "musique"],
        "summarization": ["gov_report", "qmsum", "multi_news"],
        "few-shot": ["trec", "triviaqa", "samsum"],
        "synthetic": ["passage_count", "passage_retrieval_en"],
        "code": ["lcc", "repobench-p"],
    }


def test_unknown_task_is_refused_with_the_known_ones():
    for call in (lambda: lb.task_names("musique,dureader"), lambda: lb.load_longbench("lsht"),
                 lambda: lb.parse_record("vcsum", "0", record(context="c"))):
        with pytest.raises(InputError, match="unknown LongBench task") as info:
            call()
        assert "narrativeqa" in str(info.value) and "repobench-p" in str(info.value)
    assert lb.task_names("musique,qmsum,repobench-p") == ["musique", "qmsum", "repobench-p"]


# ---- prompts from LongBench records -------------------------------------------------------------------
def test_prompts_are_built_from_each_task_template():
    cases = {
        "narrativeqa": (record(input="Who is Tom?", context="Tom is a cat."),
                        "You are given a story, which can be either a novel or a movie script, and a question. Answer "
                        "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
                        "explanation.\n\nStory: Tom is a cat.\n\nNow, answer the question based on the story asconcisely "
                        "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: Who "
                        "is Tom?\n\nAnswer:"),
        "musique": (record(input="Q?", context="Passage 1:\nA"),
                    "Answer the question based on the given passages. Only give me the answer and do not output any "
                    "other words.\n\nThe following are given passages.\nPassage 1:\nA\n\nAnswer the question based on "
                    "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: Q?"
                    "\nAnswer:"),
        "qmsum": (record(input="What was decided?", context="A: hi\nB: {braces} stay"),
                  "You are given a meeting transcript and a query containing a question or instruction. Answer the "
                  "query in one or more sentences.\n\nTranscript:\nA: hi\nB: {braces} stay\n\nNow, answer the query "
                  "based on the above meeting transcript in one or more sentences.\n\nQuery: What was decided?"
                  "\nAnswer:"),
        "trec": (record(input="What is sushi?", context="Q: Where is Rome?\nType: Location",
                        answers=["Food"], all_classes=TREC_CLASSES),
                 "Please determine the type of the question below. Here are some examples of questions.\n\n"
                 "Q: Where is Rome?\nType: Location\nWhat is sushi?"),
        "passage_count": (record(context="Paragraph 1: a\nParagraph 2: a", answers=["1"]),
                          "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                          "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                          "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                          "total?\n\nParagraph 1: a\nParagraph 2: a\n\nPlease enter the final count of unique "
                          "paragraphs after removing duplicates. The output format should only contain the number, "
                          "such as 1, 2, 3, and so on.\n\nThe final answer is: "),
        "repobench-p": (record(input="def f(x):\n", context="# a.py\nimport os\n"),
                        "Please complete the code given below. \n# a.py\nimport os\ndef f(x):\nNext line of code:\n"),
        "lcc": (record(context="x = 1\n", input=""), "Please complete the code given below. \nx = 1\nNext line of code:\n"),
    }
    for task, (rec, prompt) in cases.items():
        item = lb.parse_record(task, "3", rec)
        assert item.prompt == prompt, task
        assert (item.id, item.length, item.answers) == ("id0", 12, rec["answers"])
    trec = lb.parse_record("trec", "0", cases["trec"][0])
    assert trec.all_classes == TREC_CLASSES
    no_id = dict(cases["musique"][0])
    del no_id["_id"], no_id["length"]
    item = lb.parse_record("musique", "7", no_id)
    assert (item.id, item.length) == ("7", None)


def test_jsonl_folder_and_file_load_and_become_eval_items(tmp_path):
    write_jsonl(tmp_path / "musique.jsonl", [record(input=f"Q{i}?", context=f"Passage {i}", answers=[f"A{i}"],
                                                    _id=f"m{i}") for i in range(3)])
    (tmp_path / "extra.jsonl").write_text("")                      # not a task: ignored when selecting all
    write_jsonl(tmp_path / "qmsum.jsonl", [record(input="Summarise.", context="A: hi", answers=["They met."])])
    items = lb.load_longbench("musique", tmp_path)
    assert [it.id for it in items] == ["m0", "m1", "m2"] and items[2].answers == ["A2"]
    assert [it.id for it in lb.load_longbench("musique", tmp_path / "musique.jsonl", limit=2)] == ["m0", "m1"]
    assert lb.available_tasks(tmp_path) == ["musique", "qmsum"]        # the table's order
    out = longbench_items(CharTokenizer(), tmp_path, None, limit=2, budget=10_000)
    assert list(out) == ["musique", "qmsum"] and len(out["musique"]) == 2
    first = out["musique"][0]
    assert "".join(map(chr, first.input_ids[0].tolist())) == lb.TASKS["musique"].template.format(
        context="Passage 0", input="Q0?")
    assert (first.metric, first.max_new_tokens, first.references, first.first_line) == ("qa_f1", 32, ["A0"], False)
    assert out["qmsum"][0].max_new_tokens == 512 and out["qmsum"][0].metric == "rouge_l"
    assert longbench_items(CharTokenizer(), tmp_path, "qmsum", max_new_tokens=20)["qmsum"][0].max_new_tokens == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no LongBench task files"):
        longbench_items(CharTokenizer(), empty)


def test_default_data_folder_still_selects_its_twelve_tasks():
    data = default_data_dir()
    if data is None or not (data / "longbench").is_dir():
        pytest.skip("../shared/data/longbench is absent")
    assert lb.select_tasks(None, data) == [t for t in lb.TASKS if t not in (
        "narrativeqa", "musique", "qmsum", "repobench-p")]


# ---- metrics on known predictions ---------------------------------------------------------------------
@pytest.mark.parametrize("task, prediction, answers, expected", [
    ("narrativeqa", "The Eiffel Tower in Paris", ["Eiffel Tower"], 2 / 3),       # P 2/4, R 2/2
    ("musique", "no idea", ["Eiffel Tower", "the tower"], 0.0),
    ("triviaqa", "Paris\nQuestion: more", ["paris"], 1.0),                       # first line only
    ("qmsum", "the cat sat", ["the cat sat on the mat"], 2 / 3),                  # ROUGE-L: P 1, R 1/2
    ("samsum", "the cat sat on the mat\nDialogue: x", ["the cat sat on the mat"], 1.0),
    ("trec", "Food", ["Food"], 1.0),
    ("trec", "Location or Food", ["Food"], 0.5),
    ("trec", "Other location", ["Location"], 0.0),                               # a class containing the right one
    ("passage_count", "There are 7 or 8 unique paragraphs", ["7"], 0.5),
    ("passage_retrieval_en", "Paragraph 3", ["Paragraph 3"], 1.0),
    ("passage_retrieval_en", "Paragraph 3 or Paragraph 12", ["Paragraph 3"], 0.5),
    ("lcc", "# comment\nreturn x + 1\n", ["return x + 1"], 1.0),                 # comment lines skipped
    ("repobench-p", "return x", ["return x + 1"], 0.8),                           # Indel: 2*8/(8+12)
])
def test_task_metric_on_known_predictions(task, prediction, answers, expected):
    spec = lb.TASKS[task]
    score = best_score(spec.metric, prediction, answers, TREC_CLASSES, spec.first_line)
    assert score == pytest.approx(expected, abs=1e-9)


# ---- malformed records --------------------------------------------------------------------------------
@pytest.mark.parametrize("task, rec, message", [
    ("musique", {"input": "Q?", "context": "c"}, r"missing \['answers'\]"),
    ("musique", record(input="Q?", context="   "), "'context' must be a non-empty string"),
    ("musique", record(input=None, context="c"), "'input' must be a string"),
    ("hotpotqa", record(input="", context="c"), "'input' is empty"),
    ("qasper", record(input="Q?", context="c", answers=[]), "'answers' must be a non-empty list"),
    ("qasper", record(input="Q?", context="c", answers=[3]), "'answers' must be a non-empty list"),
    ("trec", record(input="Q?", context="c", answers=["Food"]), "needs 'all_classes'"),
    ("trec", record(input="Q?", context="c", answers=["Food"], all_classes="Food"), "'all_classes' must be"),
    ("gov_report", record(context="c", length="long"), "'length' must be a non-negative integer"),
    ("lcc", {"gold_answer": "x"}, "origin_prompt.*'input', 'context' and 'answers'"),
    ("lcc", ["not", "an", "object"], "expected an object"),
])
def test_malformed_records_give_clear_errors(task, rec, message):
    with pytest.raises(InputError, match=message):
        lb.parse_record(task, "0", rec)


def test_malformed_jsonl_files_name_the_line(tmp_path):
    path = tmp_path / "qmsum.jsonl"
    path.write_text(json.dumps(record(input="Q?", context="c")) + "\n\n{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"qmsum.jsonl, line 3: not valid JSON"):
        lb.load_longbench("qmsum", tmp_path)
    path.write_text(json.dumps(record(input="Q?", context="c")) + "\n" + json.dumps({"input": "Q?"}) + "\n")
    with pytest.raises(InputError, match=r"line 2: qmsum\[1\]: .*missing \['context', 'answers'\]"):
        lb.load_longbench("qmsum", path)
    path.write_text("\n")
    with pytest.raises(InputError, match="holds no records"):
        lb.load_longbench("qmsum", tmp_path)
    with pytest.raises(InputError, match=r"no narrativeqa.json \(or narrativeqa.jsonl\)"):
        lb.load_longbench("narrativeqa", tmp_path)
    other = tmp_path / "notes.jsonl"
    other.write_text("{}\n")
    with pytest.raises(InputError, match="names no known LongBench task"):
        lb.select_tasks(None, other)
