"""Adapters: the only code that knows a model family's internals."""

from .decoder import SUPPORTED as DECODER_ARCHITECTURES
from .decoder import DecoderPatch
from .encoder import ENCODER_ARCHITECTURES, EncoderPatch, find_family
from .encoder import encoder_layers as _encoder_layers
from .seq2seq import SEQ2SEQ_ARCHITECTURES, Seq2SeqEncoderPatch, find_seq2seq_encoder

__all__ = ["DECODER_ARCHITECTURES", "DecoderPatch", "ENCODER_ARCHITECTURES", "EncoderPatch", "SEQ2SEQ_ARCHITECTURES",
           "Seq2SeqEncoderPatch", "encoder_layers", "patch_for"]


def encoder_layers(model):
    """The layer list of a supported encoder (or of an encoder-decoder's encoder), or None."""
    layers = _encoder_layers(model)
    if layers is None and find_seq2seq_encoder(model) is not None:
        layers = find_seq2seq_encoder(model)[0].layers
    return layers


def patch_for(model, config, method, plan):
    """The patch object for `model`'s architecture (raises `UnsupportedModelError` if none)."""
    if find_family(model) is not None:
        return EncoderPatch(model, config, method, plan)
    if find_seq2seq_encoder(model) is not None:
        return Seq2SeqEncoderPatch(model, config, method, plan)
    return DecoderPatch(model, config, method, plan)
