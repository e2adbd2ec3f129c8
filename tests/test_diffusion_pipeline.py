"""A whole Stable Diffusion pipeline (tiny random parts) with and without merging: text encoding,
classifier-free guidance, the scheduler's loop and VAE decoding; saved and loaded back with
`DiffusionPipeline.from_pretrained` as a user's pretrained pipeline would be."""

import numpy as np
import pytest
import torch

from trimformer import is_trimmed, stats, trim, untrim

pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusion]'")

from trimformer_lab.diffusion.pipeline import latent_drift, sample_latents, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_ratio_zero_and_untrim_give_the_unmerged_latents(pipe):
    full = sample_latents(pipe, steps=4)
    trim(pipe, method="tome", reduction_ratio=0.0)
    assert torch.equal(sample_latents(pipe, steps=4), full)
    trim(pipe, method="tome", reduction_ratio=0.5)
    merged = sample_latents(pipe, steps=4)
    s = stats(pipe)
    assert s["architecture"] == "UNet2DConditionModel" and s["merging_blocks"] == 3
    assert s["blocks"][0]["tokens"] == 256 and s["blocks"][0]["merged"] == 128
    untrim(pipe)
    assert not is_trimmed(pipe)
    assert torch.equal(sample_latents(pipe, steps=4), full)
    assert not torch.equal(merged, full)
    assert 0 < float((merged - full).norm() / full.norm()) < 0.5


def test_images_decode_with_merging(pipe):
    trim(pipe, method="tome", reduction_ratio=0.5, merge_parts=["self_attention", "mlp"])
    try:
        image = pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    finally:
        untrim(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_from_pretrained_round_trip(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    trim(pipe, method="tome", reduction_ratio=0.5)
    trim(loaded, method="tome", reduction_ratio=0.5)
    try:
        assert torch.equal(sample_latents(loaded, steps=3), sample_latents(pipe, steps=3))
    finally:
        untrim(pipe)
        untrim(loaded)


def test_latent_drift_grows_with_the_ratio(pipe):
    rows = latent_drift(pipe, [0.0, 0.3, 0.7], steps=3, seeds=2)
    assert [r["reduction_ratio"] for r in rows] == [0.0, 0.3, 0.7]
    assert rows[0]["mean_drift"] == 0.0 and rows[0]["block_flop_ratio"] == 1.0
    assert 0 < rows[1]["mean_drift"] < rows[2]["mean_drift"]
    assert 1.0 < rows[1]["block_flop_ratio"] < rows[2]["block_flop_ratio"]
    assert not is_trimmed(pipe)


def test_quality_comparison_of_images(pipe, tmp_path):
    from trimformer_lab.diffusion.quality import compare, psnr

    assert psnr(np.zeros((2, 2, 3)), np.zeros((2, 2, 3))) == float("inf")
    assert psnr(np.zeros((1, 1, 3)), np.full((1, 1, 3), 0.1)) == pytest.approx(20.0)
    same = compare(pipe, 0.0, ["a cube", "a ball"], steps=2, size=32, progress=False)
    assert same["mean_psnr_db"] == float("inf") and same["images"] == 2
    merged = compare(pipe, 0.6, ["a cube", "a ball"], steps=2, size=32, progress=False,
                     merge_parts=("self_attention", "mlp"))
    assert 0 < merged["mean_psnr_db"] < float("inf") and merged["trim_options"]["merge_parts"] == ["self_attention", "mlp"]
    assert not is_trimmed(pipe)
