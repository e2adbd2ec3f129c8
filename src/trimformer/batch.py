"""`trimformer batch`: greedy answers to a JSONL file of prompts, one output line per input line.

An input line is ``{"id": ..., "prompt": "..."}`` (wrapped in the chat template as `trimformer generate`
wraps it, unless --raw; a list of token ids is taken as it is) or ``{"id": ..., "messages": [...]}``, with
an optional ``"max_tokens"``; the fields are checked as the server checks a request. The id is a string or
an integer, unique in the file. Each line gets one output line:
``{"id", "answer", "ttft_s", "kept_fraction", "prompt_tokens", "new_tokens"}``, or ``{"id", "line",
"error"}`` for a line that cannot be answered (bad JSON, no id, a duplicate id, a bad field, a prompt too
long for the model); blank lines are skipped. Output lines are appended and flushed one at a time, in the
order they finish. A re-run with the same output skips what is already there (answers by id, errors by
line number), so an interrupted job resumes where it stopped; delete an error line to retry its input line.

Without --ray one process answers the lines in order; with --ray a pool of model actors on Ray Data does
(`trimformer.batch_ray`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from .batch_engine import BatchEngine, Item, Spec, error_record
from .config import TrimConfig
from .errors import TrimformerError
from .serve_api import RequestError, parse_request

FIELDS = ("id", "prompt", "messages", "max_tokens")


# ---- output -----------------------------------------------------------------------------------
class Output:
    """The output JSONL, opened for appending: the ids answered and the lines reported there, and one
    flushed line per new record. Use as a context manager."""

    def __init__(self, path: Path):
        self.ids: set[str | int] = set()     # ids answered
        self.lines: set[int] = set()          # input lines reported as errors
        self.written = {"answers": 0, "errors": 0}
        self.file = path.open("a", encoding="utf-8")
        _lock(self.file, path)               # before reading: no other job appends while this one runs
        self._read(path)

    def _read(self, path: Path) -> None:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):                  # a line cut short by an interrupted job: written again
            with path.open("r+b") as f:
                f.truncate(end)
        for raw in data[:end].splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if "error" in record and isinstance(record.get("line"), int):
                self.lines.add(record["line"])
            elif "error" not in record and _valid_id(record.get("id")):
                self.ids.add(record["id"])

    def done(self, line: int, ident: str | int | None = None) -> bool:
        """Whether input `line` (holding the valid id `ident`, if any) has its record already."""
        return line in self.lines or (ident is not None and ident in self.ids)

    def write(self, record: dict[str, Any], line: int, ident: str | int | None = None) -> bool:
        """Append `record` for input `line` unless that line has one already; True when written."""
        if self.done(line, ident):
            return False
        if "error" in record:
            self.lines.add(line)
            self.written["errors"] += 1
        else:
            self.ids.add(record["id"])
            self.written["answers"] += 1
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        return True

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def _lock(file: Any, path: Path) -> None:
    """Hold an exclusive lock on the open output `file` (POSIX), or refuse: two jobs appending to one file
    would answer the same lines twice."""
    try:
        import fcntl
    except ImportError:                      # no POSIX locks on this platform: run one job per output
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        file.close()
        raise TrimformerError(f"another job is writing {path}; wait for it to end or give another --output") from exc


# ---- input ------------------------------------------------------------------------------------
def _valid_id(value: Any) -> bool:
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def _request(body: dict[str, Any]) -> dict[str, Any]:
    """The line less its id, checked as the server checks a request; RequestError if a field is wrong."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; a line holds {', '.join(FIELDS)}")
    if ("prompt" in body) == ("messages" in body):
        raise RequestError(400, "a line needs exactly one of 'prompt' and 'messages'")
    request = {k: v for k, v in body.items() if k != "id"}
    parse_request(request, chat="messages" in request)
    return request


def scan(path: Path) -> Iterator[Item | tuple[int, dict[str, Any]]]:
    """Each non-blank line of the input: an Item, or (line, error record)."""
    first: dict[str | int, int] = {}
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            ident = None
            try:
                body = json.loads(raw.decode("utf-8"))
                if not isinstance(body, dict):
                    raise RequestError(400, "a line must be a JSON object")
                ident = body.get("id")
                if not _valid_id(ident):
                    raise RequestError(400, f"'id' is required: a non-empty string or an integer, got {ident!r}")
                if ident in first:
                    raise RequestError(400, f"duplicate id {ident!r} (first on line {first[ident]})")
                first[ident] = line
                yield Item(line, ident, _request(body))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield line, error_record(line, None, f"not a JSON line: {exc}")
            except RequestError as exc:
                yield line, error_record(line, ident if _valid_id(ident) else None, exc.message)


# ---- the job ----------------------------------------------------------------------------------
def answers(engine: BatchEngine, items: Iterable[Item]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of each item, in order, in this process."""
    for item in items:
        yield item.line, engine.record(item)


def run_batch(input_path: str | Path, output_path: str | Path, spec: Spec,
              ray: dict[str, Any] | None = None, progress: bool = True) -> dict[str, int]:
    """Answer every line of `input_path` not yet in `output_path`; returns the counts written and skipped.
    `ray`: None runs in this process; a dict (possibly empty) runs on Ray Data with those keyword options of
    `trimformer.batch_ray.answers` (actors, threads_per_actor, address, actor)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise TrimformerError(f"no input file {input_path}")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise TrimformerError("--output must differ from --input")
    with Output(output_path) as output:
        items: list[Item] = []
        skipped = 0
        for entry in scan(input_path):
            if isinstance(entry, Item):
                pending = not output.done(entry.line, entry.id)
                if pending:
                    items.append(entry)
            else:
                pending = output.write(entry[1], entry[0])
            skipped += not pending
        ident = {item.line: item.id for item in items}
        if items:
            if ray is None:
                stream = answers(spec.engine(), items)
            else:
                from .batch_ray import answers as ray_answers    # Ray only when asked for
                stream = ray_answers(items, spec, **ray)
            with tqdm(total=len(items), desc="batch", unit="line", disable=not progress) as bar:
                for line, record in stream:
                    bar.update(output.write(record, line, ident[line]))
        return {**output.written, "skipped": skipped}


def batch_command(args: argparse.Namespace, config: TrimConfig | None) -> int:
    """`trimformer batch` with the parsed arguments and the trim configuration they give (None: none)."""
    for flag in ("max_new_tokens", "actors", "threads_per_actor"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise TrimformerError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    spec = Spec(args.model, config, args.max_new_tokens, args.raw, args.threads)
    ray = None
    if args.ray:
        ray = {"actors": args.actors, "threads_per_actor": args.threads_per_actor, "address": args.ray_address}
    counts = run_batch(args.input, args.output, spec, ray)
    print(f"trimformer batch: {counts['answers']} answered, {counts['errors']} errors, {counts['skipped']} already "
          f"in {args.output}", file=sys.stderr)
    return 0
