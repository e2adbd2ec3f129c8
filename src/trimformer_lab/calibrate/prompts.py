"""Calibration prompts: synthetic facts planted in prose that no evaluation uses, a question about one of them
at the end.

The haystack is the English prose of the docstrings of Python's standard library (module, class and function
docstrings read with `ast` from the .py files under ``sysconfig.get_paths()["stdlib"]``, in file-name order;
doctest examples and code-like paragraphs left out). The evaluations use Paul Graham essays, LongBench,
SST-2 / QNLI and WMT16; none of them is docstring text. The facts (`FACTS`) have their own templates and
vocabulary, with four kinds of answers: numbers, mixed letter-digit codes, names and words. Prompt i plants
1, 2 or 3 facts (cycling) at seeded depths and asks about one; the chat template (if the tokenizer has one)
wraps the question, and the answer's opening words end the prompt, so the next token starts the answer.
"""

from __future__ import annotations

import ast
import inspect
import random
import re
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from trimformer.errors import InputError

from ..evaluation.needle import CITIES, chat_parts

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3",
             "ensurepip", "venv", "config-3"}
EXCLUDED = tuple(CITIES) + ("magic number",)     # never in calibration text: the needle eval's words

PEOPLE = ["Marisol", "Teodor", "Ingrid", "Baptiste", "Oluwaseun", "Priya", "Casimir", "Henrike", "Joaquim",
          "Solveig", "Anselm", "Leocadia", "Radomir", "Yevgenia", "Tobiah", "Wilhelmina"]
SURNAMES = ["Kranz", "Fenwick", "Achterberg", "Varga", "Okonkwo", "Lindqvist", "Moreau", "Castellanos",
            "Thorne", "Abernathy", "Szabo", "Whitlock"]
COLOURS = ["amber", "cobalt", "crimson", "ivory", "olive", "saffron", "slate", "teal", "maroon", "indigo"]
ISLANDS = ["Varrow Isle", "Kelmsey", "Port Andrin", "Skerrin", "Tullagh Rock", "Elvenholm", "Marrow Key",
           "Dunsgate", "Fellowmere", "Ostrava Point"]
WORDS = ["marigold", "lantern", "quartz", "juniper", "tangerine", "saddle", "cinnamon", "pebble", "thimble",
         "walnut", "harpoon", "lavender", "meadow", "biscuit"]
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


@dataclass(frozen=True)
class FactKind:
    kind: str
    statement: str      # the planted sentence; {subject} and {value}
    question: str       # asked at the end; {subject}
    answer_prefix: str  # the answer's opening words, ending the prompt; {subject}


FACTS = (
    FactKind("number", "The storage locker rented by {subject} is locker number {value}.",
             "What number is the storage locker rented by {subject}?",
             "The storage locker rented by {subject} is locker number"),
    FactKind("code", "The door code for the {subject} workshop is {value}.",
             "What is the door code for the {subject} workshop?",
             "The door code for the {subject} workshop is"),
    FactKind("name", "The ferry that sails to {subject} is captained by {value}.",
             "Who captains the ferry that sails to {subject}?",
             "The ferry that sails to {subject} is captained by"),
    FactKind("word", "The password for the telescope of {subject} is {value}.",
             "What is the password for the telescope of {subject}?",
             "The password for the telescope of {subject} is"),
)


@dataclass
class CalibrationPrompt:
    input_ids: torch.Tensor                 # (1, T) the whole prompt, ending with the answer's opening words
    answer: str                             # the asked fact's value
    evidence: tuple[int, int]               # [start, end) token span of the asked fact's sentence
    facts: list[tuple[int, int]] = field(default_factory=list)  # spans of every planted fact (asked one included)
    kinds: list[str] = field(default_factory=list)              # kind of each planted fact
    question: str = ""
    answer_prefix: str = ""                 # the answer's opening words, the end of the prompt

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def evidence_mask(self) -> torch.Tensor:
        """(T,) bool: the asked fact's tokens."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[self.evidence[0]: self.evidence[1]] = True
        return mask


# ---- haystack ----------------------------------------------------------------------------------------
def _prose(paragraph: str) -> bool:
    """English prose: long enough, no doctest or code-like lines, mostly letters, none of the eval's words."""
    if len(paragraph) < 80 or ">>>" in paragraph or "::" in paragraph:
        return False
    if any(line.startswith((" ", "\t", "-", "*", "|", "+", "=")) for line in paragraph.splitlines()):
        return False
    letters = sum(c.isalpha() or c in " .,;:'()-\n" for c in paragraph)
    if letters < 0.9 * len(paragraph) or paragraph.count("(") > 4:
        return False
    lowered = paragraph.lower()
    return not any(word.lower() in lowered for word in EXCLUDED)


def stdlib_files() -> list[Path]:
    """The standard library's .py files in path order, without tests, IDLE, site-packages and the like."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        files.append(path)
    return files


def docstring_paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of a module's docstrings (module, classes, functions), in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
                    paragraph = paragraph.strip()
                    if _prose(paragraph):
                        out.append(" ".join(paragraph.split()))
    return out


@lru_cache(maxsize=2)
def haystack_paragraphs(min_chars: int) -> tuple[str, ...]:
    """Docstring paragraphs, in file order, until they hold at least `min_chars` characters (all of them if
    the standard library holds fewer)."""
    out: list[str] = []
    total = 0
    for path in stdlib_files():
        for paragraph in docstring_paragraphs(path):
            out.append(paragraph)
            total += len(paragraph) + 2
        if total >= min_chars:
            break
    if not out:
        raise InputError(f"found no docstring prose under {sysconfig.get_paths()['stdlib']}")
    return tuple(out)


# ---- facts and prompts -------------------------------------------------------------------------------
def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(1000, 100000))
    if kind == "code":
        return (f"{rng.choice(LETTERS)}{rng.randrange(10)}{rng.choice(LETTERS)}-"
                f"{rng.randrange(10)}{rng.randrange(10)}{rng.choice(LETTERS)}")
    if kind == "name":
        return f"{rng.choice(PEOPLE)} {rng.choice(SURNAMES)}"
    return rng.choice(WORDS)


def _subjects(kind: str) -> list[str]:
    return {"number": PEOPLE, "code": COLOURS, "name": ISLANDS, "word": PEOPLE}[kind]


def plant_facts(rng: random.Random, count: int) -> list[tuple[FactKind, str, str]]:
    """`count` facts (kind, subject, value), no two about the same thing."""
    facts, used = [], set()
    while len(facts) < count:
        kind = rng.choice(FACTS)
        subject = rng.choice(_subjects(kind.kind))
        if (kind.kind, subject) in used:
            continue
        used.add((kind.kind, subject))
        facts.append((kind, subject, _value(kind.kind, rng)))
    return facts


def make_prompt(tokenizer, length: int, index: int, seed: int = 0, paragraphs: tuple[str, ...] | None = None,
                offset: int = 0) -> tuple[CalibrationPrompt, int]:
    """Prompt `index` and the paragraph after its haystack: `length` tokens exactly, 1 + index % 3 facts
    planted at sentence ends, the question about one of them at the end. Haystack: `paragraphs` (default:
    the docstrings) from paragraph `offset` on."""
    rng = random.Random(f"{seed}:{index}")
    facts = plant_facts(rng, 1 + index % 3)
    asked = rng.randrange(len(facts))
    kind, subject, value = facts[asked]
    head, tail = chat_parts(tokenizer, kind.question.format(subject=subject),
                            kind.answer_prefix.format(subject=subject))
    fact_ids = [tokenizer(" " + f.statement.format(subject=s, value=v), add_special_tokens=False)["input_ids"]
                for f, s, v in facts]
    budget = length - len(head) - len(tail) - sum(len(f) for f in fact_ids)
    if budget < 32:
        raise InputError(f"length {length} is too short for the question and {len(facts)} facts; give at least "
                         f"{length - budget + 32} tokens")
    hay, offset = _haystack_ids(tokenizer, budget, paragraphs or haystack_paragraphs(budget * 6 + 10_000), offset)
    depths = sorted(rng.uniform(0.1, 0.9) for _ in facts)
    cuts = [_sentence_end_before(tokenizer, hay, int(d * budget)) for d in depths]
    ids, spans, last = list(head), [], 0
    for cut, f in zip(cuts, fact_ids):
        ids += hay[last:cut]
        spans.append((len(ids), len(ids) + len(f)))
        ids += f
        last = cut
    ids += hay[last:] + tail
    prompt = CalibrationPrompt(torch.tensor([ids]), value, spans[asked], spans, [f.kind for f, _, _ in facts],
                               kind.question.format(subject=subject), kind.answer_prefix.format(subject=subject))
    return prompt, offset


def make_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[CalibrationPrompt]:
    """`count` prompts of `length` tokens, each on the next stretch of the docstring prose (it wraps around
    when the prose runs out)."""
    paragraphs = haystack_paragraphs(length * 6 * count + 10_000)    # characters: generous for any tokenizer
    prompts, offset = [], 0
    for i in range(count):
        prompt, offset = make_prompt(tokenizer, length, i, seed, paragraphs, offset)
        prompts.append(prompt)
    return prompts


def _haystack_ids(tokenizer, budget: int, paragraphs: tuple[str, ...], offset: int) -> tuple[list[int], int]:
    """`budget` tokens of prose from paragraph `offset` on (wrapping around), and the next paragraph's index."""
    ids: list[int] = []
    i = offset
    while len(ids) < budget:
        if i - offset > 2 * len(paragraphs) and not ids:
            raise InputError("the docstring prose tokenizes to nothing")
        ids += tokenizer(("\n\n" if ids else "") + paragraphs[i % len(paragraphs)], add_special_tokens=False)["input_ids"]
        i += 1
    return ids[:budget], i % len(paragraphs)


def _sentence_end_before(tokenizer, hay: list[int], index: int) -> int:
    """The largest i <= index with hay[i-1] ending a sentence (or `index` itself when none is near)."""
    for i in range(min(index, len(hay)), max(0, index - 200), -1):
        if tokenizer.decode(hay[i - 1: i]).rstrip().endswith((".", "!", "?")):
            return i
    return index
