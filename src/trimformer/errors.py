"""One exception hierarchy for everything trimformer raises on purpose."""


class TrimformerError(Exception):
    """Base class of every error trimformer raises."""


class ConfigError(TrimformerError, ValueError):
    """A trim configuration is invalid (unknown method, ratio out of range, bad schedule...)."""


class UnsupportedModelError(TrimformerError, TypeError):
    """The model's architecture has no trimformer adapter."""


class InputError(TrimformerError, ValueError):
    """The inputs given to a trimmed model cannot be pruned as configured."""


class ModelLoadError(TrimformerError, OSError):
    """A model could not be found or loaded."""


class UnsupportedMethodError(ConfigError, UnsupportedModelError):
    """The method does not run on this kind of model (a decoder method on an encoder, or the reverse)."""
