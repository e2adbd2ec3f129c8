"""SDTP's learned pruner: a two-layer MLP with GELU per pruning stage predicts each token's saliency from
its hidden state (arXiv 2504.04514). Training lives in `trimformer_lab.train`; this module holds the network
and its checkpoint format; `scorers/sdtp.py` scores with it.

A checkpoint is ``NAME.safetensors`` (the weights, one MLP per stage layer, plus the per-dimension mean and
std of the hidden states it was trained on) beside ``NAME.json`` (its config: the model signature, stage
layers, hidden width, how it was trained). A pruner only scores; which tokens are dropped, positions,
cache and revival are the shared per-layer machinery of every method.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

FORMAT = "trimformer-sdtp-pruner"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent


# ---- model signature ----------------------------------------------------------------------------
def model_signature(config) -> dict[str, Any]:
    """What a pruner must match: the architecture family, depth and width of the backbone."""
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


def describe_signature(sig: dict[str, Any]) -> str:
    return f"{sig.get('model_type')} with {sig.get('num_hidden_layers')} layers, hidden size {sig.get('hidden_size')}"


# ---- the network ------------------------------------------------------------------------------
@dataclass
class PrunerConfig:
    signature: dict[str, Any]            # model_signature() of the backbone it was trained for
    layers: list[int]                    # stage layers: one MLP scores the output of each
    hidden: int                          # width of the MLP's hidden layer
    model: str | None = None             # the model name or path it was trained on (informative)
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained (informative)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pruner config") -> "PrunerConfig":
        if data.get("format") != FORMAT:
            raise ConfigError(f"{where} is not an SDTP pruner config (format {data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{where} has format version {data.get('version')!r}; this trimformer reads {FORMAT_VERSION}")
        try:
            return cls(
                signature=dict(data["signature"]),
                layers=[int(x) for x in data["layers"]],
                hidden=int(data["hidden"]),
                model=data.get("model"),
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where} is malformed: {exc}") from exc


class StageMLP(nn.Module):
    """score = w2 . GELU(W1 . (h - mean) / std + b1) + b2 for one stage (the standardisation is a fixed
    affine map of the input, learned from the training data, so this is the paper's two-layer MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:      # (..., D) -> (...)
        x = (h - self.mean) / self.std
        return self.fc2(torch.nn.functional.gelu(self.fc1(x))).squeeze(-1)


class SaliencyPruner(nn.Module):
    """One `StageMLP` per stage layer; ``pruner(hidden, layer)`` gives (B, K) scores."""

    def __init__(self, config: PrunerConfig):
        super().__init__()
        self.config = config
        dim = int(config.signature["hidden_size"])
        self.stages = nn.ModuleDict({str(layer): StageMLP(dim, config.hidden) for layer in config.layers})

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return self.stages[str(layer)](hidden)

    # ---- checkpoint ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write NAME.safetensors and NAME.json (atomically each); return the .safetensors path."""
        from safetensors.torch import save_file

        weights, meta = checkpoint_paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = weights.with_name(weights.name + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT})
        tmp.replace(weights)
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(self.config.to_json())
        tmp.replace(meta)
        return weights

    @classmethod
    def load(cls, path: str | Path) -> "SaliencyPruner":
        """Read a checkpoint written by `save` (either file of the pair, or the name without suffix)."""
        from safetensors.torch import load_file

        weights, meta = checkpoint_paths(path)
        if not weights.exists() or not meta.exists():
            raise ConfigError(
                f"no SDTP pruner at {path}: expected {weights.name} and {meta.name} in {weights.parent} "
                "(train one with `trimformer calibrate saliency` then `trimformer calibrate pruner`)"
            )
        try:
            data = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{meta} is not valid JSON: {exc}") from exc
        config = PrunerConfig.from_dict(data, str(meta))
        pruner = cls(config)
        state = load_file(str(weights))
        try:
            pruner.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{weights} does not match its config {meta.name}: {exc}") from exc
        return pruner.eval()

    # ---- compatibility ------------------------------------------------------------------------
    def check_model(self, model_config, where: str = "this pruner") -> None:
        """Raise ConfigError unless the pruner was trained for a backbone like `model_config`."""
        mine, theirs = self.config.signature, model_signature(model_config)
        if any(mine.get(k) != theirs[k] for k in theirs):
            raise ConfigError(
                f"{where} was trained for {describe_signature(mine)}, but the model is "
                f"{describe_signature(theirs)}; train a pruner for this model with `trimformer calibrate "
                "saliency --model ...` and `trimformer calibrate pruner ...`"
            )

    def check_plan(self, plan: dict[int, float], where: str = "this pruner") -> None:
        missing = sorted(set(plan) - set(self.config.layers))
        if missing:
            raise ConfigError(
                f"the schedule prunes after layer(s) {sorted(plan)}, but {where} has MLPs only for layers "
                f"{self.config.layers} (missing {missing}); use layers among those "
                f"(e.g. layers={self.config.layers[:4]}) or train a pruner with `--layers` covering them"
            )


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """NAME, NAME.safetensors or NAME.json -> (NAME.safetensors, NAME.json)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def shipped_pruners() -> dict[str, Path]:
    """Pruners that ship with trimformer: name -> path of the .safetensors file."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.safetensors")) if p.with_suffix(".json").exists()}


def default_pruner_path(model_config) -> Path:
    """The shipped pruner trained for this model's signature, or a ConfigError saying what to do."""
    sig = model_signature(model_config)
    for name, path in shipped_pruners().items():
        try:
            data = json.loads(path.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if all(data.get("signature", {}).get(k) == v for k, v in sig.items()):
            return path
    shipped = ", ".join(shipped_pruners()) or "none"
    raise ConfigError(
        f"method 'sdtp' needs a pruner checkpoint and none ships for {describe_signature(sig)} "
        f"(shipped: {shipped}); pass pruner=PATH, trained with `trimformer calibrate saliency` and "
        "`trimformer calibrate pruner`"
    )
