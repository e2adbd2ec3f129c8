"""The evaluation's results file: cells of (task, variant, settings) with one record per item, written
atomically after every record and merged under a lock with what other runs wrote to the same file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from trimformer.errors import InputError

FORMAT = "trimformer-eval/1"


class ResultStore:
    """The JSON results file: ``{"format", "results": [rows], "groups": [...], "cells": {key: cell}}``.
    A cell is one (task, variant, settings) with a record per item; written atomically after every
    record, so a killed run loses at most the item it was on."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"format": FORMAT, "results": [], "cells": {}}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.path} exists but is not a results JSON ({exc}); move it away or "
                                 "pass another --json") from exc
            if not isinstance(data, dict) or not isinstance(data.get("cells", {}), dict):
                raise InputError(f"{self.path} is not a trimformer results file")
            data.setdefault("cells", {})
            data.setdefault("results", [])
            self.data = data

    @property
    def cells(self) -> dict[str, Any]:
        return self.data["cells"]

    @staticmethod
    def cell_key(task: str, label: str, fingerprint: dict[str, Any]) -> str:
        digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"{task}|{label}|{digest}"

    def cell(self, task: str, label: str, fingerprint: dict[str, Any], description: dict[str, Any]) -> dict[str, Any]:
        """The cell of (task, variant, settings), reusing a stored one whose fingerprint matches; options
        that exist on only one side (a TrimConfig field added since the cell was run) are ignored, any
        value that differs (a changed default included) makes a new cell."""
        key = self.cell_key(task, label, fingerprint)
        if key in self.cells:
            return self.cells[key]
        for cell in self.cells.values():
            if cell["task"] == task and cell["label"] == label and _compatible(cell.get("fingerprint"), fingerprint):
                return cell
        self.cells[key] = {"task": task, "label": label, **description, "fingerprint": fingerprint, "records": {}}
        return self.cells[key]

    def save(self) -> None:
        """Write the file, first taking in what other runs wrote to it since (under a lock): their
        cells and records, and their summary rows for variants this run does not summarise. Two runs
        on one file (other methods, the same full model) add up instead of overwriting each other."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.path.parent, os.O_RDONLY)   # the lock: the folder itself, so no lock file is left
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            if self.path.exists():
                self._merge(json.loads(self.path.read_text()))
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
            os.replace(tmp, self.path)
        finally:
            os.close(folder)   # releases the lock

    def _merge(self, disk: dict[str, Any]) -> None:
        for key, cell in disk.get("cells", {}).items():
            mine = self.cells.setdefault(key, cell)
            for item_id, record in cell["records"].items():
                mine["records"].setdefault(item_id, record)
        for field_name in ("results", "full", "groups"):
            mine_rows = self.data.get(field_name, [])
            ours = {_row_key(r) for r in mine_rows}
            self.data[field_name] = mine_rows + [r for r in disk.get(field_name, []) if _row_key(r) not in ours]


def _row_key(row: dict[str, Any]) -> tuple:
    """What a summary row is of: its task (or task group) and variant label."""
    return row.get("task", row.get("group")), row.get("label")


def _compatible(old: Any, new: Any) -> bool:
    """Equal, except that dict keys present on one side only are ignored."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(_compatible(old[k], new[k]) for k in old.keys() & new.keys())
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_compatible(a, b) for a, b in zip(old, new))
    return old == new


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
