"""The lab's commands of `trimformer`: `demo`, `bench`, `eval` here, `calibrate`, `train-task` and
`train-merge` in `cli_train.py`. Each joins the core CLI through an entry point of the
`trimformer.commands` group (pyproject.toml) naming a function `add_<command>(subparsers)`. The commands
check first that the lab's dependencies (the `lab` extra) are installed and say what to install if not.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from packaging.requirements import Requirement

from trimformer import METHODS
from trimformer.cli import LAB_INSTALL
from trimformer.cli_options import add_model_options, add_trim_options, int_list, load_from_args, trim_config_from_args
from trimformer.errors import TrimformerError

from . import bench, distributed
from .cli_diffusion import add_bench_diffusion_parser, cmd_bench_diffusion
from .demo import run_demo
from .evaluation import glue, imagenet
from .evaluation import tasks as eval_tasks
from .evaluation.report import format_groups, format_table, report
from .evaluation.variants import parse_variants


# ---- the lab's dependencies ---------------------------------------------------------------------
def missing_lab_dependencies() -> list[str]:
    """The distributions of trimformer's `lab` extra that are not installed (none when trimformer's own
    metadata cannot be read, e.g. run from a source tree)."""
    try:
        requires = importlib.metadata.requires("trimformer") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": "lab"}) or req.marker.evaluate({"extra": ""}):
            continue
        try:
            importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(req.name)
    return missing


def lab_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A lab command: fails with what to install before doing anything when the lab's dependencies are
    missing."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        missing = missing_lab_dependencies()
        if missing:
            raise TrimformerError(f"`trimformer {args.command}` needs the lab's dependencies ({', '.join(missing)} "
                                  f"not installed): {LAB_INSTALL}")
        return func(args)
    return run


# ---- demo, bench --------------------------------------------------------------------------------
@lab_command
def cmd_bench_prefill(args: argparse.Namespace) -> int:
    config = trim_config_from_args(args)
    lengths = int_list(args.lengths, "--lengths")
    model, tokenizer = load_from_args(args)
    rows = bench.bench_prefill(model, tokenizer, lengths, config, repeats=args.repeats, warmup=args.warmup)
    print(bench.format_table(rows))
    if args.json:
        bench.write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0


@lab_command
def cmd_bench_decode(args: argparse.Namespace) -> int:
    config = trim_config_from_args(args)
    model, tokenizer = load_from_args(args)
    row = bench.bench_decode(model, tokenizer, args.prompt_length, args.new_tokens, config,
                       repeats=args.repeats, warmup=args.warmup, batch=args.batch)
    print(bench.format_decode_table([row]))
    if args.json:
        bench.write_json([row], args.json)
        print(f"wrote {args.json}")
    return 0


@lab_command
def cmd_bench_vit(args: argparse.Namespace) -> int:
    rs = int_list(args.r, "--r")
    config = json.loads(args.config) if args.config else None
    if config is not None and not isinstance(config, dict):
        raise TrimformerError("--config must be a JSON object of TrimConfig fields")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench.bench_vit(args.model, args.batch, rs, repeats=args.repeats, warmup=args.warmup, config=config,
                     progress=not args.no_progress)
    print(bench.format_vit_table(rows))
    if args.json:
        bench.write_json(rows, args.json)
    return 0


@lab_command
def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    config = json.loads(args.config) if args.config else {}
    if not isinstance(config, dict):
        raise TrimformerError("--config must be a JSON object of TrimConfig fields")
    config = {"method": "tome", **({"r": args.r} if args.r is not None and "reduction_ratio" not in config else {}),
              **config}
    row = imagenet.evaluate(args.model, args.images, config, batch=args.batch, limit=args.limit, synsets=args.synsets,
                   progress=not args.no_progress)
    print(imagenet.format_result(row))
    if args.json:
        imagenet.write_json(row, args.json)
    return 0


def add_eval_imagenet_parser(tasks) -> None:
    e = tasks.add_parser("imagenet", help="top-1 accuracy and images/s of an image classifier, full vs ToMe")
    e.add_argument("--model", required=True, help="folder with a Hugging Face image classifier and its processor")
    e.add_argument("--images", required=True,
                   help="ImageNet folder layout (DIR/n01440764/*.JPEG) or a flat folder with synsets in file names")
    e.add_argument("--r", type=int, default=13, help="tokens merged per layer (default: %(default)s)")
    e.add_argument("--config", default=None, help='other TrimConfig fields as JSON, e.g. \'{"reduction_ratio": 0.3}\'')
    e.add_argument("--synsets", default=None, help="synsets in class order, one per line (LOC_synset_mapping.txt)")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--limit", type=int, default=None, help="first N images only")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval_imagenet)


def add_bench_vit_parser(bench_sub) -> None:
    b = bench_sub.add_parser("vit", help="images/s of a ViT, full vs ToMe-merged (r tokens per layer)")
    b.add_argument("--model", default="vit-b16-random",
                   help="vit-b16-random (ViT-B/16 config at 224 px, random weights) or a local checkpoint folder")
    b.add_argument("--batch", type=int, default=8, help="images per forward (default: %(default)s)")
    b.add_argument("--r", default="13", help="tokens merged per layer; comma-separated for several runs")
    b.add_argument("--repeats", type=int, default=5, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs of each first")
    b.add_argument("--config", default=None, help='other TrimConfig fields as JSON, e.g. \'{"prop_attn": false}\'')
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench_vit)


@lab_command
def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(model_name=args.model, length=args.length, depth=args.depth, config=trim_config_from_args(args))
    return 0


# ---- eval (thin over trimformer_lab.evaluation) -------------------------------------------------
def _eval_options(args: argparse.Namespace) -> dict:
    options: dict = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).exists() else args.config
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrimformerError(f"--config is neither a JSON file nor a JSON object: {exc}") from exc
        if not isinstance(options, dict):
            raise TrimformerError("--config must hold a JSON object of TrimConfig fields")
        for name in ("method", "keep"):
            if name in options:
                raise TrimformerError(f"give {name} with --{name}, not in --config")
    return options


@lab_command
def cmd_eval(args: argparse.Namespace) -> int:
    if args.task == "report":
        text = report(args.files, out=args.table, plots=args.plots)
        print(text)
        return 0
    variants = parse_variants(args.method, args.keep, _eval_options(args))
    if args.limit is not None and args.limit < 1:
        raise TrimformerError(f"--limit must be >= 1, got {args.limit}")
    if args.data is not None and not Path(args.data).exists() and args.task == "needle":
        raise TrimformerError(f"--data {args.data} does not exist")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    launch = distributed.setup()   # under torchrun / accelerate launch: this process's rank and device
    model, tokenizer = load_from_args(args, **launch.load_options())
    settings = eval_tasks.model_settings(args.model)
    if args.task == "needle":
        lengths = int_list(args.lengths, "--lengths")
        if args.needles < 1:
            raise TrimformerError(f"--needles must be >= 1, got {args.needles}")
        try:
            depths = [float(d) for d in args.depths.split(",") if d.strip()]
        except ValueError as exc:
            raise TrimformerError(f"--depths takes comma-separated numbers in [0, 1], got {args.depths!r}") from exc
        items = eval_tasks.needle_items(tokenizer, lengths, depths, args.limit, args.data, names, args.needles)
    elif args.task == "longbench":
        items = eval_tasks.longbench_items(tokenizer, args.data, names, args.limit, args.budget, args.chat, args.max_new_tokens)
        settings.update(budget=args.budget, chat=args.chat, max_new_tokens=args.max_new_tokens)
    else:
        items = eval_tasks.fidelity_items(tokenizer, args.data, names, args.limit, args.budget, args.chat, args.prompts)
        settings.update(budget=args.budget, chat=args.chat, tokens=args.tokens)
    data = distributed.run_evaluation(launch, args.task, model, tokenizer, variants, items, json_path=args.json,
                                      settings=settings, progress=not args.no_progress, fidelity_tokens=args.tokens,
                                      plots=args.plots or "auto", log=lambda m: print(m, file=sys.stderr))
    if data is None:   # not rank 0: rank 0 writes and prints the gathered results
        return 0
    text = format_table(data.get("full", []) + data["results"], fidelity=args.task == "fidelity")
    groups = format_groups(data.get("groups", []))
    print(text + (f"\n\n{groups}" if groups else ""))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + (f"\n\n{groups}" if groups else "") + "\n")
    if args.json:
        print(f"wrote {args.json}" + (f" and {len(data.get('plots', []))} plot(s)" if data.get("plots") else ""),
              file=sys.stderr)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="quality against speed: needle, LongBench, fidelity; full model beside each method")
    tasks = p.add_subparsers(dest="task", required=True)
    for name, helptext in (
        ("needle", "needle in a haystack on PG essays at depths x lengths (exact match; heatmap PNG)"),
        ("longbench", "LongBench v1 (English and code; the tasks the data holds), middle-truncated to --budget "
                      "tokens, LongBench's prompt and metric per task"),
        ("fidelity", "trimmed against full on the same prompts: greedy token agreement, ROUGE-L, first-step KL"),
    ):
        e = tasks.add_parser(name, help=helptext)
        add_model_options(e)
        e.add_argument("--method", default="lazy",
                       help=f"method(s), comma-separated, of {', '.join(sorted(METHODS))} (or <method>+runtime); "
                            "method@keep sets a keep for one method (lazy@0.7). The full model always runs too "
                            "(default: %(default)s)")
        e.add_argument("--keep", default=None,
                       help="keep level(s), comma-separated ratios in (0, 1] or 'default' (TrimConfig's default "
                            "schedule; the default when omitted)")
        e.add_argument("--config", default=None, help="a JSON object (or file) of other TrimConfig fields for all methods")
        e.add_argument("--data", default=None,
                       help="data folder (holding longbench/ and pg_essays/; default ../shared/data next to the "
                            "project), or for longbench/fidelity a Hugging Face dataset name (needs `datasets`)")
        e.add_argument("--tasks", default=None, help="comma-separated tasks (longbench: hotpotqa,trec,...; "
                                                     "needle: needle_4096,...); default: all")
        e.add_argument("--limit", type=int, default=None, help="items per task (needle: depths, spread evenly)")
        e.add_argument("--json", default=None, help="results file: written after every item, resumed when it exists")
        e.add_argument("--table", default=None, help="also write the Markdown table here")
        e.add_argument("--plots", default=None, help="folder for the PNG plots (default: next to --json)")
        e.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "needle":
            e.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths in tokens")
            e.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                           help="needle depths, 0..1 of the haystack")
            e.add_argument("--needles", type=int, default=1,
                           help="needles per prompt; above 1, each prompt hides that many at random depths and "
                                "asks for all their numbers (score: the share found; --limit prompts per length)")
            e.set_defaults(budget=None, chat="auto", max_new_tokens=None, tokens=32, prompts=None)
        else:
            e.add_argument("--budget", type=int, default=4096,
                           help="prompt token budget; longer prompts lose their middle (default: %(default)s)")
            e.add_argument("--chat", choices=["auto", "always", "never"], default="auto",
                           help="chat template: auto = as LongBench (not on the few-shot and code tasks)")
        if name == "longbench":
            e.add_argument("--max-new-tokens", type=int, default=None,
                           help="cap LongBench's per-task generation length (quick looks); default: LongBench's")
            e.set_defaults(tokens=32, prompts=None)
        if name == "fidelity":
            e.add_argument("--tokens", type=int, default=32, help="greedy tokens compared (default: %(default)s)")
            e.add_argument("--prompts", default=None,
                           help="your own prompts (JSONL with \"prompt\", or one per line) instead of LongBench's")
            e.set_defaults(max_new_tokens=None)
        e.set_defaults(func=cmd_eval)
    add_eval_imagenet_parser(tasks)
    add_eval_glue_parser(tasks)
    r = tasks.add_parser("report", help="merge results files (e.g. trimformer's and kvpress's) into one table")
    r.add_argument("files", nargs="+", help="results JSON files")
    r.add_argument("--table", default=None, help="write the Markdown table here")
    r.add_argument("--plots", default=None, help="write the Pareto plots (and needle heatmap) into this folder")
    r.set_defaults(func=cmd_eval)


@lab_command
def cmd_eval_glue(args: argparse.Namespace) -> int:
    inputs = [x.strip() for x in args.bench_inputs.split(",") if x.strip()] if args.bench_inputs else None
    counts = [x.strip() for x in args.tsdtp_counts.split(",") if x.strip()] if args.tsdtp_counts else None
    data = glue.run_glue(args.task, args.checkpoint, baseline=args.baseline, data=args.data, bench_inputs=inputs,
                    tsdtp_counts=counts, cls_only_last=args.cls_only_last,
                    bench_count=args.bench_batches, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                    memory=not args.no_memory, progress=not args.no_progress)
    table = glue.format_table(data)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_eval_glue_parser(tasks) -> None:
    e = tasks.add_parser("glue", help="SST-2 / QNLI: fine-tuned vs generic pruning vs TS-DTP (accuracy, kept share, "
                                      "throughput, peak memory)")
    e.add_argument("--task", choices=["sst2", "qnli"], required=True)
    e.add_argument("--checkpoint", required=True, help="a TS-DTP checkpoint folder from `trimformer train-task`")
    e.add_argument("--baseline", default=None,
                   help="the unpruned fine-tuned folder (default: the --init the TS-DTP run started from)")
    e.add_argument("--data", default=None, help="folder holding sst2/ and qnli/ (default: ../shared/data)")
    e.add_argument("--bench-inputs", default=None,
                   help="dev inputs to time, comma-separated (default: the task's own); e.g. sst2,qnli adds "
                        "columns at QNLI length")
    e.add_argument("--tsdtp-counts", default=None,
                   help="TS-DTP rows, comma-separated: row (per-row threshold) and/or batch (the threshold's budget "
                        "spread over the batch); the first is the 'tsdtp' row whose kept share the generic row "
                        "matches, others add 'tsdtp-<mode>' rows (default: the checkpoint's own)")
    e.add_argument("--cls-only-last", action="store_true",
                   help="pruned rows run the last layer's MLP on [CLS] alone (the logits do not change); adds a "
                        "'finetuned-cls-only-last' row, the unpruned model with only that")
    e.add_argument("--bench-batches", type=int, default=8, help="batches of 32 timed, spread over lengths")
    e.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    e.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    e.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval_glue)


# ---- the entry points ---------------------------------------------------------------------------
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="answer a question about a long PG-essay prompt with and without pruning")
    add_model_options(p)
    add_trim_options(p)
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--depth", type=float, default=0.35, help="where the fact sits in the essays, 0..1")
    p.set_defaults(func=cmd_demo)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: full vs trimmed in one process")
    bench_sub = p.add_subparsers(dest="bench", required=True)
    b = bench_sub.add_parser("prefill", help="time to first token, full vs trimmed, at several prompt lengths")
    add_model_options(b)
    add_trim_options(b)
    b.add_argument("--lengths", default="2048,4096,8192", help="comma-separated prompt lengths in tokens")
    b.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench_prefill)

    b = bench_sub.add_parser("decode", help="decoding throughput and KV size, full vs trimmed (runtime eviction)")
    add_model_options(b)
    add_trim_options(b)
    b.add_argument("--prompt-length", type=int, default=4096, help="prompt tokens before decoding")
    b.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    b.add_argument("--batch", type=int, default=1, help="rows decoded together (needle prompts at different depths)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed short runs of each first")
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench_decode)

    add_bench_vit_parser(bench_sub)
    add_bench_diffusion_parser(bench_sub).set_defaults(func=lab_command(cmd_bench_diffusion))
