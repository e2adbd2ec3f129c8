"""Pruna integration: a `token_optimizer` algorithm (PRUNER group) that applies any trimformer method.

    from pruna import SmashConfig, smash
    import trimformer.integrations.pruna as tp

    tp.register()                                      # once: adds the algorithm to Pruna's registry
    config = SmashConfig()
    config["token_optimizer"] = {"method": "tome", "reduction_ratio": 0.3, "adaptive": True}
    smashed = smash(model=model, smash_config=config)

The same dict trims a diffusers pipeline or denoiser (``{"method": "tome", "reduction_ratio": 0.5}``: ToMe
for Stable Diffusion in its transformer blocks; with ``adaptive`` only tokens alike enough merge). Pruna stores the dict as the hyperparameters ``token_optimizer_method``, ``..._reduction_ratio`` and
``..._adaptive`` (and ``..._r``, ``..._options`` for anything else TrimConfig takes, as a dict).
Pruna is optional and is imported only by `register()` / `algorithm_class()`; install it with
``pip install pruna`` in an environment whose torch it can share (pruna 0.3.4 pulls torch 2.14 with CUDA
libraries, so it is not installed in this project's CPU venv; ``benchmarks/pruna_check.sh`` tests this module
against pruna 0.3.4 in an environment of its own).
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import trim
from ..errors import ConfigError
from ..patch.diffusion import DiffusionPatch, denoiser_of
from ..patch.encoder import find_family
from ..patch.gemma3 import Gemma3Patch
from ..patch.llama import SUPPORTED
from ..registry import methods_for

ALGORITHM_NAME = "token_optimizer"
# every method that runs on an encoder, a decoder or a diffusion model (the models `model_supported` takes)
METHODS_OFFERED = tuple(dict.fromkeys(methods_for("encoder") + methods_for("decoder") + methods_for("diffusion")))


def trim_options(values: dict[str, Any]) -> dict[str, Any]:
    """Turn the algorithm's hyperparameters (unprefixed: method, reduction_ratio, adaptive, r, options)
    into `trim` options. ``r`` > 0 merges r tokens per layer instead of using the reduction ratio."""
    options = values.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"token_optimizer options must be a dict of TrimConfig fields, got {options!r}")
    options = dict(options)
    options["method"] = values.get("method", "tome")
    if isinstance(options.get("adaptive"), dict):                 # an adaptive group: the flag switches it on
        options["adaptive"] = {**options["adaptive"], "enabled": bool(values.get("adaptive", False))}
    else:
        options["adaptive"] = bool(values.get("adaptive", False))
    r = values.get("r") or 0
    if r:
        options["r"] = int(r)
    elif "keep" not in options and "r" not in options:
        ratio = values.get("reduction_ratio", 0.3)
        if ratio:
            options["reduction_ratio"] = float(ratio)
    return options


def model_supported(model: Any) -> bool:
    """True for the models trimformer has an adapter for: encoders, Llama-family decoders, and diffusers
    denoisers and the pipelines holding them."""
    denoiser = denoiser_of(model)
    if isinstance(denoiser, torch.nn.Module) and DiffusionPatch.matches(denoiser):
        return True
    model = getattr(model, "model", model) if type(model).__name__.endswith("Pipeline") else model
    return find_family(model) is not None or type(model).__name__ in SUPPORTED + Gemma3Patch.architectures


_CLASS = None


def algorithm_class():
    """The `PrunaAlgorithmBase` subclass (imports pruna; raises ImportError with a hint if it is missing)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from ConfigSpace import CategoricalHyperparameter, UniformFloatHyperparameter, UniformIntegerHyperparameter
        from pruna.algorithms.base.pruna_base import PrunaAlgorithmBase
        from pruna.algorithms.base.tags import AlgorithmTag
        from pruna.config.hyperparameters import Boolean, UnconstrainedHyperparameter
        from pruna.engine.save import SAVE_FUNCTIONS
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "trimformer.integrations.pruna needs Pruna: pip install pruna (it needs a torch Pruna accepts; "
            "see docs/serving.md, 'Pruna')"
        ) from exc

    class TokenOptimizer(PrunaAlgorithmBase):
        """trimformer's token optimizer: ToMe merging, ATS-style adaptive sampling and token pruning inside
        the forward pass of Hugging Face encoders (ViT, DeiT, CLIP vision, BERT), decoders and diffusers
        models (U-Nets and diffusion transformers, alone or in their pipelines)."""

        algorithm_name: str = ALGORITHM_NAME
        group_tags: list = [AlgorithmTag.PRUNER]
        save_fn = SAVE_FUNCTIONS.reapply
        references: dict[str, str] = {
            "ToMe": "https://arxiv.org/abs/2210.09461",
            "ATS": "https://arxiv.org/abs/2111.15667",
            "ToMeSD": "https://arxiv.org/abs/2303.17604",
            "LazyLLM": "https://arxiv.org/abs/2407.14057",
        }
        tokenizer_required: bool = False
        processor_required: bool = False
        dataset_required: bool = False
        runs_on: list[str] = ["cpu", "cuda"]

        def get_hyperparameters(self) -> list:
            return [
                CategoricalHyperparameter("method", choices=list(METHODS_OFFERED), default_value="tome",
                                          meta=dict(desc="trimformer method (tome merges; others prune)")),
                UniformFloatHyperparameter("reduction_ratio", lower=0.0, upper=0.95, default_value=0.3,
                                           meta=dict(desc="share of token-layer work to remove")),
                Boolean(name="adaptive", default=False,
                        meta=dict(desc="ATS: the number of tokens kept depends on the input")),
                UniformIntegerHyperparameter("r", lower=0, upper=512, default_value=0,
                                             meta=dict(desc="tome: tokens merged per layer (0: from the ratio)")),
                UnconstrainedHyperparameter("options", default_value=None,
                                            meta=dict(desc="other TrimConfig fields, as a dict")),
            ]

        def model_check_fn(self, model: Any) -> bool:
            return model_supported(model)

        def _apply(self, model: Any, smash_config: Any) -> Any:
            values = {name: smash_config[name] for name in ("method", "reduction_ratio", "adaptive", "r", "options")}
            target = getattr(model, "model", model) if type(model).__name__.endswith("Pipeline") else model
            trim(target, trim_options(values))
            return model

        def import_algorithm_packages(self) -> dict[str, Any]:
            return {}

    _CLASS = TokenOptimizer
    return _CLASS


def register():
    """Register `token_optimizer` with Pruna (idempotent); returns the algorithm instance."""
    from pruna.algorithms.base.registry import AlgorithmRegistry

    cls = algorithm_class()
    existing = AlgorithmRegistry._registry.get(ALGORITHM_NAME)
    if existing is not None:
        return existing
    instance = cls()
    AlgorithmRegistry.register_algorithm(instance)
    return instance
