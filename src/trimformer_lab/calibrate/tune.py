"""`tune`: the schedule with the best fidelity among those whose measured TTFT speedup reaches a target.

Candidates come from the calibration's screen (`search`, keep ratios down to 0.2): for each work share of
`LADDER`, the best-screened schedule within it, joined by the depth-fraction fallback and the model's current
preset; they are explored from the least aggressive on. Each is timed against the full model at `length`
tokens (`bench.bench_prefill`: full and trimmed in one process, alternating, after a warm-up; medians) and its
fidelity measured on the calibration prompts (`search.verify`: greedy answer agreement, the asked fact kept,
first-answer-token KL). Exploring stops `beyond` candidates after the first that reaches the target. Every
result goes to a state file next to the preset; with `resume`, measured candidates are skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from trimformer.config import TrimConfig
from trimformer.errors import ConfigError
from trimformer.presets import fingerprint, save_preset

from .. import bench
from .evidence import ScoreOptions
from .prompts import make_prompts
from .search import (TEXT, CalibrateOptions, Verified, candidates, layer_needs, num_layers, record_references,
                     reference_schedules, screen, shortlist_layers, verify, work_share)

LADDER = (0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1)
GRID = (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)    # keep ratios: down to 0.2, for the aggressive end of the ladder


@dataclass
class TuneOptions:
    target_speedup: float             # measured TTFT speedup (full / trimmed) to reach
    length: int = 8192                # prompt tokens the speedup is measured at
    prompts: int = 8                  # calibration prompts (fidelity)
    calibration_length: int = 2048    # tokens per calibration prompt
    seed: int = 0
    beyond: int = 2                   # candidates measured after the first that reaches the target
    repeats: int = 3                  # timed runs of each (after `warmup`), medians
    warmup: int = 1
    ladder: tuple[float, ...] = LADDER
    grid: tuple[float, ...] = GRID
    score: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        if self.target_speedup <= 1.0:
            raise ConfigError(f"target speedup must be > 1 (full / trimmed TTFT), got {self.target_speedup}")
        if self.length < 64 or self.repeats < 1 or self.prompts < 1:
            raise ConfigError(f"length >= 64, repeats >= 1 and prompts >= 1 are needed, got {self.length}, "
                              f"{self.repeats}, {self.prompts}")

    def settings(self) -> dict[str, Any]:
        """What a state file must match to be resumed."""
        return {"target_speedup": self.target_speedup, "length": self.length, "prompts": self.prompts,
                "calibration_length": self.calibration_length, "seed": self.seed, "score": asdict(self.score),
                "grid": list(self.grid), "ladder": list(self.ladder)}


Speed = Callable[[dict[int, float]], dict[str, float]]   # schedule -> {"speedup", "full_s", "trimmed_s", ...}


def bench_speed(model, tokenizer, opts: TuneOptions) -> Speed:
    """Times a schedule with `bench.bench_prefill` at `opts.length` tokens."""
    def measure(schedule: dict[int, float]) -> dict[str, float]:
        config = TrimConfig(method="lazy", schedule=dict(schedule), **opts.score.trim_options())
        row = bench.bench_prefill(model, tokenizer, [opts.length], config, repeats=opts.repeats,
                                  warmup=opts.warmup, progress=False)[0]
        return {"speedup": row.speedup, "full_s": row.full_ttft_s, "trimmed_s": row.trimmed_ttft_s,
                "flop_ratio": row.flop_ratio, "kept_fraction": row.kept_fraction}
    return measure


def state_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".tune.json")


def _key(schedule: dict[int, float]) -> str:
    return ",".join(f"{layer}:{keep:g}" for layer, keep in sorted(schedule.items()))


def _schedule(record: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in record["schedule"].items()}


def fidelity_key(record: dict) -> tuple:
    """Greater is better: greedy answers agreeing, then the asked fact kept, then a smaller KL."""
    return (record["agreement"], record["evidence_kept"], -record["kl_mean"])


def select_best(records: list[dict], target: float) -> dict:
    """The best fidelity among the records whose measured speedup reaches `target`; ConfigError naming the
    fastest measured when none does."""
    reaching = [r for r in records if r["speedup"] >= target]
    if not reaching:
        if not records:
            raise ConfigError("no candidate schedule was measured")
        fastest = max(records, key=lambda r: r["speedup"])
        raise ConfigError(f"no schedule reached a {target}x TTFT speedup; the fastest measured, {fastest['key']} "
                          f"(work {fastest['work_share']:.1%}), reached {fastest['speedup']:.2f}x. Give a smaller "
                          f"--target-speedup, a longer --length or more --threads")
    return max(reaching, key=fidelity_key)


def _best_or_none(records: list[dict], target: float) -> dict | None:
    try:
        return select_best(records, target)
    except ConfigError:
        return None


def _load_state(path: Path, model_print: str, opts: TuneOptions, resume: bool) -> dict:
    fresh = {"fingerprint": model_print, "settings": opts.settings(), "ladder": None, "measured": {}}
    if not resume or not path.exists():
        return fresh
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("fingerprint") != model_print or state.get("settings") != json.loads(json.dumps(opts.settings())):
        raise ConfigError(f"the state file {path} was written for other settings ({state.get('settings')}, model "
                          f"{state.get('fingerprint')}); run without --resume to start over, or with those settings")
    return state


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def tune(model, tokenizer, opts: TuneOptions, out: str | Path, *, resume: bool = False, speed: Speed | None = None,
         plot: str | Path | None = None, name: str | None = None, progress: bool = True) -> dict:
    """Explore, measure, select and write the preset to `out` (and the plot); returns the chosen record."""
    start = time.perf_counter()
    config, path = model.config, state_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _load_state(path, fingerprint(config), opts, resume)
    cal = CalibrateOptions(prompts=opts.prompts, length=opts.calibration_length, seed=opts.seed,
                           target_work=max(opts.ladder), grid=opts.grid, score=opts.score)
    cache: dict[str, Any] = {}

    def references():
        if "refs" not in cache:
            cache["prompts"] = make_prompts(tokenizer, cal.prompts, cal.length, cal.seed)
            cache["refs"] = record_references(model, cache["prompts"], cal, tokenizer.eos_token_id, progress)
        return cache["prompts"], cache["refs"]

    if state["ladder"] is None:
        prompts, refs = references()
        rows = screen(candidates(shortlist_layers(layer_needs(refs, prompts, cal.score), cal.shortlist), config, cal),
                      refs, prompts, cal.score, progress)
        layers = num_layers(model)
        ladder: list[dict[int, float]] = []
        for level in sorted(opts.ladder, reverse=True):
            best = next((s for s, *_ in rows if work_share(s, layers) <= level + 1e-9), None)
            if best is not None and best not in ladder:
                ladder.append(best)
        known = [s for s, _ in reference_schedules(config, layers, ladder) if work_share(s, layers) <= max(opts.ladder)]
        ladder = sorted(ladder + known, key=lambda s: -work_share(s, layers))   # least aggressive first
        state["ladder"] = [{str(k): v for k, v in s.items()} for s in ladder]
        _save_state(path, state)
    speed = speed or bench_speed(model, tokenizer, opts)
    ladder = [{int(k): v for k, v in s.items()} for s in state["ladder"]]
    reached = 0
    for schedule in tqdm(ladder, desc=f"tune ({opts.target_speedup}x at {opts.length})", disable=not progress):
        key = _key(schedule)
        if key not in state["measured"]:
            prompts, refs = references()
            fidelity: Verified = verify(model, tokenizer, prompts, refs, [(schedule, "tune")], cal, progress=False)[0]
            record = {"key": key, "schedule": {str(k): v for k, v in schedule.items()}, **speed(schedule),
                      "work_share": fidelity.work_share, "agreement": fidelity.agreement,
                      "evidence_kept": fidelity.evidence_kept, "kl_mean": fidelity.kl_mean, "kl_max": fidelity.kl_max,
                      "correct": fidelity.correct}
            state["measured"][key] = record
            _save_state(path, state)
        if state["measured"][key]["speedup"] >= opts.target_speedup:
            reached += 1
            if reached > opts.beyond:
                break
    records = [state["measured"][_key(s)] for s in ladder if _key(s) in state["measured"]]
    try:
        best = select_best(records, opts.target_speedup)
    finally:                                    # the plot shows what was explored, chosen or not
        if plot is not None and records:
            plot_frontier(records, opts.target_speedup, plot, title=f"{name or 'model'}: {opts.length} tokens",
                          chosen=_best_or_none(records, opts.target_speedup))
    seconds = time.perf_counter() - start
    measured = {k: best[k] for k in ("speedup", "full_s", "trimmed_s", "flop_ratio", "work_share", "agreement",
                                     "evidence_kept", "kl_mean", "kl_max", "correct") if k in best}
    measured.update({"length": opts.length, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
                     "explored": records})
    save_preset(out, config, _schedule(best), name=name, options=asdict(opts.score),
                target={"speedup": opts.target_speedup, "length": opts.length}, measured=measured,
                calibration={"text": TEXT, "prompts": opts.prompts, "length": opts.calibration_length,
                             "seed": opts.seed, "command": "trimformer tune", "seconds": round(seconds, 1)})
    return best


def plot_frontier(records: list[dict], target: float, path: str | Path, title: str = "",
                  chosen: dict | None = None) -> Path:
    """Mean first-answer-token KL against measured speedup for every explored schedule, the target as a line,
    the chosen schedule circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [r["speedup"] for r in records], [max(r["kl_mean"], 1e-6) for r in records]
    ax.scatter(xs, ys, c=["tab:green" if x >= target else "tab:gray" for x in xs])
    for r, x, y in zip(records, xs, ys):
        ax.annotate(f"{r['work_share']:.0%} work, {r['agreement']:.0%} agree", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if chosen is not None:
        ax.scatter([chosen["speedup"]], [max(chosen["kl_mean"], 1e-6)], s=200, facecolors="none",
                   edgecolors="tab:blue", label=f"chosen: {chosen['key']}")
    ax.axvline(target, color="tab:red", linestyle="--", label=f"target {target}x")
    ax.set_xlabel("measured TTFT speedup (full / trimmed)")
    ax.set_ylabel("first-answer-token KL (mean)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
