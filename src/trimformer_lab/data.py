"""Where the evaluation data lives: ``../shared/data`` next to the project, or a folder the user names."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def default_data_dir() -> Path | None:
    """$TRIMFORMER_DATA if set, else ``../shared/data`` relative to the project root when it exists."""
    env = os.environ.get("TRIMFORMER_DATA")
    if env:
        return Path(env)
    shared = PROJECT_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


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
