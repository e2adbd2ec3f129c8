"""Adapters: the only code that knows a model family's internals."""

from .decoder import SUPPORTED as DECODER_ARCHITECTURES
from .decoder import DecoderPatch
from .encoder import ENCODER_ARCHITECTURES, EncoderPatch, encoder_layers, find_family

__all__ = ["DECODER_ARCHITECTURES", "DecoderPatch", "ENCODER_ARCHITECTURES", "EncoderPatch", "encoder_layers",
           "patch_for"]


def patch_for(model, config, method, plan):
    """The patch object for `model`'s architecture (raises `UnsupportedModelError` if none)."""
    if find_family(model) is not None:
        return EncoderPatch(model, config, method, plan)
    return DecoderPatch(model, config, method, plan)
