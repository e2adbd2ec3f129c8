"""A KV-cache layer that appends in place, for caches that evict while decoding (method "runtime").

transformers' `DynamicLayer` concatenates the new token's key and value onto the whole cache at every
step: a fresh allocation and a copy of everything cached, per layer and step. A cache whose size is held
to a budget does not need that: `InPlaceLayer` keeps its keys and values in buffers with room to spare,
writes each new token into the room, and exposes views of the slots in use. Eviction compacts the slots
in place and cuts the views (mechanisms/eviction.py), and the buffers shrink when a large eviction leaves them
mostly empty, so the memory saved is memory given back.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class InPlaceLayer(DynamicLayer):
    """`DynamicLayer` with preallocated room: `update` writes in place instead of concatenating."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: (B, Hkv, Q, hd); returns the cached (B, Hkv, K + Q, hd) views
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, extra = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(n + extra):
            self._reallocate(n, n + extra, key_states)
        self._key_buffer[:, :, n: n + extra] = key_states
        self._value_buffer[:, :, n: n + extra] = value_states
        self.keys = self._key_buffer[:, :, : n + extra]
        self.values = self._value_buffer[:, :, : n + extra]
        return self.keys, self.values

    def _fits(self, needed: int) -> bool:
        """True when `keys` / `values` are still the leading slots of the buffers (nothing outside replaced
        them, e.g. a beam reorder), the buffers have room for `needed` slots, and no more than two spares
        beyond them (an eviction that freed more gets its memory back at the next update)."""
        buffer = getattr(self, "_key_buffer", None)
        if buffer is None or self.keys.numel() == 0:
            return False
        capacity = buffer.shape[-2]
        leading = (self.keys.data_ptr() == buffer.data_ptr() and self.keys.stride() == buffer.stride()
                   and self.values.data_ptr() == self._value_buffer.data_ptr()
                   and self.values.stride() == self._value_buffer.stride())
        return leading and needed <= capacity <= needed + 2 * _spare(needed)

    def _reallocate(self, used: int, needed: int, like: torch.Tensor) -> None:
        shape = (like.shape[0], like.shape[1], needed + _spare(needed), like.shape[3])
        keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        values = torch.empty(shape, dtype=like.dtype, device=like.device)
        if used:
            keys[:, :, :used] = self.keys
            values[:, :, :used] = self.values
        self._key_buffer, self._value_buffer = keys, values

    def nbytes(self) -> int:
        """Memory the layer holds (its buffers, spare room included)."""
        if getattr(self, "_key_buffer", None) is not None and self._fits(self.get_seq_length()):
            return 2 * self._key_buffer.numel() * self._key_buffer.element_size()
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def _spare(needed: int) -> int:
    """Room added on reallocation: an eighth of the size, at least 64 slots (amortised O(1) appends)."""
    return max(64, needed // 8)


def use_in_place(cache) -> None:
    """Swap each plain `DynamicLayer` of `cache` for an `InPlaceLayer` holding the same tensors (other layer
    kinds, e.g. sliding-window ones, are left as they are). The swap copies nothing."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for index, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            swapped = InPlaceLayer.__new__(InPlaceLayer)
            swapped.__dict__.update(layer.__dict__)
            layers[index] = swapped


def kv_bytes(cache) -> int:
    """Memory held by a cache's keys and values (an `InPlaceLayer`'s spare room included)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, InPlaceLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() * 2
    return total
