"""`trimformer eval imagenet` on a tiny random ViT and a few generated images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from trimformer.cli import main
from trimformer.errors import InputError
from trimformer_lab.evaluation.imagenet import label_index, list_images

torch.set_num_threads(1)
SYNSETS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=3, id2label={i: s for i, s in enumerate(SYNSETS)},
                       label2id={s: i for i, s in enumerate(SYNSETS)})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


def test_eval_imagenet_folder_layout_and_flat_names(model_dir, tmp_path, capsys):
    folder = tmp_path / "folder"
    for i, s in enumerate(SYNSETS):
        (folder / s).mkdir(parents=True)
        _image(folder / s / f"img{i}.JPEG", i)
        _image(folder / s / f"img{i}b.png", 10 + i)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, s in enumerate(SYNSETS):
        _image(flat / f"ILSVRC2012_val_0000000{i}_{s}.JPEG", i)
    assert [k for _, k in list_images(flat)] == SYNSETS
    out = tmp_path / "out.json"
    assert main(["eval", "imagenet", "--model", str(model_dir), "--images", str(folder), "--r", "2", "--batch", "4",
                 "--json", str(out), "--no-progress"]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["images"] == 6 and 0 <= row["full_top1"] <= 1 and 0 <= row["trimmed_top1"] <= 1
    assert row["flop_ratio"] > 1.0 and row["kept_fraction"] < 1.0
    assert "full top-1" in capsys.readouterr().out
    assert main(["eval", "imagenet", "--model", str(model_dir), "--images", str(flat), "--r", "0",
                 "--no-progress", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["full_top1"] == row["trimmed_top1"]           # nothing merged: same predictions


def test_labels_that_cannot_be_mapped_are_refused(model_dir, tmp_path):
    from transformers import ViTConfig

    with pytest.raises(InputError, match="synsets"):
        label_index(["n09999999"], ViTConfig(num_labels=3))
    flat = tmp_path / "bad"
    flat.mkdir()
    _image(flat / "cat.png", 0)
    with pytest.raises(InputError, match="synset"):
        list_images(flat)
    assert main(["eval", "imagenet", "--model", str(model_dir), "--images", str(tmp_path / "none")]) == 2
