"""The `trimformer` command: a thin layer over the Python API.

The library's own commands are here (`generate`, `serve`, `methods`). Other commands join through the
`trimformer.commands` entry-point group: each entry point is named after its command and loads a
function `add(subparsers)` that adds that command's parser. The lab part (`trimformer_lab`: `demo`,
`bench`, `eval`, `calibrate`, `train-task`, `train-merge`) registers its commands this way; when an entry
point cannot be loaded, its command stays listed and says what to install.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .api import stats, trim
from .batch import batch_command
from .cli_options import add_model_options, add_server_options, add_trim_options, load_from_args, trim_config_from_args
from .errors import TrimformerError
from .generation import greedy
from .registry import METHODS, SCORERS
from .serve import Engine, Server
from .serve_ray import add_ray_options

COMMAND_GROUP = "trimformer.commands"
LAB_INSTALL = 'pip install -e ".[lab]"'


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
    add_server_options(p)
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
