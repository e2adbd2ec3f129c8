"""trimformer: compute only the tokens that matter, inside stock Hugging Face models."""

from .api import is_trimmed, stats, trim, untrim
from .config import AdaptiveOptions, EvictOptions, MergeOptions, PruneOptions, TrimConfig
from .errors import (ConfigError, InputError, ModelLoadError, TrimformerError, UnsupportedMethodError,
                     UnsupportedModelError)
from .loading import load_model
from .moved import install as _install_moved
from .registry import METHODS, SCORERS
from .token_pruner import TokenPruner

__all__ = [
    "METHODS",
    "SCORERS",
    "AdaptiveOptions",
    "ConfigError",
    "EvictOptions",
    "InputError",
    "MergeOptions",
    "ModelLoadError",
    "PruneOptions",
    "TrimConfig",
    "TokenPruner",
    "TrimformerError",
    "UnsupportedMethodError",
    "UnsupportedModelError",
    "is_trimmed",
    "load_model",
    "stats",
    "trim",
    "untrim",
]
__version__ = "0.1.0"
_install_moved()
