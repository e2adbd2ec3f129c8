"""LongBench v1, English and code: the task table (LongBench's prompt, generation length and metric per
task), loaders (a folder of MiniLongBench JSON files or of LongBench's own JSONL files, one file, or a
Hugging Face dataset name), and prompts truncated in the middle to a token budget, chat template
applied, as LongBench does.

Two record formats, told apart by their fields:

- MiniLongBench (``../shared/data/longbench/<task>.json``): a dict of examples, each
  ``{"origin_prompt": the full LongBench prompt, "gold": [answers] (trec: {"answers": [...],
  "all_classes": [...]}), "prediction": ignored, "time": ignored}``.
- LongBench (``<task>.jsonl``, one JSON object per line, as in LongBench's ``data/``):
  ``{"input": the question (may be empty where the template has no {input}), "context": the long
  text, "answers": [...], "all_classes": [...] or null, "length": words, "_id": ...}``; the prompt
  is the task's template filled with ``context`` and ``input``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from trimformer.errors import InputError
from ..data import resolve_data_dir

SENTINEL = "<<TRIMFORMER_CONTENT>>"


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    group: str
    metric: str               # a key of metrics.METRICS
    max_new_tokens: int       # LongBench's generation length for the task
    chat: bool = True         # LongBench wraps the prompt in the chat template (not the few-shot and code tasks)
    first_line: bool = False  # the score reads only the first line of the answer
    template: str = ""        # LongBench's prompt, for building it from a Hugging Face record


# Generation lengths, metrics, chat use and prompts as in LongBench (THUDM/LongBench, MIT licence:
# config/dataset2maxlen.json, config/dataset2prompt.json, pred.py, eval.py). LongBench's metric names map to
# metrics.METRICS: qa_f1_score -> qa_f1, rouge_score -> rouge_l, classification_score -> classification,
# count_score -> count, retrieval_score -> retrieval, code_sim_score -> code_sim.
_QA_DOCS = ("Answer the question based on the given passages. Only give me the answer and do not output any "
            "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
            "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
TASKS: dict[str, LongBenchTask] = {t.name: t for t in [
    LongBenchTask("narrativeqa", "single-doc QA", "qa_f1", 128, template=(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:")),
    LongBenchTask("qasper", "single-doc QA", "qa_f1", 128, template=(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the "
        "above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot "
        "be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
        "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}"
        "\n\nAnswer:")),
    LongBenchTask("multifieldqa_en", "single-doc QA", "qa_f1", 64, template=(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")),
    LongBenchTask("hotpotqa", "multi-doc QA", "qa_f1", 32, template=_QA_DOCS),
    LongBenchTask("2wikimqa", "multi-doc QA", "qa_f1", 32, template=_QA_DOCS),
    LongBenchTask("musique", "multi-doc QA", "qa_f1", 32, template=_QA_DOCS),
    LongBenchTask("gov_report", "summarization", "rouge_l", 512, template=(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:")),
    LongBenchTask("qmsum", "summarization", "rouge_l", 512, template=(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:")),
    LongBenchTask("multi_news", "summarization", "rouge_l", 512, template=(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:")),
    LongBenchTask("trec", "few-shot", "classification", 64, chat=False, first_line=True, template=(
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}")),
    LongBenchTask("triviaqa", "few-shot", "qa_f1", 32, chat=False, first_line=True, template=(
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}")),
    LongBenchTask("samsum", "few-shot", "rouge_l", 128, chat=False, first_line=True, template=(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}")),
    LongBenchTask("passage_count", "synthetic", "count", 32, template=(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ")),
    LongBenchTask("passage_retrieval_en", "synthetic", "retrieval", 32, template=(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc."
        "\n\nThe answer is: ")),
    LongBenchTask("lcc", "code", "code_sim", 64, chat=False, template=(
        "Please complete the code given below. \n{context}Next line of code:\n")),
    LongBenchTask("repobench-p", "code", "code_sim", 64, chat=False, template=(
        "Please complete the code given below. \n{context}{input}Next line of code:\n")),
]}

GROUPS: dict[str, list[str]] = {}
for _task in TASKS.values():
    GROUPS.setdefault(_task.group, []).append(_task.name)


@dataclass
class LongBenchItem:
    task: str
    id: str
    prompt: str                          # the full LongBench prompt (context, question, instructions)
    answers: list[str]
    all_classes: list[str] = field(default_factory=list)
    length: int | None = None            # LongBench's `length` (words of the context), when the record has it


def _all_selected(tasks: str | Sequence[str] | None) -> bool:
    return tasks is None or tasks == "" or tasks == "all"


def task_names(tasks: str | Sequence[str] | None) -> list[str]:
    """Validate a task selection ("a,b" or a list; None = all, in the table's order)."""
    if _all_selected(tasks):
        return list(TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise InputError(f"unknown LongBench task(s) {unknown}; known: {', '.join(TASKS)}")
    return names


def _task_file(folder: Path, task: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        if (folder / f"{task}{suffix}").is_file():
            return folder / f"{task}{suffix}"
    return None


def available_tasks(source: str | Path | None = None) -> list[str]:
    """The known tasks that `source` holds, in the table's order: those with a ``<task>.json`` or
    ``<task>.jsonl`` in a folder, the file's own task for a file, every task for a dataset name."""
    if source is not None and Path(source).is_file():
        return [_file_task(Path(source))]
    folder = _local_folder(source)
    if folder is None:
        return list(TASKS)
    return [t for t in TASKS if _task_file(folder, t) is not None]


def select_tasks(tasks: str | Sequence[str] | None, source: str | Path | None = None) -> list[str]:
    """A task selection for `source`: all (None, "" or "all") means every known task it holds."""
    if not _all_selected(tasks):
        return task_names(tasks)
    names = available_tasks(source)
    if not names:
        raise InputError(f"no LongBench task files (<task>.json or <task>.jsonl) in {_local_folder(source)}; "
                         f"known tasks: {', '.join(TASKS)}")
    return names


def _file_task(path: Path) -> str:
    if path.stem not in TASKS:
        raise InputError(f"{path}: the file name names no known LongBench task; known: {', '.join(TASKS)}")
    return path.stem


def _answers(where: str, value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise InputError(f"{where}: {name!r} must be a non-empty list of strings, got {value!r:.200}")
    return list(value)


def parse_record(task: str, key: str, record: dict) -> LongBenchItem:
    """One example -> item: a MiniLongBench example ("origin_prompt", "gold") or a LongBench record
    ("input", "context", "answers"); a clear error names what is wrong."""
    if task not in TASKS:
        raise InputError(f"unknown LongBench task {task!r}; known: {', '.join(TASKS)}")
    if isinstance(record, dict) and "origin_prompt" not in record and {"input", "context", "answers"} & set(record):
        return parse_longbench_record(task, key, record)
    if not isinstance(record, dict) or "origin_prompt" not in record or "gold" not in record:
        raise InputError(f"{task}[{key}]: expected an object with 'origin_prompt' and 'gold' (MiniLongBench) or with "
                         f"'input', 'context' and 'answers' (LongBench), got "
                         f"{sorted(record) if isinstance(record, dict) else type(record).__name__}")
    gold = record["gold"]
    all_classes: list[str] = []
    if isinstance(gold, dict):   # trec: {"answers": [...], "all_classes": [...]}
        all_classes = list(gold.get("all_classes") or [])
        gold = gold.get("answers")
    if isinstance(gold, str):
        gold = [gold]
    if not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
        raise InputError(f"{task}[{key}]: 'gold' must be a non-empty list of strings, got {record['gold']!r:.200}")
    prompt = record["origin_prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{task}[{key}]: 'origin_prompt' must be a non-empty string")
    if TASKS[task].metric == "classification" and not all_classes:
        raise InputError(f"{task}[{key}]: a classification task needs gold.all_classes")
    return LongBenchItem(task, str(key), prompt, gold, all_classes)


def parse_longbench_record(task: str, key: str, record: dict) -> LongBenchItem:
    """One LongBench record (``input``, ``context``, ``answers``, ``all_classes``, ``length``) -> item,
    its prompt the task's template filled in; the id is the record's ``_id``, else `key`."""
    where = f"{task}[{key}]"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in ("input", "context", "answers") if name not in record]
    if missing:
        raise InputError(f"{where}: a LongBench record needs 'input', 'context' and 'answers'; missing {missing}")
    spec = TASKS[task]
    context, question = record["context"], record["input"]
    if not isinstance(context, str) or not context.strip():
        raise InputError(f"{where}: 'context' must be a non-empty string")
    if not isinstance(question, str):
        raise InputError(f"{where}: 'input' must be a string, got {type(question).__name__}")
    if "{input}" in spec.template and not question.strip():
        raise InputError(f"{where}: {task}'s prompt asks a question, but 'input' is empty")
    answers = _answers(where, record["answers"], "answers")
    all_classes = record.get("all_classes") or []
    if not isinstance(all_classes, list) or not all(isinstance(c, str) for c in all_classes):
        raise InputError(f"{where}: 'all_classes' must be null or a list of strings, got {all_classes!r:.200}")
    if spec.metric == "classification" and not all_classes:
        raise InputError(f"{where}: a classification task needs 'all_classes'")
    length = record.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        raise InputError(f"{where}: 'length' must be a non-negative integer, got {length!r:.50}")
    prompt = spec.template.format(context=context, input=question)
    return LongBenchItem(task, str(record.get("_id", key)), prompt, answers, list(all_classes), length)


def load_longbench(task: str, source: str | Path | None = None, limit: int | None = None) -> list[LongBenchItem]:
    """Items of one LongBench task.

    `source`: a folder holding ``<task>.json`` (MiniLongBench) or ``<task>.jsonl`` (LongBench's records;
    default: ``longbench/`` in the project's ``../shared/data``), one such file, or a Hugging Face
    dataset name such as ``THUDM/LongBench`` (needs the `datasets` package and network access).
    `limit`: the first N items."""
    if task not in TASKS:
        raise InputError(f"unknown LongBench task {task!r}; known: {', '.join(TASKS)}")
    if source is not None and Path(source).is_file():
        items = _read_file(task, Path(source))
    else:
        folder = _local_folder(source)
        if folder is not None:
            path = _task_file(folder, task)
            if path is None:
                raise InputError(f"no {task}.json (or {task}.jsonl) in {folder}")
            items = _read_file(task, path)
        else:
            items = _load_hf(task, str(source))
    return items[:limit] if limit is not None else items


def _read_file(task: str, path: Path) -> list[LongBenchItem]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {number}: not valid JSON: {exc}") from exc
            try:
                items.append(parse_record(task, str(len(items)), record))
            except InputError as exc:
                raise InputError(f"{path}, line {number}: {exc}") from exc
        if not items:
            raise InputError(f"{path} holds no records")
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, list):
        pairs = [(str(i), r) for i, r in enumerate(data)]
    elif isinstance(data, dict):
        pairs = sorted(data.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))
    else:
        raise InputError(f"{path}: expected a JSON object of examples, got {type(data).__name__}")
    return [parse_record(task, k, r) for k, r in pairs]


def _local_folder(source: str | Path | None) -> Path | None:
    if source is None:
        return resolve_data_dir(None) / "longbench"
    path = Path(source)
    if path.is_dir():
        return path / "longbench" if (path / "longbench").is_dir() else path
    if path.suffix or path.is_absolute() or str(source).startswith("."):
        raise InputError(f"LongBench data folder {source} does not exist")
    return None  # a Hugging Face dataset name


def _load_hf(task: str, name: str) -> list[LongBenchItem]:
    try:
        import datasets  # noqa: F401  (optional: only for online users)
    except ImportError as exc:
        raise InputError(
            f"{name!r} is not a folder, so it was taken for a Hugging Face dataset name, which needs the "
            "`datasets` package (pip install datasets) and network access; or pass a folder of LongBench JSON files"
        ) from exc
    from datasets import load_dataset

    items = []
    for i, row in enumerate(load_dataset(name, task, split="test")):
        row = dict(row)
        if "origin_prompt" in row and "gold" not in row:
            row["gold"] = row.get("answers")
        items.append(parse_record(task, str(i), row))
    return items


# ---- prompts ------------------------------------------------------------------------------------
def template_parts(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the content: the chat template's head and tail when `chat` and the
    tokenizer has one, else just the tokenizer's own special tokens (a BOS if it adds one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(SENTINEL)
        return (tokenizer(head, add_special_tokens=False)["input_ids"],
                tokenizer(tail, add_special_tokens=False)["input_ids"])
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[len(with_special) - len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)], []
    return [], []


def middle_truncate(ids: Sequence[int], budget: int) -> list[int]:
    """Keep the first budget//2 and the last budget - budget//2 tokens when there are more than `budget`."""
    ids = list(ids)
    if budget < 2:
        raise InputError(f"token budget must be >= 2, got {budget}")
    if len(ids) <= budget:
        return ids
    half = budget // 2
    return ids[:half] + ids[len(ids) - (budget - half):]


def build_prompt(tokenizer, text: str, budget: int = 4096, chat: bool = True) -> torch.Tensor:
    """(1, T) input ids, T <= budget: `text` truncated in the middle so that, wrapped in the chat
    template (when `chat`), the whole prompt fits the budget."""
    head, tail = template_parts(tokenizer, chat)
    room = budget - len(head) - len(tail)
    if room < 16:
        raise InputError(f"token budget {budget} leaves no room for content after the chat template")
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([head + middle_truncate(content, room) + tail])


def item_prompt(tokenizer, item: LongBenchItem, budget: int = 4096, chat: str = "auto") -> torch.Tensor:
    """The prompt of a LongBench item. `chat`: "auto" (as LongBench: chat template on all tasks but the
    few-shot and code ones), "always" or "never"."""
    if chat not in ("auto", "always", "never"):
        raise InputError(f"chat must be auto, always or never, got {chat!r}")
    use_chat = TASKS[item.task].chat if chat == "auto" else chat == "always"
    return build_prompt(tokenizer, item.prompt, budget, use_chat)
