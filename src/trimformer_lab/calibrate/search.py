"""`calibrate_schedule`: the pruning schedule for the model at hand, measured on its own behaviour.

1. Reference: one full forward per calibration prompt records every layer's last-query scores (`evidence`),
   the first answer token's distribution and the greedy answer.
2. Candidates: 3-5 stages on layers where one stage keeps the asked fact at a small keep ratio (the
   `shortlist` layers with the smallest median need, plus the best early ones so a first stage can come
   early), the first stage's keep ratio and the later stages' one from `grid`, all within the target (a share
   of token-layer work, or a FLOPs ratio at the prompt length); screened on the recorded scores (evidence kept
   to the end, then the later layers' score mass the computed tokens hold).
3. Verification: the best `verify` candidates, the depth-fraction fallback and the model's current preset run
   trimmed on every prompt; the pick has the most greedy answers agreeing with the full model's, then the
   most prompts whose asked fact reached the last layer, then the smallest first-answer-token KL.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from trimformer.config import default_layers
from trimformer.errors import ConfigError
from trimformer.ops.flops import prefill_flops
from trimformer.ops.smoothing import span_max_pool
from trimformer.presets import find_preset

from .evidence import (Outcome, Reference, ScoreOptions, evidence_need, num_layers, protected_mask,
                       record_reference, run_trimmed)
from .prompts import CalibrationPrompt, make_prompts

TEXT = ("English docstrings of the Python standard library (sysconfig stdlib, read with ast) with synthetic "
        "facts planted: numbers, letter-digit codes, names and words; 1-3 facts per prompt, a question about one")


@dataclass
class CalibrateOptions:
    prompts: int = 8                  # calibration prompts
    length: int = 2048                # tokens per prompt
    target_work: float | None = 0.42  # share of token-layer work a schedule may do (ignored with target_speedup)
    target_speedup: float | None = None  # instead: FLOPs ratio (full / trimmed) at `length` a schedule must reach
    seed: int = 0
    verify: int = 6                   # screened candidates verified with trimmed forwards
    new_tokens: int = 8               # greedy answer tokens compared with the full model's
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    stages: tuple[int, ...] = (3, 4, 5)
    shortlist: int = 10               # layers candidates are built from
    score: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        if self.target_speedup is not None:
            if self.target_speedup <= 1.0:
                raise ConfigError(f"target speedup must be > 1 (full / trimmed), got {self.target_speedup}")
        elif self.target_work is None or not 0.0 < self.target_work < 1.0:
            raise ConfigError(f"target work must be a share in (0, 1), got {self.target_work}")
        if not self.stages or min(self.stages) < 1:
            raise ConfigError(f"stages must be counts of pruning stages >= 1, got {self.stages}")
        if not self.grid or not all(0.0 < r <= 1.0 for r in self.grid):
            raise ConfigError(f"the keep-ratio grid must hold ratios in (0, 1], got {self.grid}")
        if self.prompts < 1 or self.verify < 1:
            raise ConfigError(f"prompts and verify must be >= 1, got {self.prompts} and {self.verify}")


@dataclass
class Verified:
    schedule: dict[int, float]
    source: str                        # "screen", "fallback" (depth fractions) or "preset" (the current one)
    work_share: float
    flops_ratio: float
    agreement: float                   # share of prompts whose answer (`answer_text`) equals the full model's
    evidence_kept: float               # share of prompts whose asked fact reached the last layer
    kl_mean: float
    kl_max: float
    correct: float                     # share of prompts the trimmed model answers right
    eligible: bool = True              # within the target

    def key(self) -> tuple:
        return (self.agreement, self.evidence_kept, -self.kl_mean)


# ---- work and FLOPs --------------------------------------------------------------------------------
def tokens_per_layer(schedule: dict[int, float], layers: int, length: int) -> list[int]:
    """Tokens computed at each layer of an n-token prompt: each stage keeps ceil(keep x live)."""
    counts, live = [], length
    for layer in range(layers):
        counts.append(live)
        if layer in schedule:
            live = max(1, math.ceil(schedule[layer] * live - 1e-9))
    return counts


def work_share(schedule: dict[int, float], layers: int) -> float:
    """Share of token-layer computations done: the mean over layers of the share of tokens still live."""
    live, total = 1.0, 0.0
    for layer in range(layers):
        total += live
        live *= schedule.get(layer, 1.0)
    return total / layers


def flops_ratio(config, schedule: dict[int, float], length: int) -> float:
    """Full / trimmed prefill FLOPs of one `length`-token prompt (`trimformer.ops.flops`)."""
    layers = config.num_hidden_layers
    full = prefill_flops(config, [[length]] * layers)
    return full / prefill_flops(config, [[n] for n in tokens_per_layer(schedule, layers, length)])


# ---- references and screening -----------------------------------------------------------------------
def record_references(model, prompts: list[CalibrationPrompt], opts: CalibrateOptions, eos,
                      progress: bool = True) -> list[Reference]:
    return [record_reference(model, p, opts.score, opts.new_tokens, eos)
            for p in tqdm(prompts, desc="full forwards", disable=not progress)]


def layer_needs(refs: list[Reference], prompts: list[CalibrationPrompt], score: ScoreOptions) -> list[list[float]]:
    """need[l][i]: the smallest keep ratio at which layer l alone keeps every token of prompt i's fact."""
    per_prompt = []
    for ref, prompt in zip(refs, prompts):
        evidence, protected = prompt.evidence_mask(), protected_mask(prompt.length, score)
        per_prompt.append([evidence_need(ref.scores[l], evidence, protected, score.span)
                           for l in range(ref.scores.shape[0])])
    return [list(col) for col in zip(*per_prompt)]


def shortlist_layers(needs: list[list[float]], size: int) -> list[int]:
    """The `size` layers (never layer 0) with the smallest median need, plus the 3 best in the first third."""
    medians = {l: statistics.median(v) for l, v in enumerate(needs) if l > 0}
    best = sorted(medians, key=lambda l: (medians[l], l))[:size]
    early = sorted((l for l in medians if l <= max(1, len(needs) // 3)), key=lambda l: (medians[l], l))[:3]
    return sorted(set(best) | set(early))


def within(schedule: dict[int, float], config, opts: CalibrateOptions) -> bool:
    if opts.target_speedup is not None:
        return flops_ratio(config, schedule, opts.length) >= opts.target_speedup - 1e-9
    return work_share(schedule, config.num_hidden_layers) <= opts.target_work + 1e-9


def candidates(layers: list[int], config, opts: CalibrateOptions) -> list[dict[int, float]]:
    """Schedules of `opts.stages` stages on `layers`: the first keeps r1, the later ones r, both from the grid;
    only those within the target."""
    out = []
    for k in opts.stages:
        for chosen in itertools.combinations(layers, k):
            for r1, r in itertools.product(opts.grid, repeat=2):
                schedule = {chosen[0]: r1, **{l: r for l in chosen[1:]}}
                if within(schedule, config, opts):
                    out.append(schedule)
    return out


class Screen:
    """Schedules scored on the full model's recorded scores, fast enough for thousands of candidates: each
    layer's tokens are ranked once (span max-pooling over the whole prompt, protected tokens first), a stage
    keeps the best-ranked share of the tokens still live, and the live sets of shared schedule prefixes are
    computed once. (`evidence.cascade` follows the mechanism exactly, pooling over the live tokens only.)"""

    def __init__(self, refs: list[Reference], prompts: list[CalibrationPrompt], score: ScoreOptions):
        self.rows = []
        for ref, prompt in zip(refs, prompts):
            protected = protected_mask(prompt.length, score)
            pooled = span_max_pool(ref.scores.float(), score.span).masked_fill(protected, float("inf"))  # (L-1, T)
            order = pooled.sort(dim=-1, descending=True, stable=True).indices
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
            totals = ref.scores.sum(-1).clamp(min=1e-12)                                               # (L-1,)
            self.rows.append((ranks, ref.scores, totals, prompt.evidence_mask(), int(protected.sum())))
        self.memo: dict[tuple, list[torch.Tensor]] = {}

    def _live(self, stages: tuple[tuple[int, float], ...], keep: bool = True) -> list[torch.Tensor]:
        """The live token indices of every prompt after `stages` (kept for reuse when `keep`: a whole
        schedule's are not, only its prefixes', so memory grows with the prefixes, not the candidates)."""
        if not stages:
            return [torch.arange(row[0].shape[1], dtype=torch.int32) for row in self.rows]
        if stages in self.memo:
            return self.memo[stages]
        layer, ratio = stages[-1]
        out = []
        for live, (ranks, _, _, _, n_protected) in zip(self._live(stages[:-1]), self.rows):
            count = min(live.numel(), max(n_protected, math.ceil(ratio * live.numel() - 1e-9)))
            out.append(live[ranks[layer, live].topk(count, largest=False).indices])
        if keep:
            self.memo[stages] = out
        return out

    def __call__(self, schedule: dict[int, float]) -> tuple[float, float, float]:
        """(share of prompts keeping all evidence, mean evidence recall, mean later-layer score mass kept)."""
        stages = tuple(sorted(schedule.items()))
        lives = [self._live(stages[: i + 1], keep=i + 1 < len(stages)) for i in range(len(stages))]
        recalls, masses = [], []
        for p, (_, scores, totals, evidence, _) in enumerate(self.rows):
            layer_mass = []
            for i, (layer, _) in enumerate(stages):
                upto = stages[i + 1][0] if i + 1 < len(stages) else scores.shape[0] - 1
                if upto > layer:
                    block = slice(layer + 1, upto + 1)
                    layer_mass.append(scores[block][:, lives[i][p]].sum(-1) / totals[block])
            live = lives[-1][p]
            recalls.append(float(evidence[live].sum()) / max(1, int(evidence.sum())))
            masses.append(float(torch.cat(layer_mass).mean()) if layer_mass else 1.0)
        return sum(r >= 1.0 for r in recalls) / len(recalls), statistics.mean(recalls), statistics.mean(masses)


def screen(schedules: list[dict[int, float]], refs: list[Reference], prompts: list[CalibrationPrompt],
           score: ScoreOptions, progress: bool = True) -> list[tuple[dict[int, float], float, float, float]]:
    """(schedule, share of prompts keeping all evidence, mean evidence recall, mean score mass), best first."""
    scorer = Screen(refs, prompts, score)
    rows = [(s, *scorer(s)) for s in tqdm(schedules, desc="screen", disable=not progress)]
    return sorted(rows, key=lambda row: (-row[1], -row[2], -row[3]))


def pick_diverse(rows: list, count: int) -> list[dict[int, float]]:
    """`count` screened schedules, best first: one per first-stage keep ratio (how much the first stage drops
    moves the answer more than the screen can tell), then one per pair of first two layers, then distinct
    layer sets."""
    out: list[dict[int, float]] = []
    for distinct in (lambda s: s[min(s)], lambda s: tuple(s)[:2], lambda s: tuple(s)):
        seen = {distinct(s) for s in out}
        for schedule, *_ in rows:
            if len(out) == count:
                return out
            if distinct(schedule) not in seen and schedule not in out:
                seen.add(distinct(schedule))
                out.append(schedule)
    return out


# ---- verification ----------------------------------------------------------------------------------
def verify(model, tokenizer, prompts: list[CalibrationPrompt], refs: list[Reference],
           schedules: list[tuple[dict[int, float], str]], opts: CalibrateOptions, progress: bool = True,
           on_result: Callable[[Verified], None] | None = None) -> list[Verified]:
    """Each schedule trimmed on every prompt, against the full model's references."""
    config, out = model.config, []
    bar = tqdm(total=len(schedules) * len(prompts), desc="verify", disable=not progress)
    for schedule, source in schedules:
        outcomes: list[Outcome] = []
        for prompt, ref in zip(prompts, refs):
            outcomes.append(run_trimmed(model, prompt, schedule, ref, opts.score, tokenizer.eos_token_id))
            bar.update()
        kls = [o.kl for o in outcomes]
        result = Verified(
            schedule, source, work_share(schedule, config.num_hidden_layers),
            flops_ratio(config, schedule, opts.length),
            agreement=sum(answer_text(tokenizer, o.tokens) == answer_text(tokenizer, r.tokens)
                          for o, r in zip(outcomes, refs)) / len(outcomes),
            evidence_kept=sum(o.evidence_kept for o in outcomes) / len(outcomes),
            kl_mean=statistics.mean(kls), kl_max=max(kls),
            correct=sum(_correct(tokenizer, o.tokens, p.answer) for o, p in zip(outcomes, prompts)) / len(prompts),
            eligible=within(schedule, config, opts))
        out.append(result)
        if on_result is not None:
            on_result(result)
    bar.close()
    return out


def answer_text(tokenizer, tokens: list[int]) -> str:
    """The answer in a greedy continuation: its first line, without the closing full stop."""
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text.split("\n")[0].strip().rstrip(".")


def _correct(tokenizer, tokens: list[int], answer: str) -> bool:
    return answer.lower() in tokenizer.decode(tokens, skip_special_tokens=True).lower()


# ---- the whole calibration -------------------------------------------------------------------------
@dataclass
class Calibration:
    best: Verified
    verified: list[Verified]
    needs: dict[int, float]           # median need per layer
    screened: int
    full_correct: float               # share of prompts the full model answers right
    seconds: float
    options: CalibrateOptions

    def preset_fields(self, threads: int | None = None) -> dict[str, Any]:
        """The target, options, measured and calibration sections of the preset this calibration writes."""
        o, best = self.options, self.best
        target = ({"flops_ratio": o.target_speedup, "length": o.length} if o.target_speedup is not None
                  else {"work_share": o.target_work})
        measured = {
            "work_share": round(best.work_share, 4), "flops_ratio": round(best.flops_ratio, 3), "length": o.length,
            "agreement": best.agreement, "evidence_kept": best.evidence_kept, "kl_mean": round(best.kl_mean, 5),
            "kl_max": round(best.kl_max, 5), "trimmed_correct": best.correct, "full_correct": self.full_correct,
            "threads": threads or torch.get_num_threads(), "seconds": round(self.seconds, 1),
            "screened": self.screened, "layer_need": {str(l): round(v, 4) for l, v in self.needs.items()},
            "verified": [{**asdict(v), "schedule": {str(k): r for k, r in v.schedule.items()}}
                         for v in self.verified],
        }
        calibration = {"text": TEXT, "prompts": o.prompts, "length": o.length, "seed": o.seed,
                       "stages": list(o.stages), "grid": list(o.grid),
                       "seconds": round(self.seconds, 1), "command": "trimformer calibrate schedule"}
        return {"target": target, "options": asdict(o.score), "measured": measured, "calibration": calibration}


def calibrate_schedule(model, tokenizer, opts: CalibrateOptions, progress: bool = True) -> Calibration:
    """Measure the model's schedule (module docstring); raises ConfigError when no candidate fits the target."""
    start = time.perf_counter()
    config, layers = model.config, num_layers(model)
    prompts = make_prompts(tokenizer, opts.prompts, opts.length, opts.seed)
    refs = record_references(model, prompts, opts, tokenizer.eos_token_id, progress)
    needs = layer_needs(refs, prompts, opts.score)
    pool = candidates(shortlist_layers(needs, opts.shortlist), config, opts)
    if not pool:
        raise ConfigError(f"no schedule of {opts.stages} stages with keep ratios {opts.grid} reaches the target "
                          f"({_target(opts)}); give a larger --target-work or a smaller --target-speedup")
    rows = screen(pool, refs, prompts, opts.score, progress)
    chosen = [(s, "screen") for s in pick_diverse(rows, opts.verify)]
    chosen += reference_schedules(config, layers, [s for s, _ in chosen])
    verified = verify(model, tokenizer, prompts, refs, chosen, opts, progress)
    eligible = [v for v in verified if v.eligible]
    best = max(eligible, key=Verified.key)
    full_correct = sum(_correct(tokenizer, r.tokens, p.answer) for r, p in zip(refs, prompts)) / len(prompts)
    return Calibration(best, verified, {l: statistics.median(v) for l, v in enumerate(needs)}, len(pool),
                       full_correct, time.perf_counter() - start, opts)


def reference_schedules(config, layers: int, taken: list[dict[int, float]]) -> list[tuple[dict[int, float], str]]:
    """The depth-fraction fallback (keep 0.5) and the model's current preset, unless already among `taken`."""
    out = [({l: 0.5 for l in default_layers(layers)}, "fallback")]
    current = find_preset(config)
    if current is not None:
        out.append((dict(current["schedule"]), "preset"))
    return [(s, src) for s, src in out if s not in taken]


def _target(opts: CalibrateOptions) -> str:
    if opts.target_speedup is not None:
        return f"FLOPs ratio >= {opts.target_speedup} at {opts.length} tokens"
    return f"work share <= {opts.target_work}"
