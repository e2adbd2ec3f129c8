"""Data-parallel evaluation: `torchrun --nproc_per_node 2 -m trimformer eval ...` on the CPU (gloo)
writes the results file a single process writes, timings aside; part files of an interrupted run are
merged back in item order."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_prompt
from tiny_checkpoint import save_tiny

from trimformer.cli import main
from trimformer_lab.distributed import TIMING_FIELDS, merge_parts, part_path, shard, without_timings
from trimformer_lab.evaluation.items import EvalItem
from trimformer_lab.evaluation.store import ResultStore

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _items(counts: dict[str, int]) -> dict[str, list[EvalItem]]:
    return {task: [EvalItem(task=task, id=str(i), input_ids=make_prompt(8, seed=i), references=[], metric="fidelity",
                            max_new_tokens=1) for i in range(n)] for task, n in counts.items()}


def test_shard_deals_items_round_robin_and_keeps_every_task():
    items = _items({"a": 3, "b": 1, "c": 2})
    shards = [shard(items, rank, 2, torch.device("cpu")) for rank in range(2)]
    assert {t: [i.id for i in v] for t, v in shards[0].items()} == {"a": ["0", "2"], "b": [], "c": ["0"]}
    assert {t: [i.id for i in v] for t, v in shards[1].items()} == {"a": ["1"], "b": ["0"], "c": ["1"]}


def test_interrupted_run_parts_merge_in_item_order(tmp_path):
    items = _items({"a": 4})
    path = tmp_path / "out.json"
    main_store = ResultStore(path)
    main_store.cells["k"] = {"task": "a", "label": "full", "records": {"2": {"score": 2}}}
    main_store.save()
    for rank, ids in ((0, ["3", "1"]), (1, ["0", "2"])):
        part = ResultStore(part_path(path, rank))
        part.cells["k"] = {"task": "a", "label": "full", "records": {i: {"score": int(i)} for i in ids}}
        part.save()
    merge_parts(path, items)
    records = json.loads(path.read_text())["cells"]["k"]["records"]
    assert list(records.items()) == [("2", {"score": 2}), ("0", {"score": 0}), ("1", {"score": 1}),
                                     ("3", {"score": 3})]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def _prompts(path: Path) -> Path:
    words = "the quick brown fox jumps over lazy dogs while seven cats watch from a tall tree".split()
    rng = random.Random(0)
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(30 + 10 * i)) + "\n" for i in range(5)))
    return path


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_torchrun_two_processes_write_the_single_process_results(tmp_path, monkeypatch):
    save_tiny(tmp_path / "tiny")
    _prompts(tmp_path / "prompts.txt")
    args = ["eval", "fidelity", "--model", "tiny", "--prompts", "prompts.txt", "--method", "lazy,random",
            "--keep", "0.5", "--tokens", "4", "--budget", "400", "--no-progress", "--threads", "1"]
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--json", "single/out.json"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "trimformer",
                          *args, "--json", "multi/out.json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| average | lazy@0.5 |") == 1            # rank 0 alone reports

    single = json.loads((tmp_path / "single/out.json").read_text())
    multi = json.loads((tmp_path / "multi/out.json").read_text())
    multi["plots"] = [p.replace("multi/", "single/") for p in multi["plots"]]
    assert json.dumps(without_timings(multi)) == json.dumps(without_timings(single))   # order included
    records = [r for cell in multi["cells"].values() for r in cell["records"].values()]
    assert len(records) == 3 * 5 and all(TIMING_FIELDS & set(r) == {"ttft_s", "total_s", "cpu_s"} for r in records)
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["out", "out.fidelity", "out.json"]
    for side in sorted((tmp_path / "single/out.fidelity").iterdir()):
        torch.testing.assert_close(torch.load(tmp_path / "multi/out.fidelity" / side.name), torch.load(side))
