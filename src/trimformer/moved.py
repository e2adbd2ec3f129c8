"""Module paths that moved: importing one raises an ImportError that names where its contents are now.

Installed by `trimformer/__init__.py` at the end of `sys.meta_path`, so it answers only for names no
real module has.
"""

from __future__ import annotations

import importlib.abc
import sys

LAB = 'in the lab part (pip install -e ".[lab]")'
MOVED = {
    "trimformer.evaluation": f"trimformer_lab.evaluation, {LAB}",
    "trimformer.train": f"trimformer_lab.train, {LAB}",
    "trimformer.bench": f"trimformer_lab.bench, {LAB}",
    "trimformer.demo": f"trimformer_lab.demo, {LAB}",
    "trimformer.distributed": f"trimformer_lab.distributed, {LAB}",
    "trimformer.visualize": f"trimformer_lab.visualize, {LAB}",
    "trimformer.methods": "trimformer.registry (METHODS, get_method) and trimformer.scorers",
    "trimformer.models": "trimformer.patch (one adapter per model family) and trimformer.mechanisms",
    "trimformer.scoring": "trimformer.scorers (one file per scorer) and trimformer.ops (tensor functions)",
    "trimformer.merging": "trimformer.ops.merge",
    "trimformer.tsdtp": "trimformer.pruners.tsdtp (the network) and trimformer.scorers.tsdtp (the scorer)",
    "trimformer.cache": "trimformer.mechanisms.state",
    "trimformer.policy": "trimformer.ops.select",
    "trimformer.flops": "trimformer.ops.flops",
}


class MovedModules(importlib.abc.MetaPathFinder):
    """Answers an import of a moved module with an ImportError naming its replacement."""

    def find_spec(self, name, path, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} has moved: use {MOVED[name]}", name=name)
        return None


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
