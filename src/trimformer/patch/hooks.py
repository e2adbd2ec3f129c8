"""What a patch adds to a model, kept so that it can all be taken off again: hook handles and
per-instance `forward` overrides. Each adapter holds one `Hooks` and calls `remove` on untrim (or when
installing fails half-way), which leaves the modules exactly as they were."""

from __future__ import annotations

from typing import Callable

import torch


class Hooks:
    def __init__(self) -> None:
        self._handles: list = []                       # torch.utils.hooks.RemovableHandle
        self._overridden: list[torch.nn.Module] = []   # modules with an instance-level `forward`

    def add(self, handle) -> None:
        """Keep a handle returned by `register_forward_(pre_)hook`."""
        self._handles.append(handle)

    def override_forward(self, module: torch.nn.Module, forward: Callable) -> None:
        """Replace `module.forward` on this instance only (the class's forward is untouched)."""
        module.forward = forward
        self._overridden.append(module)

    def remove(self) -> None:
        """Remove every hook and override added so far (safe to call more than once)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._overridden:
            if "forward" in module.__dict__:
                del module.forward
        self._overridden.clear()
