"""Scorers, one per file. Importing a scorer's module registers it (its `@register` decorator): adding a
scorer is its file plus one import line here."""

from . import cls_attention  # noqa: F401
from . import head_tail  # noqa: F401
from . import key_norm  # noqa: F401
from . import last_query  # noqa: F401
from . import random  # noqa: F401
from . import recency  # noqa: F401
from . import sdtp  # noqa: F401
from . import tsdtp  # noqa: F401
from .base import KINDS, NEEDS, SCORERS, ScoreInputs, Scorer, register

__all__ = ["KINDS", "NEEDS", "SCORERS", "ScoreInputs", "Scorer", "register"]
