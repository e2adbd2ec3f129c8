"""SDTP: a learned MLP per stage predicts each token's saliency from its hidden state (arXiv 2504.04514)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pruners.sdtp import SaliencyPruner, default_pruner_path
from .base import ScoreInputs, Scorer, register


@register
class LearnedSaliency(Scorer):
    """Predicted saliency from the pruner's MLP for the stage's layer (`pruner=PATH`, or the one shipped
    for the model)."""

    name = "sdtp"
    description = "a learned MLP per stage predicts token saliency from the hidden state (pruner=PATH)"
    paper = "SDTP (Tao et al., 2025)"
    needs = frozenset({"hidden"})
    applies_to = frozenset({"decoder"})
    smooth = True

    def __init__(self, pruner: SaliencyPruner):
        self.pruner = pruner

    @classmethod
    def build(cls, config, model, plan: dict[int, float]) -> "LearnedSaliency":
        """Load `config.pruner` (or the shipped one for this model), check it was trained for this model
        and covers the schedule's layers."""
        path = config.pruner if config.pruner is not None else default_pruner_path(model.config)
        pruner = SaliencyPruner.load(path)
        where = f"the pruner {Path(path).name}"
        pruner.check_model(model.config, where)
        pruner.check_plan(plan, where)
        return cls(pruner)

    @torch.no_grad()
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        hidden = inputs.hidden                                                  # (B, K, D)
        pruner = self.pruner
        param = pruner.stages[str(inputs.layer)].fc1.weight
        if param.device != hidden.device:
            pruner.to(hidden.device)
            param = pruner.stages[str(inputs.layer)].fc1.weight
        return pruner(hidden.to(param.dtype), inputs.layer).float()             # (B, K)
