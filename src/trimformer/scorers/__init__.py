"""Scorers, one per file. Importing a scorer's module registers it (the `@register` decorator)."""

from . import cls_attention, head_tail, last_query, random, recency, sdtp, tsdtp
from .base import SCORERS, KINDS, NEEDS, ScoreInputs, Scorer, register

__all__ = ["KINDS", "NEEDS", "SCORERS", "ScoreInputs", "Scorer", "register"]
