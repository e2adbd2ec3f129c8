"""Fine-tune a BERT-family classifier on SST-2 or QNLI, with TS-DTP pruning (default) or without (`prune=False`).

With pruning, training runs the soft form of what inference does: at each TS-DTP layer every token gets a
keep probability sigmoid((z - threshold) / temperature) from its relative score z (`scoring.task_attention`);
the product over layers so far weights the token as a key in every later attention (log weight added to
the logits) and as a query of the task-specific attention, so a token near 0 is as good as dropped. The
temperature falls linearly over training, so the masks end close to the hard ones used at inference. The
loss is cross-entropy + aux_weight x (kept share - target)^2, where the kept share counts token-layer
computations (attention block and MLP of every layer, as `stats()` counts them) under the hard masks, with
the gradient of the soft count (straight-through): the target is the share inference will do.

The checkpoint folder holds the fine-tuned model (`save_pretrained`: config.json, model.safetensors, the
tokenizer), the TS-DTP modules (tsdtp.safetensors + tsdtp.json) and train.json (options, dev metrics).
Deterministic under `seed` on a given machine and thread count: weights, dropout and batch order come
from seeded generators.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

from trimformer.config import default_layers
from trimformer.errors import ConfigError
from trimformer.loading import EMBEDDED_ENCODERS, _distribution_file
from trimformer.ops.merge import cls_attention
from trimformer.patch.encoder import Family, find_family
from trimformer.pruners.sdtp import model_signature
from trimformer.ops.task_attention import key_bias, kept_share, soft_keep
from trimformer.pruners.tsdtp import TSDTPConfig, TSDTPPruner, check_counts

from ..classifier import evaluate_classifier
from ..glue_data import TASKS, collate, load_examples, tokenize, training_batches


@dataclass
class TaskTrainOptions:
    task: str = "sst2"
    prune: bool = True                   # False: the unpruned baseline (same recipe, no TS-DTP modules)
    model: str = "minilm-l6"             # embedded name or folder of the backbone
    init: str | None = None              # start from this fine-tuned classifier folder (e.g. the --no-prune run)
    layers: list[int] | None = None      # TS-DTP layers; None: default_layers(num_layers)
    rank: int = 32                       # width of the task-specific attention
    target: float = 0.5                  # kept share of token-layer computations the aux loss pulls toward
    target_ramp: float = 0.0             # share of the steps over which the target falls from 1.0 to `target`
    aux_weight: float = 5.0
    distill: float = 0.0                 # weight of the KD loss (0: cross-entropy only; 1: KD only)
    distill_temperature: float = 1.0     # softmax temperature T of the KD loss
    teacher: str | None = None           # KD teacher folder (default: `init`)
    min_length: int | None = None        # train only on rows of at least this many tokens
    counts: str = "batch"                # written to the checkpoint: how inference turns the threshold into counts
    temperature: tuple[float, float] = (1.0, 0.1)   # soft-mask temperature, first and last step
    epochs: float = 1.0
    limit: int | None = None             # train on the first N examples of a seeded shuffle (a subset)
    batch: int = 32
    lr: float = 5e-5                     # backbone and head
    pruner_lr: float = 2e-3              # TS-DTP modules (attention and mix)
    threshold_lr: float = 5e-2           # TS-DTP thresholds: they must move by ~1 within a short run
    warmup: float = 0.06                 # share of steps with a linear warm-up
    max_length: int = 128
    freeze_embeddings: bool = True       # word embeddings stay fixed (half the parameters, no gradient)
    seed: int = 0
    data: str | None = None              # folder holding sst2/ and qnli/ (default ../shared/data)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if not 0.0 < self.target <= 1.0:
            raise ConfigError(f"target must be a share in (0, 1], got {self.target}")
        if self.epochs <= 0 or self.batch < 1 or self.rank < 1:
            raise ConfigError("epochs must be > 0, batch and rank >= 1")
        if min(self.temperature) <= 0:
            raise ConfigError(f"temperatures must be > 0, got {self.temperature}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not 0.0 <= self.target_ramp <= 1.0:
            raise ConfigError(f"target_ramp must be a share of the steps in [0, 1], got {self.target_ramp}")
        if self.aux_weight < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"distill must be a weight in [0, 1], got {self.distill}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.distill > 0 and self.teacher is None and self.init is None:
            raise ConfigError("distill > 0 needs a teacher: pass teacher=DIR (--teacher) or init=DIR (--init), "
                              "the unpruned fine-tuned model")
        if self.min_length is not None and self.min_length < 1:
            raise ConfigError(f"min_length must be >= 1, got {self.min_length}")
        check_counts(self.counts)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)   # per logged step: loss, ce, share, accuracy
    dev: dict = field(default_factory=dict)             # accuracy and kept_fraction on the dev split
    model: torch.nn.Module | None = None                # the fine-tuned classifier (eval mode), as saved
    pruner: TSDTPPruner | None = None                   # its TS-DTP modules (None with prune=False)


# ---- the soft forward ------------------------------------------------------------------------------
@contextlib.contextmanager
def captured_qk(family: Family, layers: list[int]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Hooks on the query and key projections of `layers`: {layer: {"q": (B, T, D), "k": (B, T, D)}}."""
    store: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    handles = []
    for layer in layers:
        _, q, k, _, _, _ = family.attention(family.layers[layer])
        for name, module in (("q", q), ("k", k)):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, layer=layer, name=name: store[layer].__setitem__(name, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def protected_slots(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: [CLS] and each row's last real token ([SEP]), the tokens the encoder adapter never drops."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[:, 0] = True
    last = (mask.sum(-1) - 1).clamp(min=0)
    return out.scatter(1, last[:, None], True) & mask.bool()


def soft_forward(model, pruner: TSDTPPruner, batch: dict[str, torch.Tensor], temperature: float,
                 hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and kept share (scalar) of a Bert*ForSequenceClassification with TS-DTP soft masks.

    The kept share has the value the hard masks give (what inference will do) and the gradient of the soft
    one (straight-through). `hard=True` uses the 0/1 masks of inference (z >= threshold) throughout: the
    logits are then those of the trimmed model, whose dropped tokens are masked here, not gathered away."""
    family = find_family(model)
    base = family.base
    mask = batch["attention_mask"]
    keep = mask.float()                                             # (B, T) cumulative keep weight
    keep_hard = keep                                                # (B, T) the same with 0/1 masks
    protected = protected_slots(mask)
    h = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    attn_tokens, mlp_tokens, attn_hard, mlp_hard = [], [], [], []
    with captured_qk(family, pruner.layers) as qk:
        for index, layer in enumerate(family.layers):
            bias = key_bias(keep, h.dtype)                          # (B, 1, 1, T)
            attn_tokens.append(keep.sum(-1))
            attn_hard.append(keep_hard.sum(-1))

            def reduce(out: torch.Tensor, index: int = index, bias: torch.Tensor = bias) -> torch.Tensor:
                nonlocal keep, keep_hard
                if index in pruner.layers:
                    _, _, _, _, heads, scaling = family.attention(family.layers[index])
                    q, k = qk[index]["q"], qk[index]["k"]
                    b, t, _ = k.shape
                    layer_attention = cls_attention(q[:, 0].view(b, heads, -1), k.view(b, t, heads, -1).transpose(1, 2),
                                                    scaling, bias)                          # (B, T)
                    z = pruner.relative_scores(index, out, layer_attention, keep)
                    threshold = pruner.stage_threshold(index)
                    above = torch.where(protected, 1.0, (z >= threshold).float())
                    keep_hard = keep_hard * above
                    keep = keep * (above if hard else torch.where(protected, 1.0, soft_keep(z, threshold, temperature)))
                mlp_tokens.append(keep.sum(-1))
                mlp_hard.append(keep_hard.sum(-1))
                return out

            h = family.run(layer, h, bias, {}, reduce)
    logits = model.classifier(model.dropout(base.pooler(h)))
    lengths = mask.sum(-1)
    share = kept_share(torch.stack(attn_tokens), torch.stack(mlp_tokens), lengths)
    share_hard = kept_share(torch.stack(attn_hard), torch.stack(mlp_hard), lengths)
    return logits, share_hard + share - share.detach()


# ---- losses and schedules ----------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (logits (B, C))."""
    t = temperature
    target = F.log_softmax(teacher.detach().float() / t, -1)
    return F.kl_div(F.log_softmax(student.float() / t, -1), target, reduction="batchmean", log_target=True) * t * t


def share_target(step: int, total: int, target: float, ramp: float) -> float:
    """The kept share the aux loss pulls toward at `step` of `total`: 1.0 at step 0, falling linearly to
    `target` at step ramp x total (rounded up), `target` from then on (and throughout with ramp 0)."""
    span = math.ceil(ramp * total)
    if span <= 0 or step >= span:
        return target
    return 1.0 + (target - 1.0) * step / span


# ---- training ----------------------------------------------------------------------------------------
def load_backbone(opts: TaskTrainOptions):
    """(Bert*ForSequenceClassification, tokenizer): from `init` if given, else the backbone + a new head."""
    if opts.init is not None:
        folder = Path(opts.init)
    elif opts.model == "minilm-l6":
        folder = _distribution_file(*EMBEDDED_ENCODERS["minilm-l6"]).parent
    else:
        folder = Path(opts.model)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(folder)


def train_task(opts: TaskTrainOptions, out: str | Path, progress: bool = True, log_every: int = 20) -> TrainResult:
    """Fine-tune on `opts.task`, evaluate on its dev split (pruning for real), save the checkpoint to `out`."""
    opts.validate()
    torch.manual_seed(opts.seed)
    model, tokenizer = load_backbone(opts)
    pruner = None
    if opts.prune:
        num_layers = model.config.num_hidden_layers
        layers = list(opts.layers) if opts.layers is not None else list(default_layers(num_layers))
        if any(not 0 <= layer < num_layers - 1 for layer in layers):
            raise ConfigError(f"TS-DTP layers must be in 0..{num_layers - 2}, got {layers}")
        pruner = TSDTPPruner(TSDTPConfig(model_signature(model.config), sorted(set(layers)), opts.rank,
                                         task=opts.task, training=_record(opts), counts=opts.counts))
    if opts.freeze_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    teacher = None
    if opts.distill > 0:
        teacher = BertForSequenceClassification.from_pretrained(opts.teacher or opts.init, num_labels=2,
                                                                attn_implementation="sdpa").eval()
        teacher.requires_grad_(False)

    examples = load_examples(opts.task, "train", opts.data)
    g = torch.Generator().manual_seed(opts.seed)
    items = tokenize(tokenizer, examples, opts.max_length)
    if opts.min_length is not None:
        items = [x for x in items if len(x["input_ids"]) >= opts.min_length]
        if not items:
            raise ConfigError(f"no training row has {opts.min_length} tokens or more (min_length)")
    if opts.limit is not None and opts.limit < len(items):
        pick = torch.randperm(len(items), generator=g)[: opts.limit].tolist()
        items = [items[i] for i in sorted(pick)]
    per_epoch = math.ceil(len(items) / opts.batch)
    total = max(1, round(per_epoch * opts.epochs))
    batches: list[list[dict]] = []
    while len(batches) < total:
        batches += training_batches(items, opts.batch, g)
    batches = batches[:total]

    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": opts.lr}]
    if pruner is not None:
        modules = [p for name, p in pruner.named_parameters() if name != "threshold"]
        groups.append({"params": modules, "lr": opts.pruner_lr, "weight_decay": 0.0})
        groups.append({"params": [pruner.threshold], "lr": opts.threshold_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(opts.warmup * total), total)

    model.train()
    result = TrainResult(steps=total, seconds=0.0, model=model, pruner=pruner)
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"train {opts.task}{' tsdtp' if pruner else ''}", disable=not progress)
    running: dict[str, float] = {}
    for step, chunk in enumerate(bar):
        batch = collate(chunk, tokenizer.pad_token_id or 0)
        labels = batch.pop("labels")
        target = share_target(step, total, opts.target, opts.target_ramp)
        if pruner is not None:
            t0, t1 = opts.temperature
            temperature = t0 + (t1 - t0) * step / max(1, total - 1)
            logits, share = soft_forward(model, pruner, batch, temperature)
        else:
            logits, share = model(**batch).logits, torch.tensor(1.0)
        ce = F.cross_entropy(logits, labels)
        loss = ce
        kd = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**batch).logits
            kd = distill_loss(logits, teacher_logits, opts.distill_temperature)
            loss = (1 - opts.distill) * ce + opts.distill * kd
        if pruner is not None:
            loss = loss + opts.aux_weight * (share - target) ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        optimizer.step()
        schedule.step()
        stats = {"loss": loss.item(), "ce": ce.item(), "share": share.item(), "target": target,
                 "acc": (logits.argmax(-1) == labels).float().mean().item()}
        if kd is not None:
            stats["kd"] = kd.item()
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in stats.items()} if running else stats
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if step % log_every == 0 or step == total - 1:
            result.history.append({"step": step, **stats})
    result.seconds = time.perf_counter() - start
    model.eval()
    if pruner is not None:
        pruner.eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if pruner is not None:
        pruner.save(out)
    dev = evaluate_classifier(model, tokenizer, opts.task, out if pruner is not None else None, data=opts.data,
                              max_length=opts.max_length, progress=progress)
    result.dev = dev
    record = {"options": _record(opts), "train_examples": len(items), "steps": total, "seconds": result.seconds,
              "dev": dev, "history": result.history}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return result


def _record(opts: TaskTrainOptions) -> dict:
    data = asdict(opts)
    data["temperature"] = list(opts.temperature)
    return data
