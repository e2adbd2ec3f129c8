"""Adapters: the only code that knows a model family's internals."""

from .decoder import SUPPORTED as DECODER_ARCHITECTURES
from .decoder import DecoderPatch

__all__ = ["DECODER_ARCHITECTURES", "DecoderPatch", "patch_for"]


def patch_for(model, config, method, plan):
    """The patch object for `model`'s architecture (raises `UnsupportedModelError` if none)."""
    return DecoderPatch(model, config, method, plan)
