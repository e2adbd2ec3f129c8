"""TS-DTP: task-specific attention combined with the layer's [CLS] attention, and a learned dynamic
threshold per layer that decides how many tokens each input keeps (BERT-family classifiers).

The network and its checkpoint are `pruners/tsdtp.py`; this scorer loads one, scores with it, and turns its
threshold into keep counts (`keep_counts`), which the encoder adapter uses in place of the schedule's ratio.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, UnsupportedModelError
from ..ops.task_attention import threshold_counts
from ..pruners.tsdtp import TSDTPPruner, batch_counts, check_counts
from .base import ScoreInputs, Scorer, register


def bert_backbone(model: torch.nn.Module) -> torch.nn.Module | None:
    """The BertModel of `model` (itself, or the base model of a Bert*For* head), or None."""
    from transformers import BertModel

    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, BertModel):
            return candidate
    return None


@register
class TaskSpecific(Scorer):
    """Relative log scores of the TS-DTP modules (0 = the uniform share), and the learned threshold as keep
    counts. `counts` ("row" or "batch", from the checkpoint; `set_counts` changes it on a trimmed model)
    says how the threshold becomes counts (`pruners/tsdtp.py`)."""

    name = "tsdtp"
    description = ("TS-DTP: task-specific attention + [CLS] attention, learned dynamic threshold per layer (BERT "
                   "encoders; pruner=DIR from `trimformer train-task`)")
    paper = "TS-DTP: task-specific dynamic token pruning"
    needs = frozenset({"attention", "hidden"})
    applies_to = frozenset({"encoder"})

    def __init__(self, pruner: TSDTPPruner, counts: str | None = None):
        self.pruner = pruner
        self.counts = check_counts(counts if counts is not None else pruner.config.counts)
        # the thresholds as Python floats, read once (not a tensor -> float sync per layer and batch)
        self._thresholds = {layer: float(t) for layer, t in zip(pruner.layers, pruner.threshold.detach().tolist())}

    @classmethod
    def build(cls, config, model, plan: dict[int, float]) -> "TaskSpecific":
        """Load `config.pruner`, check it was trained for this model and covers the schedule's layers."""
        backbone = bert_backbone(model)
        if backbone is None:
            raise UnsupportedModelError(f"method 'tsdtp' prunes BERT-family encoders (BertModel and the Bert*For* "
                                        f"heads); {type(model).__name__} is not one")
        if config.pruner is None:
            raise ConfigError("method 'tsdtp' needs pruner=PATH: a folder (or file) holding tsdtp.safetensors and "
                              "tsdtp.json, written by `trimformer train-task`")
        pruner = TSDTPPruner.load(config.pruner)
        pruner.check_model(backbone.config)
        pruner.check_plan(plan)
        return cls(pruner.to(next(model.parameters()).device))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        with torch.no_grad():
            return self.pruner.relative_scores(inputs.layer, inputs.hidden, inputs.attention, inputs.valid.float())

    def keep_counts(self, layer: int, scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """(B,) tokens kept: per row, the protected ones and those at or above the layer's threshold
        (`counts="row"`), or that batch total spread over the rows (`counts="batch"`, `batch_counts`)."""
        counts = threshold_counts(scores, valid, protected, self._thresholds[layer])
        if self.counts == "batch":
            counts = batch_counts(counts, valid, protected)
        return counts

    def set_counts(self, counts: str) -> None:
        """Turn the threshold into keep counts by `counts` ("row" or "batch") from the next forward on."""
        self.counts = check_counts(counts)
