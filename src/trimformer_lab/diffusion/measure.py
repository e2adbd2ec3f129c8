"""What one forward costs besides time: its FLOPs (torch's FlopCounterMode, SDPA's CPU kernel included) and
the peak memory it allocates (CUDA's allocator statistics; on CPU, the bytes of the tensors it creates)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

T = TypeVar("T")
aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V, as torch counts its other SDPA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts SDPA's CPU kernel, which torch's table leaves at 0."""
    return FlopCounterMode(display=False,
                           custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop})


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages that aten ops create while the mode is active, live and at their peak.

    A storage counts from the op that returns it until its last tensor is freed; storages that existed
    before (weights, inputs, and views of them) do not count. Memory an op allocates and frees inside its
    kernel (workspace) is not seen, so on CPU this is a lower bound of what the allocator holds."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()   # StorageImpl addresses of the storages counted in `live`

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self._tracked:
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        # a storage's Python object lives exactly as long as the storage itself (torch keeps it alive)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


@dataclass
class Cost:
    flops: int        # whole forward, torch's FLOP formulas (a multiply-add counts 2)
    peak_bytes: int   # the most it held at once on top of what was allocated before it started


def measure(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, Cost]:
    """Run `fn` once, counting its FLOPs and its peak memory on `device`: on CUDA the allocator's peak
    (workspace included), elsewhere `TensorMemory`'s (tensors only)."""
    device = torch.device(device)
    counter = flop_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        with counter:
            out = fn()
        torch.cuda.synchronize(device)
        return out, Cost(counter.get_total_flops(), torch.cuda.max_memory_allocated(device) - start)
    memory = TensorMemory()
    with counter, memory:
        out = fn()
    return out, Cost(counter.get_total_flops(), memory.peak)
