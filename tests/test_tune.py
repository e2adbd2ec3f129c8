"""`trimformer tune` on a tiny random Llama with a fake clock: the pick is the best fidelity among the
schedules whose speedup reaches the target, a resumed run skips what its state file holds, no schedule
reaching the target is an error naming the fastest, and the state, preset and plot are written."""

from __future__ import annotations

import json

import pytest

from trimformer import presets
from trimformer.errors import ConfigError
from trimformer_lab.calibrate.search import work_share
from trimformer_lab.calibrate.tune import TuneOptions, select_best, state_path, tune

from test_calibrate_schedule import CharTokenizer, cache, tiny  # noqa: F401  (fixtures: a tiny Llama, a fresh cache)


class FakeClock:
    """Speedup = 1 / work share (what the FLOPs would allow, roughly); counts the schedules it times."""

    def __init__(self):
        self.timed: list[dict[int, float]] = []

    def __call__(self, schedule):
        self.timed.append(dict(schedule))
        speedup = 1.0 / work_share(schedule, 6)
        return {"speedup": speedup, "full_s": 1.0, "trimmed_s": 1.0 / speedup, "flop_ratio": speedup,
                "kept_fraction": 1.0 / speedup}


def options(target: float = 2.0, **kw) -> TuneOptions:
    return TuneOptions(target_speedup=target, length=128, prompts=2, calibration_length=300, repeats=1,
                       ladder=(0.7, 0.6, 0.5, 0.4, 0.3), **kw)


def record(key, speedup, agreement, kept=1.0, kl=0.1):
    return {"key": key, "speedup": speedup, "agreement": agreement, "evidence_kept": kept, "kl_mean": kl,
            "work_share": 1 / speedup}


def test_selection_is_the_best_fidelity_among_those_reaching_the_target():
    records = [record("slow-faithful", 1.5, 1.0, kl=0.001), record("fast-poor", 4.0, 0.5),
               record("ok", 3.1, 1.0, kl=0.05), record("ok-closer", 3.0, 1.0, kl=0.02),
               record("ok-lost-fact", 3.5, 1.0, kept=0.5, kl=0.01)]
    assert select_best(records, 3.0)["key"] == "ok-closer"
    assert select_best(records, 1.2)["key"] == "slow-faithful"
    with pytest.raises(ConfigError, match=r"fastest measured, fast-poor .* reached 4\.00x"):
        select_best(records, 5.0)


def test_tune_writes_preset_state_and_plot_and_resumes(tiny, tmp_path):
    clock = FakeClock()
    out = tmp_path / "tiny.json"
    best = tune(tiny, CharTokenizer(), options(), out, speed=clock, plot=tmp_path / "tiny.png", name="tiny",
                progress=False)
    state = json.loads(state_path(out).read_text())
    measured = list(state["measured"].values())
    assert best["speedup"] >= 2.0 and best == select_best(measured, 2.0)
    # explored from the least aggressive on, stopping two candidates after the first reaching the target
    speeds = [r["speedup"] for r in measured]
    assert speeds == sorted(speeds)
    first = next(i for i, s in enumerate(speeds) if s >= 2.0)
    assert len(measured) == min(len(state["ladder"]), first + 3)
    preset = presets.load_preset(out)
    assert preset["schedule"] == {int(k): v for k, v in best["schedule"].items()}
    assert preset["measured"]["speedup"] == best["speedup"] and preset["target"] == {"speedup": 2.0, "length": 128}
    assert (tmp_path / "tiny.png").stat().st_size > 1000
    # a rerun with resume times nothing again and picks the same
    again = FakeClock()
    assert tune(tiny, CharTokenizer(), options(), out, speed=again, resume=True, progress=False) == best
    assert again.timed == []
    # forgetting one measured candidate: only that one is timed again
    forgotten = measured[0]["key"]
    del state["measured"][forgotten]
    state_path(out).write_text(json.dumps(state))
    tune(tiny, CharTokenizer(), options(), out, speed=again, resume=True, progress=False)
    assert [",".join(f"{k}:{v:g}" for k, v in s.items()) for s in again.timed] == [forgotten]


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
    out = tmp_path / "tiny.json"
    tune(tiny, CharTokenizer(), options(), out, speed=FakeClock(), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        tune(tiny, CharTokenizer(), options(target=2.5), out, speed=FakeClock(), resume=True, progress=False)


def test_no_schedule_reaching_the_target_names_the_fastest(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"no schedule reached a 50\.0x TTFT speedup; the fastest measured"):
        tune(tiny, CharTokenizer(), options(target=50.0), tmp_path / "t.json", speed=FakeClock(),
             plot=tmp_path / "t.png", progress=False)
    assert not (tmp_path / "t.json").exists()
    assert (tmp_path / "t.png").exists()                   # what was explored is still drawn


def test_bad_tune_options_are_refused():
    with pytest.raises(ConfigError, match="target speedup"):
        TuneOptions(target_speedup=1.0)


def test_commands_join_the_cli():
    from trimformer.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["calibrate", "schedule", "--model", "m", "--out", "p.json", "--target-speedup", "2.5"])
    assert args.target_speedup == 2.5 and args.length == 2048 and args.prompts == 8 and args.verify == 6
    assert args.stages == "3,4,5" and args.grid == "0.3,0.4,0.5,0.6,0.7"
    args = parser.parse_args(["tune", "--model", "m", "--target-speedup", "3", "--out", "p.json", "--resume"])
    assert args.length == 8192 and args.resume and args.plot is None
    with pytest.raises(SystemExit):                       # one target at a time
        parser.parse_args(["calibrate", "schedule", "--out", "p", "--target-work", "0.4", "--target-speedup", "2"])
