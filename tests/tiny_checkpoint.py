"""A tiny random Llama saved as a checkpoint folder with a character-level tokenizer and a chat
template, for the tests that load a model by path (the CLI under torchrun, the HTTP server)."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, make_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline); ids up to the tiny vocabulary's size."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), TINY["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """Write the tiny Llama (seeded) and its tokenizer to `folder`; return it."""
    make_model("llama", seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
