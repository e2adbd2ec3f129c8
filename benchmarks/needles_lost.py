"""Needles the full model finds that a trimmed variant loses, per model, task and variant, from the results
files of `benchmarks/any_model.sh` (single needles by item; four-needle prompts by number, the numbers
rebuilt from the prompt seeds with the model's tokenizer).

    .venv/bin/python benchmarks/needles_lost.py smollm2-135m qwen2.5-coder-0.5b gemma-3-270m
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer

from trimformer.loading import embedded_model_path
from trimformer_lab.evaluation.needle import make_multi_needle
from trimformer_lab.evaluation.tasks import _essay_dir

RESULTS = Path("benchmarks/results/any_model")


def numbers_in(text: str, numbers: list[str]) -> set[str]:
    flat = re.sub(r"[,\s]", "", text)
    return {n for n in numbers if n in flat}


def report(model: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path(model))
    for name in ("needle", "multi_needle"):
        cells: dict[str, dict[str, dict]] = {}
        for cell in json.loads((RESULTS / model / f"{name}.json").read_text())["cells"].values():
            cells.setdefault(cell["task"], {})[cell["label"]] = cell["records"]
        for task, variants in sorted(cells.items()):
            full, length = variants.pop("full"), int(task.split("_")[1])
            for label, records in sorted(variants.items()):
                found_full = found = lost = total = 0
                for item, record in full.items():
                    if name == "needle":
                        numbers = ["x"]      # scored 0/1 per item
                        hit_full = {"x"} if record["score"] == 1 else set()
                        hit = {"x"} if records[item]["score"] == 1 else set()
                    else:
                        seed = int(item.split("=")[1])
                        numbers = make_multi_needle(tokenizer, length, 4, seed=length + seed,
                                                    essays=_essay_dir(None)).answer.split("|")
                        hit_full = numbers_in(record["prediction"], numbers)
                        hit = numbers_in(records[item]["prediction"], numbers)
                    total += len(numbers)
                    found_full, found, lost = found_full + len(hit_full), found + len(hit), lost + len(hit_full - hit)
                variant = "fallback" if "layers=" in label else "preset"
                print(f"| {model} | {task} | {variant} | {found_full}/{total} | {found}/{total} | {lost} |")


if __name__ == "__main__":
    print("| model | task | variant | full found | trimmed found | lost |\n|---|---|---|---|---|---|")
    for model in sys.argv[1:] or ["smollm2-135m"]:
        report(model)
