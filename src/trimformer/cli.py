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
                        f"truncate (head + tail){', none (no pruning)' if allow_none else ''}")
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
    for name in ("keep", "window", "pool", "span", "sinks", "protect_last", "mass"):
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, length=args.length, depth=args.depth, config=trim_config_from_args(args))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for name, method in sorted(METHODS.items()):
        print(f"{name:10s} {method.description}")
    return 0


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
