"""The commands `trimformer calibrate schedule` (a subcommand of `calibrate`, added by `cli_train.py`) and
`trimformer tune` (an entry point of the `trimformer.commands` group)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trimformer.cli_options import add_model_options, int_list, load_from_args
from trimformer.errors import TrimformerError
from trimformer.presets import cache_path, save_preset

from ..cli import lab_command
from .search import CalibrateOptions, Calibration, Verified, calibrate_schedule


def add_schedule_parser(cal) -> None:
    """`calibrate schedule`: the subparser of the `calibrate` command."""
    s = cal.add_parser("schedule", help="measure the model's pruning schedule (which layers find the evidence, how "
                                        "much each keeps) and write it as a preset")
    add_model_options(s)
    s.add_argument("--out", required=True, help="preset JSON file to write")
    add_calibration_options(s)
    target = s.add_mutually_exclusive_group()
    target.add_argument("--target-work", type=float, default=None,
                        help="share of token-layer work a schedule may do (default: 0.42, about the depth-fraction "
                             "fallback's)")
    target.add_argument("--target-speedup", type=float, default=None,
                        help="instead: the FLOPs ratio (full / trimmed) a schedule must reach at --length tokens")
    s.add_argument("--verify", type=int, default=6, help="screened schedules verified with trimmed forwards, besides "
                                                        "the fallback and the current preset (default: %(default)s)")
    s.add_argument("--stages", default="3,4,5",
                   help="numbers of pruning stages the candidates have (default: %(default)s)")
    s.add_argument("--grid", default="0.3,0.4,0.5,0.6,0.7",
                   help="keep ratios a stage may have (default: %(default)s)")
    s.add_argument("--save-to-cache", action="store_true",
                   help="also write it to the cache folder, where trim() finds it for this architecture")
    s.set_defaults(func=cmd_calibrate_schedule)


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=8, help="calibration prompts (default: %(default)s)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per calibration prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="facts and their depths (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def float_list(text: str, flag: str) -> list[float]:
    """'0.3,0.5' -> [0.3, 0.5]; a clear error naming `flag` otherwise."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise TrimformerError(f"{flag} takes comma-separated numbers, got {text!r}") from exc


@lab_command
def cmd_calibrate_schedule(args: argparse.Namespace) -> int:
    opts = CalibrateOptions(prompts=args.prompts, length=args.length, seed=args.seed, verify=args.verify,
                            target_work=args.target_work if args.target_work is not None else 0.42,
                            target_speedup=args.target_speedup, stages=tuple(int_list(args.stages, "--stages")),
                            grid=tuple(float_list(args.grid, "--grid")))
    model, tokenizer = load_from_args(args)
    result = calibrate_schedule(model, tokenizer, opts, progress=not args.no_progress)
    print(format_verified(result.verified, result.best))
    for path in write_calibration(result, model.config, args.model, args.out, args.save_to_cache):
        print(f"wrote {path}")
    print(f"schedule {result.best.schedule} ({result.best.source}): work {result.best.work_share:.1%}, FLOPs ratio "
          f"{result.best.flops_ratio:.2f}x at {opts.length} tokens; {result.seconds:.0f} s on "
          f"{torch.get_num_threads()} threads")
    return 0


def write_calibration(result: Calibration, config, name: str, out: str, to_cache: bool) -> list[Path]:
    """Write the preset to `out` (and to the cache folder); returns the paths written."""
    fields = result.preset_fields()
    paths = [save_preset(out, config, result.best.schedule, name=name, **fields)]
    if to_cache:
        paths.append(save_preset(cache_path(config), config, result.best.schedule, name=name, **fields))
    return paths


def format_verified(rows: list[Verified], best: Verified | None = None) -> str:
    head = f"{'schedule':<44} {'source':>8} {'work':>6} {'FLOPs':>6} {'agree':>6} {'fact kept':>9} {'KL mean':>8} {'right':>6}"
    lines = [head, "-" * len(head)]
    for v in rows:
        mark = " *" if v is best else ("" if v.eligible else " (over target)")
        schedule = ",".join(f"{k}:{r:g}" for k, r in v.schedule.items())
        lines.append(f"{schedule:<44} {v.source:>8} {v.work_share:>6.1%} {v.flops_ratio:>5.2f}x {v.agreement:>6.0%} "
                     f"{v.evidence_kept:>9.0%} {v.kl_mean:>8.4f} {v.correct:>6.0%}{mark}")
    return "\n".join(lines)


def add_tune(sub) -> None:
    """`trimformer tune`: an entry point of the `trimformer.commands` group."""
    t = sub.add_parser("tune", help="the schedule with the best fidelity among those whose measured TTFT speedup "
                                    "reaches a target, written as a preset")
    add_model_options(t)
    t.add_argument("--target-speedup", type=float, required=True, help="measured TTFT speedup to reach, e.g. 3")
    t.add_argument("--length", type=int, default=8192, help="prompt tokens the speedup is measured at "
                                                            "(default: %(default)s)")
    t.add_argument("--out", required=True, help="preset JSON file to write; the state file goes next to it "
                                                "(OUT's name with .tune.json)")
    t.add_argument("--resume", action="store_true", help="skip the candidates the state file holds")
    t.add_argument("--plot", default=None, help="fidelity-speed plot (default: OUT with .png)")
    t.add_argument("--prompts", type=int, default=8, help="calibration prompts for fidelity (default: %(default)s)")
    t.add_argument("--calibration-length", type=int, default=2048,
                   help="tokens per calibration prompt (default: %(default)s)")
    t.add_argument("--repeats", type=int, default=3, help="timed runs per candidate after a warm-up (medians)")
    t.add_argument("--beyond", type=int, default=2,
                   help="candidates measured after the first that reaches the target (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_tune)


@lab_command
def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import TuneOptions, tune

    opts = TuneOptions(target_speedup=args.target_speedup, length=args.length, prompts=args.prompts,
                       calibration_length=args.calibration_length, seed=args.seed, beyond=args.beyond,
                       repeats=args.repeats)
    model, tokenizer = load_from_args(args)
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    best = tune(model, tokenizer, opts, args.out, resume=args.resume, plot=plot, name=args.model,
                progress=not args.no_progress)
    print(f"schedule {best['key']}: {best['speedup']:.2f}x TTFT at {opts.length} tokens (work {best['work_share']:.1%}), "
          f"answers agreeing {best['agreement']:.0%}, fact kept {best['evidence_kept']:.0%}, KL {best['kl_mean']:.4f}")
    print(f"wrote {args.out} and {plot}")
    return 0
