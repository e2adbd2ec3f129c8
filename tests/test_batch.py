"""`trimformer batch` on the tiny checkpoint: one output line per input line, each id once; malformed lines
reported alone; answers equal to `trimformer generate`; a re-run resumes; on Ray Data the same answers,
and every line once after an actor dies mid-job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_checkpoint import save_tiny

from trimformer import TrimConfig
from trimformer.batch import run_batch
from trimformer.batch_engine import Spec
from trimformer.cli import main

TRIM = ["--method", "lazy", "--keep", "0.5", "--layers", "1,3", "--sinks", "2", "--protect-last", "4"]
CONFIG = TrimConfig(method="lazy", keep=0.5, layers=(1, 3), sinks=2, protect_last=4)
PROMPTS = ["the quick brown fox jumps over the lazy dog", "seven cats watch from a tall tree",
           "a b c d e f g h i j k l m n o p", "hello", "numbers: 3 1 4 1 5 9 2 6 5 3 5 8 9 7 9",
           "what is the capital of the moon?"]
NEW = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("batch") / "tiny")


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompts_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])


def batch(folder: Path, src: Path, out: Path, *extra: str) -> int:
    return main(["batch", "--model", str(folder), *TRIM, "--input", str(src), "--output", str(out),
                 "--max-new-tokens", str(NEW), *extra])


def spec(folder: Path) -> Spec:
    return Spec(str(folder), CONFIG, max_new_tokens=NEW)


def test_each_line_once_and_equal_to_generate(folder, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert batch(folder, prompts_file(tmp_path), out) == 0
    records = {r["id"]: r for r in read(out)}
    assert len(read(out)) == len(PROMPTS) == len(records)
    for i, prompt in enumerate(PROMPTS):
        capsys.readouterr()
        assert main(["generate", "--model", str(folder), *TRIM, "--prompt", prompt, "--max-new-tokens", str(NEW)]) == 0
        record = records[f"p{i}"]
        assert record["answer"] == capsys.readouterr().out.removesuffix("\n")
        assert set(record) == {"id", "answer", "ttft_s", "kept_fraction", "prompt_tokens", "new_tokens"}
        assert 0 < record["kept_fraction"] < 1 and record["new_tokens"] <= NEW and record["ttft_s"] > 0


def test_malformed_lines_reported_alone(folder, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": PROMPTS[0]},
        "{not json",                                                   # line 2
        {"prompt": PROMPTS[1]},                                        # 3: no id
        {"id": "a", "prompt": PROMPTS[2]},                             # 4: duplicate id
        {"id": "b", "prompt": PROMPTS[3], "max_tokens": 0},            # 5: bad max_tokens
        {"id": "c", "prompt": PROMPTS[3], "temperature": 0.7},         # 6: unknown field
        {"id": 7, "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": 3},
        {"id": "d", "messages": [{"role": "robot", "content": "x"}]},  # 8: bad role
        "",                                                            # blank: skipped
        {"id": "e", "prompt": PROMPTS[5]},
    ])
    out = tmp_path / "out.jsonl"
    assert batch(folder, src, out) == 0
    records = read(out)
    errors = {r["line"]: r for r in records if "error" in r}
    answers = {r["id"]: r for r in records if "error" not in r}
    assert sorted(errors) == [2, 3, 4, 5, 6, 8] and sorted(answers, key=str) == [7, "a", "e"]
    assert "duplicate id 'a' (first on line 1)" in errors[4]["error"] and errors[4]["id"] == "a"
    assert "max_tokens" in errors[5]["error"] and "temperature" in errors[6]["error"]
    assert errors[2]["id"] is None and "JSON" in errors[2]["error"]
    assert answers[7]["new_tokens"] <= 3


def test_rerun_skips_what_is_written(folder, tmp_path):
    src, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    done = [{"id": "p1", "answer": "PRE"}, {"id": "p4", "answer": "PRE"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "p2", "answ', encoding="utf-8")
    assert batch(folder, src, out) == 0
    records = read(out)
    assert sorted(r["id"] for r in records) == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r for r in records if r["answer"] == "PRE"] == done
    before = out.read_text(encoding="utf-8")
    assert batch(folder, src, out) == 0
    assert out.read_text(encoding="utf-8") == before


def test_a_second_job_on_the_same_output_is_refused(folder, tmp_path):
    from trimformer.batch import Output
    from trimformer.errors import TrimformerError

    src, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    with Output(out):                            # a job in progress holds the output
        with pytest.raises(TrimformerError, match="another job is writing"):
            Output(out)
        assert batch(folder, src, out) == 2      # the command ends with the error, writing nothing
    assert out.read_text(encoding="utf-8") == ""
    assert batch(folder, src, out) == 0 and len(read(out)) == len(PROMPTS)


def test_ray_same_answers(folder, tmp_path, ray_cluster):
    src = prompts_file(tmp_path)
    one, many = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    run_batch(src, one, spec(folder), progress=False)
    counts = run_batch(src, many, spec(folder), ray={"actors": 2}, progress=False)
    assert counts == {"answers": len(PROMPTS), "errors": 0, "skipped": 0}

    def strip(path: Path) -> dict:
        return {r["id"]: {k: v for k, v in r.items() if k != "ttft_s"} for r in read(path)}
    assert len(read(many)) == len(PROMPTS) and strip(many) == strip(one)


def test_ray_actor_killed_mid_job(folder, tmp_path, ray_cluster):
    from trimformer.batch_ray import ModelActor

    flag = tmp_path / "crashed"

    class CrashOnce(ModelActor):
        """Dies (the whole process) in the first batch any actor takes; later batches run."""

        def __call__(self, batch):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return super().__call__(batch)
            os._exit(1)

    src, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    run_batch(src, out, spec(folder), ray={"actors": 2, "actor": CrashOnce}, progress=False)
    assert flag.exists()
    assert sorted(r["id"] for r in read(out)) == [f"p{i}" for i in range(len(PROMPTS))]
    assert all("answer" in r for r in read(out))
