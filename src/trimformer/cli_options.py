"""The options the commands share (the lab's commands use them too): the model, the trim options and the
`TrimConfig` they make, and the server's own options (for `trimformer serve` and its Ray Serve builder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .config import TrimConfig
from .errors import TrimformerError
from .loading import load_model
from .registry import METHODS, resolve


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


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of `trimformer serve` beside the model and trim options."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one; default: %(default)s)")
    parser.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="tokens a chat request may generate when it sets no max_tokens (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request")
