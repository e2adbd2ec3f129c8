"""The `trimformer` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import TrimConfig
from .errors import TrimformerError


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
    return TrimConfig.from_dict(options)


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


def _load(args):
    import torch

    from .loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model)


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
                       repeats=args.repeats, warmup=args.warmup)
    print(format_decode_table([row]))
    if args.json:
        write_json([row], args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, length=args.length, depth=args.depth, config=trim_config_from_args(args))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

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
    model, tokenizer = _load(args)
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
    data = ev.run_evaluation(args.task, model, tokenizer, variants, items, json_path=args.json, settings=settings,
                             progress=not args.no_progress, fidelity_tokens=args.tokens,
                             plots=args.plots or "auto", log=lambda m: print(m, file=sys.stderr))
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
    r = tasks.add_parser("report", help="merge results files (e.g. trimformer's and kvpress's) into one table")
    r.add_argument("files", nargs="+", help="results JSON files")
    r.add_argument("--table", default=None, help="write the Markdown table here")
    r.add_argument("--plots", default=None, help="write the Pareto plots (and needle heatmap) into this folder")
    r.set_defaults(func=cmd_eval)


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
    b.add_argument("--repeats", type=int, default=2, help="timed runs of each (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed short runs of each first")
    b.add_argument("--json", help="write the results here")
    b.set_defaults(func=cmd_bench_decode)

    add_eval_parser(sub)

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
