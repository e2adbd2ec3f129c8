"""GLUE SST-2 and QNLI from ../shared/data (or a folder with the same layout), tokenized for BERT encoders.

* ``sst2``: ``sst2/train.tsv`` and ``sst2/dev.tsv`` (``text<TAB>label``, 1 = positive).
* ``qnli``: only ``qnli/dev.tsv`` (``index, question, sentence, label``) is available here, so it is split
  deterministically: a permutation seeded with `QNLI_SPLIT_SEED` puts 80% in "train" and 20% in "dev"
  (the same split on every machine and every run, whatever the training seed). Labels: entailment = 0,
  not_entailment = 1 (GLUE's order).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from trimformer.errors import InputError

from .data import shared_data_dir

TASKS = ("sst2", "qnli")
SPLITS = ("train", "dev")
QNLI_LABELS = {"entailment": 0, "not_entailment": 1}
QNLI_SPLIT_SEED = 1234
QNLI_TRAIN_SHARE = 0.8


@dataclass(frozen=True)
class Example:
    text: str
    pair: str | None
    label: int


def default_data_dir() -> Path:
    """../shared/data next to the project root."""
    return shared_data_dir()


def load_examples(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """The examples of `task` ("sst2", "qnli") and `split` ("train", "dev"), in file order."""
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, got {task!r}")
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if task == "sst2":
        path = root / "sst2" / f"{split}.tsv"
        rows = _read_tsv(path)
        return [Example(r["text"].strip(), None, int(r["label"])) for r in rows]
    rows = _read_tsv(root / "qnli" / "dev.tsv")
    examples = [Example(r["question"].strip(), r["sentence"].strip(), QNLI_LABELS[r["label"].strip()]) for r in rows]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(QNLI_SPLIT_SEED)).tolist()
    cut = int(len(examples) * QNLI_TRAIN_SHARE)
    chosen = sorted(order[:cut]) if split == "train" else sorted(order[cut:])
    return [examples[i] for i in chosen]


def _read_tsv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise InputError(f"{path} does not exist: pass --data pointing at a folder holding sst2/ and qnli/ "
                         "(see ../shared/data/README.md)")
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def tokenize(tokenizer, examples: list[Example], max_length: int = 128) -> list[dict[str, list[int]]]:
    """One dict per example: input_ids, token_type_ids, label (no padding; `collate` pads)."""
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i], "label": e.label}
            for i, e in enumerate(examples)]


def collate(items: list[dict[str, list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, token_type_ids, attention_mask (B, T) and labels (B,)."""
    width = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    types = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        ids[b, :n] = torch.tensor(x["input_ids"])
        types[b, :n] = torch.tensor(x["token_type_ids"])
        mask[b, :n] = 1
    labels = torch.tensor([x["label"] for x in items], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


def length_batches(items: list[dict], batch: int) -> list[list[dict]]:
    """Batches of `batch` items of similar length (sorted by length, stable): little padding, for inference."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    return [[items[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]


def training_batches(items: list[dict], batch: int, generator: torch.Generator, bucket: int = 50) -> list[list[dict]]:
    """One epoch of shuffled batches, length-bucketed: shuffle, sort chunks of `bucket` batches by length,
    cut, shuffle the batches. Deterministic under `generator`."""
    order = torch.randperm(len(items), generator=generator).tolist()
    batches = []
    for s in range(0, len(order), batch * bucket):
        chunk = sorted(order[s:s + batch * bucket], key=lambda i: len(items[i]["input_ids"]))
        batches += [[items[i] for i in chunk[k:k + batch]] for k in range(0, len(chunk), batch)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]
