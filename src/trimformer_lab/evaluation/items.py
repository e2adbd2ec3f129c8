"""An evaluation item: one prompt, its references and the metric that scores an answer to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics


@dataclass
class EvalItem:
    """One prompt with what scores its answer."""

    task: str
    id: str
    input_ids: torch.Tensor          # (1, T)
    references: list[str]
    metric: str                      # a key of metrics.METRICS, or "fidelity"
    max_new_tokens: int
    all_classes: list[str] = field(default_factory=list)
    first_line: bool = False         # score only the first line (and stop decoding after it)
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, prediction: str) -> float:
        return metrics.best_score(self.metric, prediction, self.references, self.all_classes, self.first_line)
