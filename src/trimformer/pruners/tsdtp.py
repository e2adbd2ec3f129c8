"""TS-DTP, task-specific dynamic token pruning: the learned part and its checkpoint.

At each pruning layer a `TaskSpecificAttention` module (a task weight matrix W (D, R) and a feature layer
D -> R) gives every live token the task-specific attention it receives; that is mixed with the layer's own
[CLS] attention (a learned share per layer) and compared with a learned per-layer threshold relative to
the uniform share: tokens below it are dropped, so how many a row keeps depends on the row. Training
(`trimformer_lab.train.tsdtp`) fits these modules with the backbone and its classification head, under soft
masks and an auxiliary loss on the kept share; at inference the BERT adapter drops tokens for real
(`trim(model, method="tsdtp", pruner=DIR)`, scored by `scorers/tsdtp.py`).

A checkpoint is ``tsdtp.safetensors`` (the modules, mixes and thresholds) beside ``tsdtp.json`` (the model
signature, the layers, the rank, how the threshold becomes keep counts and how it was trained), usually in
the folder of the fine-tuned model.

How the threshold becomes keep counts at inference (``counts``):

* ``"row"``: each row keeps its protected tokens and every token at or above the threshold (TS-DTP's
  per-row rule; a row's result does not depend on its batch). A padded batch is then as wide as the row
  that keeps the most, so on a batch the compute follows the widest row, not the kept share.
* ``"batch"``: the threshold sets the batch's budget (the tokens it passes, summed over the rows); the
  budget is spread over the rows in proportion to their droppable live tokens, and each row keeps its
  best-scored ones. The batch is then about as wide as the kept share says, so the time follows the share;
  a row's kept set depends on the rest of its batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.task_attention import combine, relative_log_scores, task_attention
from .sdtp import describe_signature, model_signature

FORMAT = "trimformer-tsdtp"
FORMAT_VERSION = 1
WEIGHTS, META = "tsdtp.safetensors", "tsdtp.json"
COUNTS = ("row", "batch")        # how the threshold becomes keep counts at inference (module docstring)
# the attribute `trimformer.trim` keeps a trimmed model's adapter under (`trimformer.api.PATCH_ATTR`; the api
# imports the registry, which imports this module through the scorers, so it is named here, not imported)
PATCH_ATTR = "_trimformer_patch"


def check_counts(counts: str) -> str:
    if counts not in COUNTS:
        raise ConfigError(f"TS-DTP counts must be one of {COUNTS} (row: per-row threshold; batch: the "
                          f"threshold's budget spread over the batch), got {counts!r}")
    return counts


@dataclass
class TSDTPConfig:
    signature: dict[str, Any]            # model_signature() of the backbone
    layers: list[int]                    # tokens are dropped inside these layers (after attention, before MLP)
    rank: int                            # width R of the task-specific attention
    task: str | None = None              # informative: the task it was trained on
    training: dict[str, Any] = field(default_factory=dict)   # informative: how it was trained
    counts: str = "row"                  # "row" or "batch": how the threshold becomes keep counts (see above)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "TSDTPConfig":
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where} is not a TS-DTP checkpoint config (format {data.get('format')!r} version "
                              f"{data.get('version')!r}; expected {FORMAT!r} version {FORMAT_VERSION})")
        names = {f for f in cls.__dataclass_fields__}
        config = cls(**{k: v for k, v in data.items() if k in names})
        try:
            check_counts(config.counts)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return config


class TaskSpecificAttention(nn.Module):
    """One pruning layer's task-specific attention: W_task (D, R) and a feature layer D -> R."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.task_weight = nn.Parameter(torch.randn(hidden, rank) / math.sqrt(hidden))
        self.feature_layer = nn.Linear(hidden, rank)

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), keep (B, T) weights -> (B, T) task-specific attention received."""
        return task_attention(hidden @ self.task_weight, self.feature_layer(hidden), keep)


class TSDTPPruner(nn.Module):
    """The TS-DTP modules of one backbone: per pruning layer, task attention, a mix and a threshold."""

    def __init__(self, config: TSDTPConfig):
        super().__init__()
        if not config.layers or sorted(set(config.layers)) != list(config.layers):
            raise ConfigError(f"TS-DTP layers must be a non-empty increasing list, got {config.layers!r}")
        check_counts(config.counts)
        self.config = config
        hidden = int(config.signature["hidden_size"])
        self.attention = nn.ModuleDict({str(layer): TaskSpecificAttention(hidden, config.rank)
                                        for layer in config.layers})
        self.mix_logit = nn.Parameter(torch.zeros(len(config.layers)))   # sigmoid: share of the layer's attention
        # on log(score x live tokens); it starts at -1 (keep tokens above 0.37 x the uniform share) so that
        # training begins close to the unpruned model
        self.threshold = nn.Parameter(torch.full((len(config.layers),), -1.0))

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def relative_scores(self, layer: int, hidden: torch.Tensor, layer_attention: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
        """(B, T) log(combined score x live tokens) at `layer`: hidden (B, T, D) after the attention block,
        layer_attention (B, T) the [CLS] attention over heads, keep (B, T) weights."""
        stage = self.layers.index(layer)
        task = self.attention[str(layer)](hidden.to(self.threshold.dtype), keep)
        mixed = combine(layer_attention, task, torch.sigmoid(self.mix_logit[stage]))
        return relative_log_scores(mixed, keep)

    def stage_threshold(self, layer: int) -> torch.Tensor:
        return self.threshold[self.layers.index(layer)]

    # ---- checkpoint ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        weights, meta = checkpoint_paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(weights))
        meta.write_text(self.config.to_json())
        return weights, meta

    @classmethod
    def load(cls, path: str | Path) -> "TSDTPPruner":
        from safetensors.torch import load_file

        weights, meta = checkpoint_paths(path)
        if not weights.exists() or not meta.exists():
            raise ConfigError(f"no TS-DTP checkpoint at {path}: expected {weights} and {meta} "
                              "(written by `trimformer train-task`)")
        pruner = cls(TSDTPConfig.from_dict(json.loads(meta.read_text()), str(meta)))
        pruner.load_state_dict(load_file(str(weights)))
        return pruner.eval()

    def check_model(self, model_config) -> None:
        sig = model_signature(model_config)
        if sig != self.config.signature:
            raise ConfigError(f"this TS-DTP checkpoint was trained for a {describe_signature(self.config.signature)}, "
                              f"not this {describe_signature(sig)}")

    def check_plan(self, plan: dict[int, float]) -> None:
        extra = sorted(set(plan) - set(self.layers))
        if extra:
            raise ConfigError(f"the TS-DTP checkpoint has modules for layers {self.layers}; the schedule names "
                              f"{extra}: pass layers={self.layers} (or a subset)")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """A folder -> its tsdtp.safetensors / tsdtp.json; a file path with or without suffix -> its pair."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS, path / META
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def batch_counts(counts: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """(B,) per-row keep counts with the same batch total as `counts`, spread over the rows in proportion
    to their droppable (live, unprotected) tokens: row b keeps its protected tokens plus share x droppable_b,
    share = the batch's kept droppable tokens / its droppable tokens, rounded by largest remainder (ties to
    the earlier row) so the total is exact. In a batch of similar lengths every row then keeps about the
    same number, so the padded width follows the kept share."""
    n_protected = (protected & valid).sum(-1)
    droppable = valid.sum(-1) - n_protected                                   # (B,)
    total = int(droppable.sum())
    if total == 0:
        return counts
    budget = int((counts - n_protected).clamp(min=0).minimum(droppable).sum())
    exact = droppable.double() * budget / total
    spread = exact.floor().long()
    left = budget - int(spread.sum())
    if left > 0:
        order = torch.sort(-(exact - spread.double()), stable=True).indices[:left]
        spread[order] += 1
    return n_protected + spread.minimum(droppable)


def set_counts(model: torch.nn.Module, counts: str) -> None:
    """Switch a model trimmed with method "tsdtp" to `counts` ("row" or "batch") until `untrim`.

    The trimmed model's adapter holds the scorer (`patch.scorer`, a `scorers.tsdtp.TaskSpecific`), whose
    `set_counts` takes the new mode. The adapter is the one `trimformer.trim` keeps on the model under
    `PATCH_ATTR` (`trimformer.api` reads the same attribute)."""
    check_counts(counts)
    patch = getattr(model, PATCH_ATTR, None)
    setter = getattr(getattr(patch, "scorer", None), "set_counts", None)
    if setter is None:
        raise ConfigError("set_counts needs a model trimmed with method='tsdtp'")
    setter(counts)
