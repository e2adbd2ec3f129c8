"""What every adapter is: hooks installed on one model family, removed exactly, and the stats they keep.

An adapter is the only code that knows a family's internals. Each subclass says which models it takes
(`matches`), where their layers are (`layers`), and what kind of model they are (`kind`, matched against
the registry's scorers and mechanisms); `install` adds hooks through `self.hooks` and `remove` takes every
one off again, so a failed install or an `untrim` leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..config import TrimConfig
from ..registry import Method
from .hooks import Hooks


class Patch:
    """Base class of the adapters (`patch/llama.py`, `patch/bert.py`, ...)."""

    kind: ClassVar[str]                    # "decoder", "encoder" or "seq2seq"
    architectures: ClassVar[tuple[str, ...]]   # what the adapter takes, for error messages

    def __init__(self, model: torch.nn.Module, config: TrimConfig, method: Method, plan: dict[int, float]):
        self.model = model
        self.config = config
        self.method = method
        self.plan = plan
        self.hooks = Hooks()

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        """Whether this adapter takes `model` (a cheap structural check; `__init__` checks the details)."""
        raise NotImplementedError

    @classmethod
    def layers(cls, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The layers a schedule indexes."""
        raise NotImplementedError

    def install(self) -> None:
        """Add the hooks; on any error remove those added so far and re-raise."""
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    def _install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        """Take every hook and override off (safe to call more than once)."""
        self.hooks.remove()

    def stats(self) -> dict[str, Any]:
        """What the last forward kept (see `trimformer.stats`)."""
        raise NotImplementedError
