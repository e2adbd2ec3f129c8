"""What every scorer is: a small class that turns what it declares it needs into a score per live token.

A scorer answers one question, "how much does each live token matter here?", as a (batch, tokens) tensor
where higher means keep. It never decides how many tokens to keep or what happens to the others: that is
a mechanism's job (`trimformer.mechanisms`). The adapter of a model family fills `ScoreInputs` with what
the scorer's `needs` names, and only that, so a scorer that needs no attention costs no attention probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

# What a scorer may declare in `needs` (anything else is an error at registration):
#   "attention"  pooled attention of the scoring queries over the live tokens (decoders: the last
#                `window` queries; encoders: the [CLS] query), (B, K)
#   "keys"       the layer's post-RoPE keys of the live tokens, (B, Hkv, K, hd)
#   "hidden"     the layer's output for the live tokens, (B, K, D)
#   "positions"  original positions, validity and prompt lengths (always given; declaring it documents it)
NEEDS = frozenset({"attention", "keys", "hidden", "positions"})
# The kinds of model a scorer can run on, matched against an adapter's `kind`.
KINDS = frozenset({"decoder", "encoder", "seq2seq"})


@dataclass
class ScoreInputs:
    """Everything a scorer may read at one pruning layer, for the live tokens (K of them per row)."""

    layer: int
    positions: torch.Tensor          # (B, K) original positions of the live tokens
    valid: torch.Tensor              # (B, K) bool, False for padding and filler slots
    lengths: torch.Tensor            # (B,) real prompt length of each row
    hidden: torch.Tensor             # (B, K, D) output of the layer
    attention: torch.Tensor | None   # (B, K) pooled attention, when the scorer needs "attention"
    seed: int
    keys: torch.Tensor | None = None  # (B, Hkv, K, hd) post-RoPE keys, when the scorer needs "keys"


SCORERS: dict[str, type["Scorer"]] = {}


def register(cls: type["Scorer"]) -> type["Scorer"]:
    """Class decorator: make a scorer known by its `name` (its module is imported in `scorers/__init__.py`)."""
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise TypeError(f"scorer {cls.__name__} declares unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    bad_kinds = set(cls.applies_to) - KINDS
    if bad_kinds or not cls.applies_to:
        raise TypeError(f"scorer {cls.__name__} applies to {sorted(cls.applies_to)}; choose among {sorted(KINDS)}")
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise TypeError(f"two scorers are named {cls.name!r}: {SCORERS[cls.name].__name__} and {cls.__name__}")
    SCORERS[cls.name] = cls
    return cls


class Scorer:
    """Base class: set the class attributes, override `score`; `build` when the scorer holds state.

    Register a subclass with `@register` and import its module in `scorers/__init__.py`; its `name` then
    works as a method
    (``trim(model, method=name)``: prefill dropping scored by it) and as ``scorer=name`` beside any
    mechanism whose needs it meets.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""                       # where the idea comes from, for `trimformer methods`
    needs: ClassVar[frozenset[str]] = frozenset()   # see NEEDS
    applies_to: ClassVar[frozenset[str]] = frozenset({"decoder"})   # see KINDS
    smooth: ClassVar[bool] = False                  # span max-pool the scores (keeps a needle's sentence whole)

    @classmethod
    def build(cls, config: Any, model: torch.nn.Module, plan: dict[int, float]) -> "Scorer":
        """The scorer for one trim of `model` with `config` and its {layer: keep} `plan`; may raise ConfigError."""
        return cls()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """(B, K) importance of each live token; higher is kept first. Values at invalid slots are ignored."""
        raise NotImplementedError

    def __call__(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.score(inputs)
