"""Stage 1 of SDTP: per-token saliency at every decoder layer.

saliency[l, t] = | sum_d  dL/dh[l, t, d] * h[l, t, d] |

where h[l] is the output of decoder layer l (the hidden state a pruner placed after layer l reads) and L
is the language-model loss of the sequence's loss region (mean cross-entropy). The backbone is frozen:
no parameter needs a gradient; only the embeddings' output is made to require one, so that the graph
reaches every layer, and each layer's output keeps its gradient (`retain_grad`) through a forward hook.
Memory stays bounded by gradient checkpointing of the decoder layers (each layer's activations are
recomputed during the backward pass instead of being kept), and the LM head is applied only to the
positions whose prediction is in the loss.

`run_saliency` writes a folder: ``config.json`` (model signature, data, options) and one
``seq_NNNNN.safetensors`` per sequence holding ``input_ids`` (T,), ``saliency`` (L, T) float32,
``loss_start`` () and ``hidden.{l}`` (T, D) float16 for the layers asked for (the pruner's stages).
It is resumable: sequences already written are skipped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from trimformer.errors import ConfigError, InputError
from trimformer.pruners.sdtp import model_signature

from .data import calibration_items, default_sources

FORMAT = "trimformer-saliency"


@dataclass
class SaliencyResult:
    saliency: torch.Tensor               # (B, L, T) float32
    hidden: dict[int, torch.Tensor]      # layer -> (B, T, D) detached outputs of the layers asked for
    loss: float


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Parameters need no gradient inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def layer_checkpointing(model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing of the decoder layers only (the layers' `training` flag is set so transformers
    checkpoints them; their submodules stay in eval mode, so no dropout is switched on)."""
    layers = list(model.model.layers)
    if not enabled:
        yield
        return
    saved = [(layer, layer.training, getattr(layer, "gradient_checkpointing", False),
              getattr(layer, "_gradient_checkpointing_func", None)) for layer in layers]
    try:
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            layer.training = True     # the flag only: not .train(), which would recurse into submodules
        yield
    finally:
        for layer, training, gc, func in saved:
            layer.training = training
            layer.gradient_checkpointing = gc
            if func is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = func


def token_saliency(
    model: torch.nn.Module,
    input_ids: torch.Tensor,                  # (B, T)
    loss_mask: torch.Tensor | None = None,    # (B, T) bool: tokens whose prediction is in the loss (default all but the first)
    attention_mask: torch.Tensor | None = None,
    hidden_layers: Iterable[int] = (),
    checkpointing: bool = True,
) -> SaliencyResult:
    """Saliency of every token at every layer for the LM loss on `loss_mask`'s tokens (each row's loss is
    its own mean cross-entropy, so rows do not weigh on each other)."""
    base = model.model
    layers = list(base.layers)
    batch, length = input_ids.shape
    if loss_mask is None:
        loss_mask = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device)
        loss_mask[:, 0] = False
    loss_mask = loss_mask.bool().clone()
    loss_mask[:, 0] = False                   # the first token is never predicted
    position_ids = None
    if attention_mask is not None:
        valid = attention_mask.bool()
        loss_mask &= valid
        loss_mask[:, 1:] &= valid[:, :-1]      # a token is predicted from a real token, not from padding
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    if not bool(loss_mask.any(-1).all()):
        raise InputError("every row needs at least one token in the loss (loss_mask is empty for some row)")
    keep_hidden = set(int(x) for x in hidden_layers)
    outputs: list[torch.Tensor | None] = [None] * len(layers)

    def embed_hook(module, args, output):
        return output.detach().requires_grad_(True)

    def layer_hook(index):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h.retain_grad()
            outputs[index] = h
        return hook

    handles = [base.embed_tokens.register_forward_hook(embed_hook)]
    handles += [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    try:
        with frozen(model), layer_checkpointing(model, checkpointing), torch.enable_grad():
            out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            hidden = out.last_hidden_state                                      # (B, T, D), normed
            # position t-1 predicts token t: only the positions in the loss go through the LM head
            pred = loss_mask[:, 1:]                                            # (B, T-1)
            rows, cols = pred.nonzero(as_tuple=True)
            logits = model.get_output_embeddings()(hidden[rows, cols])         # (N, V)
            targets = input_ids[rows, cols + 1]
            per_token = F.cross_entropy(logits.float(), targets, reduction="none")
            counts = pred.sum(-1).clamp(min=1).float()
            loss = (per_token / counts[rows]).sum()                            # sum over rows of row means
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    if any(h is None or h.grad is None for h in outputs):
        raise InputError("some decoder layer produced no gradient; is this a Llama-family decoder model?")
    sal = torch.stack([(h.grad * h.detach()).sum(-1).abs() for h in outputs], dim=1).float()   # (B, L, T)
    if attention_mask is not None:
        sal = sal * attention_mask[:, None, :].to(sal.dtype)
    kept = {layer: outputs[layer].detach() for layer in sorted(keep_hidden)}
    return SaliencyResult(sal, kept, float(loss.detach()) / batch)


# ---- stage 1 driver ---------------------------------------------------------------------------
def shard_path(out: Path, index: int) -> Path:
    return out / f"seq_{index:05d}.safetensors"


def run_saliency(
    model,
    tokenizer,
    out: str | Path,
    model_name: str,
    sources: list[str | Path] | None = None,
    sequences: int = 32,
    max_length: int = 2048,
    tail: int = 128,
    hidden_layers: Iterable[int] = (),
    checkpointing: bool = True,
    seed: int = 0,
    progress: bool = True,
    text_share: float = 0.0,
) -> Path:
    """Compute and store the saliency of the calibration sequences in `out` (resumable)."""
    out = Path(out)
    num_layers = len(model.model.layers)
    hidden_layers = sorted(set(int(x) for x in hidden_layers))
    bad = [x for x in hidden_layers if not 0 <= x < num_layers]
    if bad:
        raise ConfigError(f"hidden layers {bad} are out of range for a model with {num_layers} layers (0..{num_layers - 1})")
    sources = [str(Path(s).resolve()) for s in (sources or default_sources())]
    items = calibration_items(tokenizer, sources, sequences, max_length, tail, seed=seed, text_share=text_share)
    config = {
        "format": FORMAT,
        "model": model_name,
        "signature": model_signature(model.config),
        "sources": sources,
        "sequences": len(items),
        "max_length": max_length,
        "tail": tail,
        "text_share": text_share,
        "seed": seed,
        "loss": "mean cross-entropy of the loss region: a prompt's reference answer, or a text chunk's last `tail` tokens",
        "saliency": "|sum_d dL/dh[l,t,d] * h[l,t,d]|, h[l] = output of decoder layer l",
        "hidden_layers": hidden_layers,
        "hidden_dtype": "float16",
        "items": [{"source": it.source, "length": len(it.input_ids), "loss_start": it.loss_start} for it in items],
    }
    meta = out / "config.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if {k: v for k, v in old.items() if k != "checkpointing"} != config:
            raise ConfigError(f"{out} holds saliency computed with other settings; use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({**config, "checkpointing": checkpointing}, indent=2) + "\n")

    device = next(model.parameters()).device
    todo = [i for i in range(len(items)) if not shard_path(out, i).exists()]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="saliency", unit="seq", disable=not progress)
    for i in todo:
        item = items[i]
        ids = torch.tensor([item.input_ids], device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, item.loss_start:] = True
        res = token_saliency(model, ids, mask, hidden_layers=hidden_layers, checkpointing=checkpointing)
        tensors = {
            "input_ids": ids[0].cpu(),
            "saliency": res.saliency[0].cpu().contiguous(),
            "loss_start": torch.tensor(item.loss_start),
        }
        for layer, h in res.hidden.items():
            tensors[f"hidden.{layer}"] = h[0].to(torch.float16).cpu().contiguous()
        tmp = shard_path(out, i).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(shard_path(out, i))
        bar.set_postfix(loss=f"{res.loss:.3f}", tokens=len(item.input_ids))
        bar.update()
    bar.close()
    return out


def load_saliency_dir(path: str | Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(config, [tensors of each sequence]) of a folder written by `run_saliency`."""
    path = Path(path)
    meta = path / "config.json"
    if not meta.exists():
        raise ConfigError(f"{path} is not a saliency folder (no config.json); create one with `trimformer calibrate saliency`")
    config = json.loads(meta.read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{meta} is not a trimformer saliency config (format {config.get('format')!r})")
    shards = [shard_path(path, i) for i in range(int(config["sequences"]))]
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise ConfigError(f"{path} is incomplete ({len(missing)} of {len(shards)} sequences missing, e.g. {missing[0]}); "
                          "rerun the same `trimformer calibrate saliency` command to finish it")
    return config, [load_file(str(p)) for p in shards]
