"""Stage 2 of SDTP: train one two-layer MLP per pruning stage to predict token saliency.

For a stage after layer l, the MLP reads h[l] (the output of layer l, what `ScoreInputs.hidden` holds at
inference) and is trained on the saliency of that same hidden state, as in the paper (the saliency of the
input of the layer holding the pruning module): dL/dh[l] already accounts for every later layer that reads
the token, which is what dropping it after layer l takes away. (``target="after"`` instead averages the
normalised saliency of layers l..L-1.)

Loss per stage = mse_weight * MSE(p, normalised saliency) + rank_weight * mean over sampled pairs of
log(1 + exp(-(p_i - p_j) * sign(s_i - s_j))). The normalised saliency is log(s + eps) standardised within
each sequence (saliency is heavy-tailed: a raw-scale MSE would fit only the largest few tokens). The
paper's optional third term, the LM loss under Gumbel-softmax keep masks, is not implemented.

Training tokens: the prompt part of each sequence (before its loss region) minus the first `sinks` tokens
(always kept at inference, and with saliency orders of magnitude above the rest).

Deterministic under `seed` (initial weights, the split, each epoch's order and pairs come from generators
seeded by (seed, epoch)); checkpointed after every epoch, and resumable from that checkpoint with the same
result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trimformer.errors import ConfigError
from trimformer.loading import load_model
from trimformer.pruners.sdtp import (PrunerConfig, SaliencyPruner, checkpoint_paths, describe_signature,
                                        model_signature)

from .saliency import load_saliency_dir

TARGETS = ("stage", "after")


@dataclass
class TrainOptions:
    layers: list[int] | None = None     # stage layers; None: the saliency folder's hidden layers
    hidden: int | None = None           # MLP width; None: hidden_size // 4
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.01
    mse_weight: float = 1.0
    rank_weight: float = 1.0
    pairs: int = 4096                   # sampled pairs per sequence, stage and step
    target: str = "stage"               # "stage": saliency of h[l]; "after": mean over layers l..L-1
    sinks: int = 4                      # first tokens left out of training (protected at inference)
    val_fraction: float = 0.125         # sequences held out for the validation metrics
    seed: int = 0
    sources: list[str] | None = None    # train only on the sequences whose source starts with one of these

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.mse_weight < 0 or self.rank_weight < 0 or self.mse_weight + self.rank_weight == 0:
            raise ConfigError("mse_weight and rank_weight must be >= 0 and not both 0")
        for name in ("epochs", "pairs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


# ---- losses ---------------------------------------------------------------------------------------
def ranking_loss(p: torch.Tensor, s: torch.Tensor, i: torch.Tensor, j: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """sum over pairs (i, j) of log(1 + exp(-(p_i - p_j) * sign(s_i - s_j))); pairs with s_i == s_j carry
    no order and are left out. ``reduction="mean"`` divides by the number of pairs kept."""
    sign = torch.sign(s[i] - s[j])
    keep = sign != 0
    terms = F.softplus(-(p[i] - p[j]) * sign)[keep]
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def normalise_saliency(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., T) saliency -> log(s + eps) standardised over the `mask`ed tokens (eps = 1e-3 x their mean)."""
    sel = s[..., mask]
    eps = 1e-3 * sel.mean(-1, keepdim=True).clamp(min=1e-30)
    logs = torch.log(s + eps)
    vals = logs[..., mask]
    mean, std = vals.mean(-1, keepdim=True), vals.std(-1, keepdim=True).clamp(min=1e-6)
    return (logs - mean) / std


# ---- data -----------------------------------------------------------------------------------------
@dataclass
class _Seq:
    hidden: dict[int, torch.Tensor]   # stage layer -> (N, D) float16, training tokens only
    target: dict[int, torch.Tensor]   # stage layer -> (N,) normalised saliency (MSE target)
    order: dict[int, torch.Tensor]    # stage layer -> (N,) the values whose order the ranking loss follows


def _recompute_hidden(model, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach()
        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model.model(input_ids=ids[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: captured[layer][0].to(torch.float16).cpu() for layer in layers}


def _prepare(config: dict, seqs: list[dict], layers: list[int], opts: TrainOptions, model=None, progress=True) -> list[_Seq]:
    num_layers = int(config["signature"]["num_hidden_layers"])
    missing = [layer for layer in layers if f"hidden.{layer}" not in seqs[0]]
    if missing and model is None:
        print(f"[trimformer] the saliency folder has no hidden states for layers {missing}; "
              f"recomputing them with {config['model']}", flush=True)
        model, _ = load_model(config["model"])
    if missing:
        if model_signature(model.config) != config["signature"]:
            raise ConfigError(f"the model given to recompute hidden states is not the one the saliency came from "
                              f"({describe_signature(config['signature'])})")
    out = []
    for seq in tqdm(seqs, desc="prepare", unit="seq", disable=not progress or not missing):
        ids, sal = seq["input_ids"], seq["saliency"].float()
        length = ids.shape[0]
        mask = torch.zeros(length, dtype=torch.bool)
        mask[min(opts.sinks, length):int(seq["loss_start"])] = True
        if int(mask.sum()) < 2:
            continue
        extra = _recompute_hidden(model, ids, missing) if missing else {}
        z = normalise_saliency(sal, mask)                                  # (L, T)
        hidden, target, order = {}, {}, {}
        for layer in layers:
            h = seq[f"hidden.{layer}"] if layer not in extra else extra[layer]
            hidden[layer] = h[mask].to(torch.float16)
            if opts.target == "stage":
                t = z[layer]
                o = sal[layer]
            else:
                t = z[layer:num_layers].mean(0)
                t = (t - t[mask].mean()) / t[mask].std().clamp(min=1e-6)
                o = t
            target[layer], order[layer] = t[mask].float(), o[mask].float()
        out.append(_Seq(hidden, target, order))
    if not out:
        raise ConfigError("no sequence in the saliency folder has training tokens (prompt longer than the sinks)")
    return out


# ---- training -------------------------------------------------------------------------------------
@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _stage_loss(pruner, seq: _Seq, layer: int, opts: TrainOptions, gen: torch.Generator) -> tuple[torch.Tensor, float, float]:
    p = pruner(seq.hidden[layer].float(), layer)
    mse = F.mse_loss(p, seq.target[layer])
    n = p.shape[0]
    i = torch.randint(0, n, (opts.pairs,), generator=gen)
    j = torch.randint(0, n, (opts.pairs,), generator=gen)
    rank = ranking_loss(p, seq.order[layer], i, j, reduction="mean")
    return opts.mse_weight * mse + opts.rank_weight * rank, float(mse.detach()), float(rank.detach())


@torch.no_grad()
def evaluate(pruner, seqs: list[_Seq], layers: list[int], keep: float = 0.5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per stage: pairwise order accuracy against the saliency, and recall@keep (share of the top `keep`
    tokens by saliency that are in the top `keep` by prediction), averaged over sequences."""
    gen = _generator(seed, 10**6)
    result = {}
    for layer in layers:
        accs, recalls = [], []
        for seq in seqs:
            p, s = pruner(seq.hidden[layer].float(), layer), seq.order[layer]
            n = p.shape[0]
            i, j = torch.randint(0, n, (8192,), generator=gen), torch.randint(0, n, (8192,), generator=gen)
            sign = torch.sign(s[i] - s[j])
            ok = sign != 0
            accs.append(float(((p[i] - p[j]) * sign > 0)[ok].float().mean()))
            k = max(1, math.ceil(keep * n))
            top_s = set(s.topk(k).indices.tolist())
            top_p = set(p.topk(k).indices.tolist())
            recalls.append(len(top_s & top_p) / k)
        result[str(layer)] = {"pair_acc": sum(accs) / len(accs), f"recall@{keep}": sum(recalls) / len(recalls)}
    return result


def _resume_path(out: str | Path) -> Path:
    weights, _ = checkpoint_paths(out)
    return weights.with_name(weights.name[: -len(".safetensors")] + ".resume.pt")


def train_pruner(
    saliency_dir: str | Path,
    out: str | Path,
    options: TrainOptions | None = None,
    model=None,
    resume: bool = True,
    progress: bool = True,
) -> tuple[SaliencyPruner, History]:
    """Train a pruner on a stage-1 folder; write OUT.safetensors + OUT.json after every epoch (and
    OUT.resume.pt, the optimizer state, to resume from). `model` is only needed when the folder lacks the
    hidden states of a stage layer (they are then recomputed; by default the model named in the folder
    is loaded)."""
    opts = options or TrainOptions()
    opts.validate()
    config, raw = load_saliency_dir(saliency_dir)
    if opts.sources:
        picked = [k for k, item in enumerate(config["items"]) if any(item["source"].startswith(p) for p in opts.sources)]
        if not picked:
            known = sorted({item["source"].split(":")[0].split("#")[0] for item in config["items"]})
            raise ConfigError(f"no sequence of {saliency_dir} comes from {opts.sources}; its sources: {known}")
        raw = [raw[k] for k in picked]
    sig = config["signature"]
    num_layers = int(sig["num_hidden_layers"])
    layers = sorted(set(opts.layers if opts.layers is not None else config.get("hidden_layers") or []))
    if not layers:
        raise ConfigError("no stage layers: pass layers (--layers) or compute saliency with --hidden-layers")
    bad = [x for x in layers if not 0 <= x <= num_layers - 2]
    if bad:
        raise ConfigError(f"stage layers {bad} out of range: prune after layers 0..{num_layers - 2} of {num_layers}")
    opts.layers = layers
    hidden = opts.hidden or max(8, int(sig["hidden_size"]) // 4)
    opts.hidden = hidden

    seqs = _prepare(config, raw, layers, opts, model=model, progress=progress)
    split = torch.randperm(len(seqs), generator=_generator(opts.seed, -1)).tolist()
    n_val = int(round(opts.val_fraction * len(seqs))) if len(seqs) > 1 else 0
    val = [seqs[k] for k in sorted(split[:n_val])]
    train = [seqs[k] for k in sorted(split[n_val:])]

    with torch.random.fork_rng():                       # seeded initial weights, global RNG untouched
        torch.manual_seed(opts.seed)
        pruner = SaliencyPruner(PrunerConfig(
            signature=sig, layers=layers, hidden=hidden, model=config.get("model"),
            training={**asdict(opts), "saliency": str(Path(saliency_dir).resolve()), "sequences": len(train),
                      "val_sequences": len(val), "gumbel_lm_loss": False},
        ))
    # fixed input standardisation per stage, from the training tokens
    for layer in layers:
        x = torch.cat([s.hidden[layer] for s in train]).double()
        stage = pruner.stages[str(layer)]
        stage.mean.copy_(x.mean(0).float())
        stage.std.copy_(x.std(0).clamp(min=1e-4).float())
    optimizer = torch.optim.AdamW(pruner.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    history = History()
    start = 0

    resume_file = _resume_path(out)
    comparable = {k: v for k, v in asdict(opts).items() if k != "epochs"}
    if resume and resume_file.exists():
        state = torch.load(resume_file, weights_only=True)
        if state["options"] != json.loads(json.dumps(comparable)) or state["saliency"] != str(Path(saliency_dir).resolve()):
            raise ConfigError(f"{resume_file} is from a run with other options or data; delete it or use another --out")
        pruner.load_state_dict(state["pruner"])
        optimizer.load_state_dict(state["optimizer"])
        history.epochs = json.loads(state["history"])
        start = int(state["epoch"]) + 1

    bar = tqdm(range(start, opts.epochs), desc="pruner", unit="epoch", disable=not progress,
               initial=start, total=opts.epochs)
    for epoch in bar:
        gen = _generator(opts.seed, epoch)
        pruner.train()
        totals = {"loss": 0.0, "mse": 0.0, "rank": 0.0}
        for k in torch.randperm(len(train), generator=gen).tolist():
            optimizer.zero_grad()
            loss = 0.0
            for layer in layers:
                stage_loss, mse, rank = _stage_loss(pruner, train[k], layer, opts, gen)
                loss = loss + stage_loss
                totals["mse"] += mse / len(layers) / len(train)
                totals["rank"] += rank / len(layers) / len(train)
            loss.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach()) / len(layers) / len(train)
        pruner.eval()
        record = {"epoch": epoch, **{k: round(v, 5) for k, v in totals.items()}}
        if val:
            metrics = evaluate(pruner, val, layers, seed=opts.seed)
            record["val"] = metrics
            record["val_pair_acc"] = round(sum(m["pair_acc"] for m in metrics.values()) / len(metrics), 4)
        history.epochs.append(record)
        bar.set_postfix(loss=f"{totals['loss']:.4f}", **({"val_acc": record["val_pair_acc"]} if val else {}))
        pruner.config.training["history"] = history.epochs
        pruner.save(out)
        tmp = resume_file.with_name(resume_file.name + ".tmp")
        torch.save({"epoch": epoch, "pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
                    "options": json.loads(json.dumps(comparable)), "saliency": str(Path(saliency_dir).resolve()),
                    "history": json.dumps(history.epochs)}, tmp)
        tmp.replace(resume_file)
    bar.close()
    pruner.eval()
    return pruner, history
