"""TS-DTP: task-specific attention combined with the layer's [CLS] attention, and a learned dynamic
threshold per layer that decides how many tokens each input keeps (BERT-family classifiers)."""

from __future__ import annotations

from ..tsdtp import TSDTPScorer, setup_tsdtp
from .base import Scorer, register


@register
class TaskSpecific(TSDTPScorer, Scorer):
    name = "tsdtp"
    description = ("TS-DTP: task-specific attention + [CLS] attention, learned dynamic threshold per layer (BERT "
                   "encoders; pruner=DIR from `trimformer train-task`)")
    paper = "TS-DTP: task-specific dynamic token pruning"
    needs = frozenset({"attention", "hidden"})
    applies_to = frozenset({"encoder"})

    @classmethod
    def build(cls, config, model, plan):
        scorer = setup_tsdtp(config, model, plan)
        return cls(scorer.pruner, scorer.counts)

    def score(self, inputs):
        return TSDTPScorer.__call__(self, inputs)
