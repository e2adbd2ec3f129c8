"""ImageNet-style top-1 accuracy of an image classifier, full and trimmed (ToMe), side by side.

    trimformer eval imagenet --model DIR --images DIR [--r 13] [--limit N] [--json out.json]

`--model`: a folder holding a Hugging Face image classifier (ViT, DeiT, ...) and its image processor.
`--images`: either the ImageNet folder layout (``DIR/n01440764/*.JPEG``) or a flat folder whose file
names carry the synset (``ILSVRC2012_val_00000001_n01751748.JPEG`` or ``n01751748_123.JPEG``).
Labels: a synset maps to a class index through ``--synsets FILE`` (one synset per line in class order,
e.g. LOC_synset_mapping.txt), else the model's ``label2id`` when its labels are synsets, else the standard
ImageNet-1k order (sorted synsets) when the model has 1000 classes and every synset folder is present;
folders named by class index (``DIR/0/``, ``DIR/1/``...) also work.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForImageClassification

from trimformer.api import stats, trim, untrim
from trimformer.errors import InputError, ModelLoadError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
SYNSET = re.compile(r"n\d{8}")


def list_images(images: str | Path) -> list[tuple[Path, str]]:
    """(path, label key) for every image: the folder name (ImageNet layout) or the synset in the name."""
    root = Path(images)
    if not root.is_dir():
        raise InputError(f"--images {root} is not a folder")
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.parent != root:
            out.append((path, path.parent.name))
        else:
            match = SYNSET.search(path.stem)
            if match is None:
                raise InputError(f"{path.name}: a flat image folder needs the synset (n########) in each file name")
            out.append((path, match.group(0)))
    if not out:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return out


def label_index(keys: list[str], config, synsets_file: str | Path | None = None) -> dict[str, int]:
    """Map each label key (synset or class index) to the model's class index."""
    if synsets_file is not None:
        lines = [ln.split()[0] for ln in Path(synsets_file).read_text().splitlines() if ln.strip()]
        table = {s: i for i, s in enumerate(lines)}
    elif all(k.isdigit() for k in keys):
        table = {k: int(k) for k in keys}
    else:
        label2id = {str(k).split(",")[0].strip(): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        if all(k in label2id for k in keys):
            table = label2id
        elif getattr(config, "num_labels", 0) == 1000 and len(set(keys)) == 1000:
            table = {s: i for i, s in enumerate(sorted(set(keys)))}
        else:
            raise InputError(
                "cannot map synsets to the model's classes: give --synsets FILE (one synset per line in class "
                "order), use a model whose label2id names synsets, or give all 1000 synset folders")
    missing = sorted(set(keys) - set(table))
    if missing:
        raise InputError(f"labels {missing[:5]} are not among the model's classes")
    return table


def load_classifier(model_dir: str | Path):
    try:
        model = AutoModelForImageClassification.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load an image classifier and its processor from {model_dir}: {exc}") from exc
    return model, processor


@torch.inference_mode()
def evaluate(model_dir: str | Path, images: str | Path, config: dict, batch: int = 16, limit: int | None = None,
             synsets: str | Path | None = None, progress: bool = True) -> dict:
    """Top-1 accuracy and images/s of the full and the trimmed model on the same batches (one process,
    alternating), with the trim's kept share and FLOP ratio."""
    from PIL import Image

    model, processor = load_classifier(model_dir)
    items = list_images(images)[:limit]
    table = label_index([k for _, k in items], model.config, synsets)
    correct = {"full": 0, "trimmed": 0}
    seconds = {"full": [], "trimmed": []}
    kept, ratio = [], []
    for i in tqdm(range(0, len(items), batch), desc="imagenet", disable=not progress):
        chunk = items[i:i + batch]
        pixels = processor(images=[Image.open(p).convert("RGB") for p, _ in chunk], return_tensors="pt")["pixel_values"]
        labels = torch.tensor([table[k] for _, k in chunk])
        for name in ("full", "trimmed"):
            if name == "trimmed":
                trim(model, dict(config))
            start = time.perf_counter()
            logits = model(pixel_values=pixels).logits
            seconds[name].append((time.perf_counter() - start) / len(chunk))
            correct[name] += int((logits.argmax(-1) == labels).sum())
            if name == "trimmed":
                s = stats(model)
                kept.append(s["kept_fraction"])
                ratio.append(s["flop_ratio"])
                untrim(model)
    n = len(items)
    full_ips = 1.0 / statistics.median(seconds["full"])
    trimmed_ips = 1.0 / statistics.median(seconds["trimmed"])
    return {
        "model": str(model_dir),
        "images": n,
        "config": config,
        "full_top1": correct["full"] / n,
        "trimmed_top1": correct["trimmed"] / n,
        "full_images_per_s": full_ips,
        "trimmed_images_per_s": trimmed_ips,
        "speedup": trimmed_ips / full_ips,
        "kept_fraction": statistics.fmean(kept),
        "flop_ratio": statistics.fmean(ratio),
    }


def format_result(row: dict) -> str:
    return (
        "| images | full top-1 | trimmed top-1 | full img/s | trimmed img/s | speedup | flop ratio | kept |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {row['images']} | {100 * row['full_top1']:.2f} | {100 * row['trimmed_top1']:.2f} | "
        f"{row['full_images_per_s']:.2f} | {row['trimmed_images_per_s']:.2f} | {row['speedup']:.2f}x | "
        f"{row['flop_ratio']:.2f}x | {row['kept_fraction']:.3f} |"
    )


def write_json(row: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"results": [row]}, indent=2) + "\n")
