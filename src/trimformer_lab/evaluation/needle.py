"""Needle in a haystack on Paul Graham essays: a sentence with a number hidden at a chosen depth of a
long prompt, the question at the end. Built at the token level so the needle's position is exact."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from trimformer.errors import InputError

from ..data import default_essay_dir

CITIES = ["Lisbon", "Oslo", "Kyoto", "Nairobi", "Quito", "Tbilisi", "Hanoi", "Dakar", "Perth", "Bergen"]
NEEDLE = "The special magic number for {city} is {number}."
QUESTION = "What is the special magic number for {city} mentioned in the text above?"
ANSWER_PREFIX = "The special magic number for {city} is"
SENTINEL = "<<TRIMFORMER_CONTEXT>>"


@dataclass
class NeedleItem:
    input_ids: torch.Tensor   # (1, T) the whole chat prompt
    answer: str               # the 7-digit number
    needle_start: int         # token index of the needle's first token in input_ids
    needle_end: int           # one past its last token
    context_start: int        # first haystack token
    context_end: int          # one past the last haystack token (question follows)
    depth: float
    length: int
    question: str = ""        # the question asked at the end of the prompt


@lru_cache(maxsize=4)
def load_essays(directory: str | None = None) -> str:
    """All essays concatenated, in file-name order (deterministic)."""
    folder = Path(directory) if directory else default_essay_dir()
    texts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt")) if not p.name.startswith("LICENSE")]
    if not texts:
        raise InputError(f"no .txt essays in {folder}")
    return re.sub(r"\n{3,}", "\n\n", "\n\n".join(texts))


def chat_parts(tokenizer, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids before and after the context in the chat prompt (question, then the start of the
    assistant's answer, after it)."""
    content = f"{SENTINEL}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = content + "\nAnswer:"
    head, tail = (text + answer_prefix).split(SENTINEL)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def make_needle(
    tokenizer,
    length: int,
    depth: float,
    seed: int = 0,
    essays: str | None = None,
) -> NeedleItem:
    """A prompt of exactly `length` tokens with the needle starting at `depth` (0..1) of the haystack,
    moved back to the nearest sentence end so it is not cut into another sentence."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    city = CITIES[rng.randrange(len(CITIES))]
    number = str(rng.randrange(1_000_000, 10_000_000))
    needle_ids = tokenizer(" " + NEEDLE.format(city=city, number=number), add_special_tokens=False)["input_ids"]
    head, tail = chat_parts(tokenizer, QUESTION.format(city=city), ANSWER_PREFIX.format(city=city))
    budget = length - len(head) - len(tail) - len(needle_ids)
    if budget < 16:
        raise InputError(f"length {length} is too short for the chat template, question and needle")
    hay = _haystack_ids(tokenizer, essays)
    if budget > len(hay):
        raise InputError(f"length {length} needs {budget} haystack tokens; the essays hold {len(hay)}")
    hay = hay[:budget]
    cut = _sentence_end_before(tokenizer, hay, int(round(depth * budget)))
    ids = head + hay[:cut] + needle_ids + hay[cut:] + tail
    start = len(head) + cut
    return NeedleItem(
        input_ids=torch.tensor([ids]),
        answer=number,
        needle_start=start,
        needle_end=start + len(needle_ids),
        context_start=len(head),
        context_end=len(head) + budget + len(needle_ids),
        depth=depth,
        length=len(ids),
        question=QUESTION.format(city=city),
    )


MULTI_QUESTION = ("List the special magic numbers for {cities} mentioned in the text above, one per line, "
                  "in that order.")


def make_multi_needle(tokenizer, length: int, count: int, seed: int = 0, essays: str | None = None) -> NeedleItem:
    """A prompt of exactly `length` tokens hiding `count` needles (distinct cities, at random depths between
    5% and 95% of the haystack, each at a sentence end) and asking for all their numbers in a given order.
    `answer` holds the numbers joined by "|" in the order asked; the needle span is the first needle's."""
    if not 2 <= count <= len(CITIES):
        raise InputError(f"a multi-needle prompt holds 2..{len(CITIES)} needles, got {count}")
    rng = random.Random(seed)
    cities = rng.sample(CITIES, count)
    numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in cities]
    question = MULTI_QUESTION.format(cities=f"{', '.join(cities[:-1])} and {cities[-1]}")
    head, tail = chat_parts(tokenizer, question)
    needles = [tokenizer(" " + NEEDLE.format(city=c, number=n), add_special_tokens=False)["input_ids"]
               for c, n in zip(cities, numbers)]
    budget = length - len(head) - len(tail) - sum(map(len, needles))
    hay = _haystack_ids(tokenizer, essays)
    if budget < 16 or budget > len(hay):
        raise InputError(f"length {length} leaves {budget} haystack tokens for {count} needles; the essays hold "
                         f"{len(hay)}")
    offset = (seed * 997) % max(1, len(hay) - budget)
    hay = hay[offset: offset + budget]
    cuts = [_sentence_end_before(tokenizer, hay, int(d * budget)) for d in sorted(rng.uniform(0.05, 0.95)
                                                                                  for _ in cities)]
    ids, previous = list(head), 0
    for cut, needle in zip(cuts, needles):
        ids += hay[previous:cut] + needle
        previous = cut
    ids += hay[previous:] + tail
    start = len(head) + cuts[0]
    return NeedleItem(input_ids=torch.tensor([ids]), answer="|".join(numbers), needle_start=start,
                      needle_end=start + len(needles[0]), context_start=len(head),
                      context_end=len(ids) - len(tail), depth=cuts[0] / budget, length=len(ids), question=question)


@lru_cache(maxsize=4)
def _haystack_cached(tokenizer, essays: str | None) -> tuple[int, ...]:
    return tuple(tokenizer(load_essays(essays), add_special_tokens=False)["input_ids"])


def _haystack_ids(tokenizer, essays: str | None) -> list[int]:
    return list(_haystack_cached(tokenizer, essays))


def _sentence_end_before(tokenizer, hay: list[int], index: int) -> int:
    """The largest i <= index such that hay[i-1] ends a sentence (or 0)."""
    for i in range(min(index, len(hay)), 0, -1):
        piece = tokenizer.decode(hay[i - 1: i])
        if piece.rstrip().endswith((".", "!", "?")):
            return i
    return 0


def found(answer: str, text: str) -> bool:
    """Exact match of the needle's number in the model's answer."""
    return answer in re.sub(r"[,\s]", "", text)
