"""The tokens flowing through a decoder's layers during one forward, and where each layer computes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.select import gather_rows


@dataclass
class Live:
    """The tokens flowing through the layers during one forward."""

    positions: torch.Tensor   # (B, Q) original positions
    valid: torch.Tensor       # (B, Q) bool
    source: torch.Tensor      # (B, Q) index in the input sequence, -1 for revived tokens
    cos: torch.Tensor         # (B, Q, hd) rotary embeddings at `positions`
    sin: torch.Tensor         # (B, Q, hd)
    n_input: int              # input tokens of this forward (revived tokens come after them)
    prefill: bool
    in_order: bool = True     # slots sorted by position with no past: the plain causal mask holds
    _n_valid: int | None = None  # valid.sum(), counted once per change of `valid` (every layer reads it)
    _newest: tuple[torch.Tensor, torch.Tensor] | None = None   # `newest()`, until the tokens change

    def n_valid(self) -> int:
        if self._n_valid is None:
            self._n_valid = int(self.valid.sum())
        return self._n_valid

    def all_valid(self) -> bool:
        return self.n_valid() == self.valid.numel()

    def newest(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B, 1), position (B, 1)) of the last input token: the query that decoding scores with."""
        if self._newest is None:
            index = torch.full((self.positions.shape[0], 1), self.n_input - 1, device=self.positions.device)
            self._newest = index, self.positions.gather(1, index)
        return self._newest

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        self.positions = self.positions.gather(1, index)
        self.source = self.source.gather(1, index)
        self.cos = gather_rows(self.cos, index)
        self.sin = gather_rows(self.sin, index)
        self.valid, self._n_valid, self._newest = valid, None, None

    def extend(self, positions, valid, cos, sin) -> None:
        self.positions = torch.cat([self.positions, positions], 1)
        self.valid, self._n_valid, self._newest = torch.cat([self.valid, valid], 1), None, None
        self.source = torch.cat([self.source, torch.full_like(positions, -1)], 1)
        self.cos = torch.cat([self.cos, cos], 1)
        self.sin = torch.cat([self.sin, sin], 1)
        self.in_order = False

    def to(self, device: torch.device) -> None:
        """Follow the layer about to run onto its device (a no-op when it is already there)."""
        if self.positions.device == device:
            return
        for name in ("positions", "valid", "source", "cos", "sin"):
            setattr(self, name, getattr(self, name).to(device))
        self._newest = None


def execution_device(module: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Where `module` computes: the execution device of accelerate's hook on it (`device_map`, CPU or
    disk offload: its weights may wait on the meta device), else `fallback` (its input's device)."""
    hook = module.__dict__.get("_hf_hook")   # accelerate sets it as a plain attribute (no nn.Module lookup)
    for part in getattr(hook, "hooks", (hook,)):       # a SequentialHook holds several
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device(device)   # an int is an index on the machine's accelerator
    return fallback


def cached_slots(cache, layer: int) -> int:
    """Slots in the cache of `layer` (`cache.get_seq_length(layer)`, read straight from an initialised layer's
    keys: the pre-hooks ask once per layer and step)."""
    layers = getattr(cache, "layers", None)
    layer_cache = layers[layer] if layers is not None and layer < len(layers) else None
    if getattr(layer_cache, "is_initialized", False) and getattr(layer_cache, "keys", None) is not None:
        return layer_cache.keys.shape[-2]
    return cache.get_seq_length(layer)
