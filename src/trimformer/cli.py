"""The `trimformer` command: a thin layer over the Python API.

The library's own commands are here (`generate`, `serve`, `methods`). Other commands join through the
`trimformer.commands` entry-point group: each entry point is named after its command and loads a
function `add(subparsers)` that adds that command's parser. The lab part (`trimformer_lab`: `demo`,
`bench`, `eval`, `calibrate`, `train-task`, `train-merge`) registers its commands this way; when an entry
point cannot be loaded, its command stays listed and says what to install.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import torch

from .api import stats, trim
from .batch import batch_command
from .config import TrimConfig
from .errors import TrimformerError
from .generation import greedy
from .loading import load_model
from .registry import METHODS, SCORERS, resolve
from .serve import Engine, Server
from .serve_ray import add_ray_options

COMMAND_GROUP = "trimformer.commands"
LAB_INSTALL = 'pip install -e ".[lab]"'


# ---- shared options (the lab's commands use them too) -------------------------------------------
def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded model name (smollm2-135m), local folder or hub id (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def method_help(allow_none: bool = False) -> str:
    """The --method help, from the method registry."""
    none = ", or none (no pruning)" if allow_none else ""
    return (f"pruning method: {', '.join(sorted(METHODS))}, or <method>+runtime (prefill pruning, then decode-time "
            f"eviction){none}; default: lazy. `trimformer methods` says what each does")


def add_trim_options(parser: argparse.ArgumentParser, allow_none: bool = False) -> None:
    g = parser.add_argument_group("pruning (see trimformer.TrimConfig)")
    g.add_argument("--method", default=None, help=method_help(allow_none))
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
        options["layers"] = tuple(int_list(args.layers, "--layers"))
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
    resolve(config)               # method, scorer and mechanisms too
    return config


def _budget(text: str) -> float | int:
    """'0.5' -> 0.5 (a share), '2048' -> 2048 (a count)."""
    return float(text) if "." in text else int(text)


def int_list(text: str, flag: str) -> list[int]:
    """'7,14' -> [7, 14]; a clear error naming `flag` otherwise."""
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


def load_from_args(args: argparse.Namespace, **options):
    """(model, tokenizer) of --model, after setting --threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, **options)


# ---- commands ---------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.prompt_file):
        raise TrimformerError("give exactly one of --prompt TEXT or --prompt-file PATH")
    text = args.prompt if args.prompt else Path(args.prompt_file).read_text(encoding="utf-8")
    config = None if args.method == "none" else trim_config_from_args(args)
    model, tokenizer = load_from_args(args)
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


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise TrimformerError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.ray:
        from .serve_ray import run
        return run(args)
    config = None if args.method == "none" else trim_config_from_args(args)
    model, tokenizer = load_from_args(args)
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
    add_ray_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_batch(args: argparse.Namespace) -> int:
    return batch_command(args, None if args.method == "none" else trim_config_from_args(args))


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="greedy answers to a JSONL file of prompts, in one process or on Ray Data")
    add_model_options(p)
    add_trim_options(p, allow_none=True)
    p.add_argument("--input", required=True,
                   help='JSONL, a line per prompt: {"id", "prompt"} or {"id", "messages"}, optional "max_tokens"')
    p.add_argument("--output", required=True,
                   help="JSONL of answers, appended line by line; a re-run skips the lines already there")
    p.add_argument("--max-new-tokens", type=int, default=64, help="for lines without max_tokens (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="do not wrap text prompts in the chat template")
    g = p.add_argument_group("Ray Data (pip install -e \".[ray]\")")
    g.add_argument("--ray", action="store_true", help="answer on a pool of model actors on Ray Data")
    g.add_argument("--actors", type=int, default=None, help="actors (default: the cluster's CPUs / --threads-per-actor)")
    g.add_argument("--threads-per-actor", type=int, default=1, help="torch threads and Ray CPUs per actor (default: 1)")
    g.add_argument("--ray-address", default="auto",
                   help="cluster to join; auto: a running one, else a new local one (default: %(default)s)")
    p.set_defaults(func=cmd_batch)


def cmd_methods(args: argparse.Namespace) -> int:
    """The registry: each method's scorer, mechanisms and model kinds, then each scorer's needs."""
    print(f"{'method':14s} {'scorer':13s} {'mechanisms':12s} {'runs on':26s} what it does")
    for name, method in METHODS.items():
        kinds = ", ".join(sorted(method.applies_to))
        print(f"{name:14s} {method.scorer or '-':13s} {'+'.join(sorted(method.mechanisms)):12s} {kinds:26s} "
              f"{method.description}")
    print("\nany method that prunes the prompt + 'runtime' adds decode-time eviction (e.g. lazy+runtime)\n")
    print(f"{'scorer':14s} {'needs':18s} {'runs on':26s} paper")
    for name, scorer in SCORERS.items():
        print(f"{name:14s} {', '.join(sorted(scorer.needs)):18s} {', '.join(sorted(scorer.applies_to)):26s} "
              f"{scorer.paper or '-'}")
    return 0


# ---- commands from other packages (entry points) ------------------------------------------------
def add_plugin_commands(sub) -> list[str]:
    """Add the commands of the `trimformer.commands` entry points; returns their names. A command whose
    entry point fails to load is added as a stub that explains what to install."""
    names: list[str] = []
    for point in entry_points(group=COMMAND_GROUP):
        if point.name in names or point.name in sub.choices:
            continue   # the same distribution seen twice on the path
        names.append(point.name)
        try:
            add = point.load()
        except Exception as exc:  # noqa: BLE001 - any failure to import the plugin leaves a stub behind
            _add_unavailable(sub, point.name, f"{type(exc).__name__}: {exc}")
            continue
        add(sub)
    return names


def _add_unavailable(sub, name: str, reason: str) -> None:
    p = sub.add_parser(name, help=f"(unavailable: {LAB_INSTALL})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(args: argparse.Namespace) -> int:
        raise TrimformerError(f"`trimformer {name}` is unavailable here ({reason}); install the lab part: "
                              f"{LAB_INSTALL}")
    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimformer",
        description="Prune tokens layer by layer inside Hugging Face models: faster prefill, quality measured.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="greedy answer to a prompt with pruning; prints TTFT and kept share")
    add_model_options(p)
    add_trim_options(p, allow_none=True)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.set_defaults(func=cmd_generate)

    add_serve_parser(sub)
    add_batch_parser(sub)

    p = sub.add_parser("methods", help="list the pruning methods")
    p.set_defaults(func=cmd_methods)

    plugins = add_plugin_commands(sub)
    parser.set_defaults(commands=list(sub.choices), plugins=plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    commands = parser.get_default("commands")
    if command is not None and command not in commands and not parser.get_default("plugins"):
        print(f"trimformer: error: no command {command!r} here (commands: {', '.join(commands)}); the evaluation, "
              f"benchmark, training and demo commands come with the lab part: {LAB_INSTALL}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TrimformerError as exc:
        print(f"trimformer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
