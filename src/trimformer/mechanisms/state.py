"""Bookkeeping that travels with a KV cache: which original position each cache slot holds (per layer),
the aux cache of pruned tokens' hidden states, and the counters behind `stats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerSlots:
    """What one layer's KV cache holds, slot by slot (slot order = order of the cache tensors)."""

    positions: torch.Tensor  # (B, K) long: original position of each slot
    valid: torch.Tensor      # (B, K) bool: False for padding and filler slots (always masked)
    known_all_valid: bool | None = None  # `valid.all()` when already known (None: not looked at yet)

    def all_valid(self) -> bool:
        """Whether every slot is valid (looked at once per LayerSlots: `valid` is never changed in place)."""
        if self.known_all_valid is None:
            self.known_all_valid = bool(self.valid.all())
        return self.known_all_valid

    def extend(self, positions: torch.Tensor, valid: torch.Tensor, all_valid: bool | None = None) -> "LayerSlots":
        """These slots followed by `positions` / `valid` (B, N); `all_valid` says `valid.all()` if known."""
        both = self.known_all_valid and all_valid if None not in (self.known_all_valid, all_valid) else None
        return LayerSlots(torch.cat([self.positions, positions], 1), torch.cat([self.valid, valid], 1), both)

    def to(self, device: torch.device) -> "LayerSlots":
        if self.positions.device == device:
            return self
        return LayerSlots(self.positions.to(device), self.valid.to(device), self.known_all_valid)


@dataclass
class AuxEntry:
    """Tokens dropped after one layer: their hidden states wait here until decoding revives them."""

    hidden: torch.Tensor     # (B, N, D) output of the layer they were dropped after
    positions: torch.Tensor  # (B, N) original positions
    slots: torch.Tensor      # (B, N) their slot index in that layer's KV cache
    source: torch.Tensor     # (B, N) their index in the prompt as given (for outputs)
    waiting: torch.Tensor    # (B, N) bool: still pruned (False once revived, or for filler)


@dataclass
class TrimState:
    """Per-sequence state of a trimmed model, attached to the KV cache it describes."""

    num_layers: int
    prompt_lengths: torch.Tensor                        # (B,) real prompt tokens per row
    slots: list[LayerSlots | None] = field(default_factory=list)
    aux: dict[int, AuxEntry] = field(default_factory=dict)
    computed: torch.Tensor | None = None                # (L, B) real prompt tokens each layer computed
    revived: list[int] = field(default_factory=list)    # tokens revived into each layer while decoding
    dropped_for_good: int = 0                           # tokens evicted with no way back (aux off)
    steps: int = 0                                      # decoding forwards seen
    next_position: torch.Tensor | None = None           # (B,) position of each row's next token
    runtime: "RuntimeState | None" = None               # decode-time eviction, when the method evicts

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [None] * self.num_layers
        if self.computed is None:
            self.computed = torch.zeros(self.num_layers, len(self.prompt_lengths), dtype=torch.long)
        if not self.revived:
            self.revived = [0] * self.num_layers

    @classmethod
    def for_untrimmed_cache(cls, num_layers: int, lengths: list[int], batch: int, device) -> "TrimState":
        """State for a cache filled without trimformer: every slot valid, positions 0..K-1."""
        state = cls(num_layers, torch.full((batch,), lengths[0], device=device))
        state.next_position = torch.full((batch,), lengths[0], device=device)
        for layer, k in enumerate(lengths):
            pos = torch.arange(k, device=device).expand(batch, k)
            state.slots[layer] = LayerSlots(pos, torch.ones(batch, k, dtype=torch.bool, device=device), True)
        return state

    def waiting_in_aux(self) -> int:
        """Pruned tokens whose hidden states are still in the aux cache."""
        return int(sum(int(entry.waiting.sum()) for entry in self.aux.values()))


class ShadowLayer:
    """Evicted keys and values of one layer: they can come back at their original positions.

    The tensors live in buffers with room to spare (grown by half when full), so adding a few evicted
    tokens copies only those tokens, not the whole shadow set. The properties are views of the slots in
    use; `valid` is False for filler (slots whose token was readmitted or dropped)."""

    GROWTH = 1.5
    FIELDS = ("keys", "values", "positions", "valid", "scores")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, scores: torch.Tensor):
        # keys, values (B, Hkv, N, hd) post-RoPE, as they were in the cache; positions (B, N) long;
        # valid (B, N) bool; scores (B, N) accumulated attention when evicted (the shadow set's own policy)
        self._keys, self._values = keys, values
        self._positions, self._valid, self._scores = positions, valid, scores
        self.size = positions.shape[1]

    keys = property(lambda self: self._keys[:, :, : self.size])          # (B, Hkv, N, hd)
    values = property(lambda self: self._values[:, :, : self.size])      # (B, Hkv, N, hd)
    positions = property(lambda self: self._positions[:, : self.size])   # (B, N)
    valid = property(lambda self: self._valid[:, : self.size])           # (B, N)
    scores = property(lambda self: self._scores[:, : self.size])         # (B, N)

    def append(self, other: "ShadowLayer") -> None:
        """Add `other`'s slots after the ones in use, growing the buffers if they are full."""
        n, extra = self.size, other.size
        if n + extra > self._positions.shape[1]:
            capacity = max(n + extra, int(self._positions.shape[1] * self.GROWTH) + 1)
            self._keys = _grown(self._keys, 2, n, capacity)
            self._values = _grown(self._values, 2, n, capacity)
            self._positions = _grown(self._positions, 1, n, capacity)
            self._valid = _grown(self._valid, 1, n, capacity)
            self._scores = _grown(self._scores, 1, n, capacity)
        # (slice assignment copies across devices and dtypes itself)
        self._keys[:, :, n: n + extra] = other.keys
        self._values[:, :, n: n + extra] = other.values
        self._positions[:, n: n + extra] = other.positions
        self._valid[:, n: n + extra] = other.valid
        self._scores[:, n: n + extra] = other.scores
        self.size = n + extra

    def bytes(self) -> int:
        """Memory held by the key and value buffers (spare room included)."""
        return self._keys.numel() * self._keys.element_size() + self._values.numel() * self._values.element_size()


def _grown(buffer: torch.Tensor, dim: int, used: int, capacity: int) -> torch.Tensor:
    """A buffer of `capacity` slots along `dim` holding the first `used` slots of `buffer` (the rest zero/False)."""
    shape = list(buffer.shape)
    shape[dim] = capacity
    out = buffer.new_zeros(shape)
    out.narrow(dim, 0, used).copy_(buffer.narrow(dim, 0, used))
    return out


@dataclass
class RuntimeState:
    """Decode-time eviction: accumulated attention per cache slot, the shadow set, and counters
    (per layer; every token that entered a layer is in its cache, in its shadow set, or dropped)."""

    num_layers: int
    scores: list[torch.Tensor | None] = field(default_factory=list)   # (B, K_l) aligned with slots
    shadow: list[ShadowLayer | None] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    readmitted: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)                # layers to evict at the next flush

    def __post_init__(self) -> None:
        for name in ("scores", "shadow"):
            if not getattr(self, name):
                setattr(self, name, [None] * self.num_layers)
        for name in ("seen", "evicted", "readmitted", "dropped"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_layers)

    def in_shadow(self, layer: int) -> int:
        entry = self.shadow[layer]
        return int(entry.valid.sum()) if entry is not None else 0

    def shadow_bytes(self) -> int:
        return sum(entry.bytes() for entry in self.shadow if entry is not None)
