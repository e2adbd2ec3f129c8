"""Encoder adapters (being split into `patch/`)."""

from .encoder import ENCODER_ARCHITECTURES, EncoderPatch, find_family
from .seq2seq import SEQ2SEQ_ARCHITECTURES, Seq2SeqEncoderPatch, find_seq2seq_encoder

__all__ = ["ENCODER_ARCHITECTURES", "EncoderPatch", "SEQ2SEQ_ARCHITECTURES", "Seq2SeqEncoderPatch", "find_family",
           "find_seq2seq_encoder"]
