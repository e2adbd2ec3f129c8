"""Token merging in diffusers denoisers (ToMe for Stable Diffusion): the grid merge's pure functions, and the
adapter on tiny U-Net, PixArt and DiT configs: exact at reduction_ratio 0, exact untrim, known merge counts
and FLOPs, clear errors."""

from types import SimpleNamespace

import pytest
import torch

from trimformer import stats, trim, untrim
from trimformer.api import is_trimmed
from trimformer.errors import ConfigError, TrimformerError, UnsupportedMethodError
from trimformer.ops.grid_merge import grid_partition, grid_shape, match, merge_mean, unmerge

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusion]'")


# ---- pure functions ----------------------------------------------------------------------------
def test_grid_partition_first_of_each_cell():
    dst, src = grid_partition(4, 4, 2, 2, generator=None)
    assert dst.tolist() == [0, 2, 8, 10]
    assert sorted(dst.tolist() + src.tolist()) == list(range(16))


def test_grid_partition_leftover_rows_and_columns_are_sources():
    dst, src = grid_partition(5, 3, 2, 2, generator=None)        # 2 x 1 whole cells
    assert dst.tolist() == [0, 6]
    assert len(src) == 13 and 14 in src.tolist() and 2 in src.tolist()


def test_grid_partition_random_destination_stays_in_its_cell():
    dst, _ = grid_partition(6, 6, 2, 2, generator=torch.Generator().manual_seed(3))
    cells = {(int(p) // 6 // 2, int(p) % 6 // 2) for p in dst}
    assert cells == {(y, x) for y in range(3) for x in range(3)}
    again, _ = grid_partition(6, 6, 2, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(dst, again)


def test_grid_shape_levels():
    assert grid_shape(4096, 64, 64) == (1, 64, 64)
    assert grid_shape(1024, 64, 64) == (2, 32, 32)
    assert grid_shape(64, 64, 64) == (8, 8, 8)
    assert grid_shape(16 * 8, 63, 31) == (4, 16, 8)              # sides round up at each level
    assert grid_shape(77, 64, 64) is None


def test_merge_nothing_is_a_permutation_undone_by_unmerge():
    x = torch.randn(2, 16, 5)
    dst, src = grid_partition(4, 4)
    m = match(x, dst, src, 0)
    merged = merge_mean(m, x)
    assert merged.shape == (2, 16, 5) and m.width == 16
    assert torch.equal(unmerge(m, merged), x)


def test_merge_averages_each_source_into_its_most_similar_destination():
    # a 2 x 2 grid: destination 0, sources 1, 2, 3; source 1 is a copy of the destination's direction
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])
    dst, src = grid_partition(2, 2)
    m = match(x, dst, src, 1)
    assert m.src_pos.tolist() == [[1]] and m.unm_pos.tolist() == [[2, 3]]
    merged = merge_mean(m, x)
    assert torch.equal(merged, torch.tensor([[[0.0, 1.0], [-1.0, 1.0], [2.0, 0.0]]]))
    out = unmerge(m, merged)
    assert torch.equal(out, torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]]))


def test_merge_caps_r_at_the_sources():
    x = torch.randn(1, 16, 4)
    dst, src = grid_partition(4, 4)
    m = match(x, dst, src, 100)
    assert m.merged == 12 and m.width == 4


# ---- tiny denoisers ----------------------------------------------------------------------------
def tiny_unet():
    from trimformer_lab.diffusion.pipeline import TINY_SD_UNET

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_SD_UNET).eval()


def tiny_pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, patch_size=2, sample_size=16, caption_channels=12, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False).eval()


def tiny_dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, patch_size=2, sample_size=16, num_embeds_ada_norm=10).eval()


def run(model, x, t):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, diffusers.UNet2DConditionModel):
            return model(x, t, torch.randn(x.shape[0], 7, 32, generator=gen)).sample
        if isinstance(model, diffusers.PixArtTransformer2DModel):
            return model(x, encoder_hidden_states=torch.randn(x.shape[0], 5, 12, generator=gen), timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return model(x, timestep=t, class_labels=torch.tensor([1] * x.shape[0])).sample


DENOISERS = {"unet": tiny_unet, "pixart": tiny_pixart, "dit": tiny_dit}


@pytest.fixture(params=list(DENOISERS))
def denoiser(request):
    return DENOISERS[request.param]()


def inputs(batch=2, side=16):
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(0)), torch.tensor([500] * batch)


def test_ratio_zero_equals_the_unpatched_model(denoiser):
    x, t = inputs()
    ref = run(denoiser, x, t)
    trim(denoiser, method="tome", reduction_ratio=0.0, merge_parts=["self_attention", "cross_attention", "mlp"])
    assert torch.equal(run(denoiser, x, t), ref)
    assert stats(denoiser)["flop_ratio"] == 1.0 and stats(denoiser)["kept_fraction"] == 1.0


def test_untrim_is_exact_after_merging(denoiser):
    x, t = inputs()
    ref = run(denoiser, x, t)
    state = {k: v.clone() for k, v in denoiser.state_dict().items()}
    trim(denoiser, method="tome", reduction_ratio=0.5, merge_parts=["self_attention", "mlp"])
    merged = run(denoiser, x, t)
    assert not torch.allclose(merged, ref)
    assert (merged - ref).norm() / ref.norm() < 0.5
    untrim(denoiser)
    assert not is_trimmed(denoiser)
    assert torch.equal(run(denoiser, x, t), ref)
    assert all(torch.equal(v, state[k]) for k, v in denoiser.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in denoiser.modules())


def test_merging_is_deterministic_per_seed_and_timestep():
    unet = tiny_unet()
    x, t = inputs()
    trim(unet, method="tome", reduction_ratio=0.5, seed=7)
    first, again = run(unet, x, t), run(unet, x, t)
    assert torch.equal(first, again)
    trim(unet, method="tome", reduction_ratio=0.5, seed=8)
    assert not torch.equal(run(unet, x, t), first)


def test_unet_stats_merge_the_highest_resolution_only_by_default():
    unet = tiny_unet()
    x, t = inputs()
    trim(unet, method="tome", reduction_ratio=0.5)
    run(unet, x, t)
    s = stats(unet)
    by_name = {b["block"]: b for b in s["blocks"]}
    assert s["grid"] == [16, 16] and len(by_name) == 4
    for name, block in by_name.items():
        if name.startswith("mid_block"):
            assert (block["tokens"], block["downsample"], block["merged"]) == (64, 2, 0)
        else:
            assert (block["tokens"], block["downsample"], block["merged"]) == (256, 1, 128)
            assert block["parts"] == ["self_attention"]
    assert s["kept_fraction"] == pytest.approx((3 * 128 + 64) / (3 * 256 + 64))
    trim(unet, method="tome", reduction_ratio=0.5, max_downsample=2)
    run(unet, x, t)
    assert [b["merged"] for b in stats(unet)["blocks"]] == [128, 32, 128, 128]


def test_flops_of_a_block_by_hand():
    pixart = tiny_pixart()                      # 2 blocks; inner 16, context 5 tokens of 16, ff 16 -> 64 -> 16
    x, t = inputs(batch=1)
    trim(pixart, method="tome", reduction_ratio=0.5, merge_parts=["self_attention"])
    run(pixart, x, t)
    n, k, d, m = 64, 32, 16, 5
    attn1 = lambda q: 2 * q * (d + d) * d + 2 * q * (d + d) * d + 4 * q * q * d
    attn2 = 2 * n * (d + d) * d + 2 * m * (d + d) * d + 4 * n * m * d
    ff = 2 * (d * 4 * d + 4 * d * d) * n
    s = stats(pixart)
    assert s["flops_full"] == pytest.approx(2 * (attn1(n) + attn2 + ff))
    matching = 2 * 48 * 16 * d                  # 48 sources, 16 destinations (one per 2 x 2 cell of 8 x 8)
    assert s["flops_trimmed"] == pytest.approx(2 * (attn1(k) + attn2 + ff + matching))


def test_match_with_a_threshold_merges_only_pairs_alike_enough():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]],
                      [[1.0, 0.0], [1.0, 0.0], [1.0, 0.05], [0.0, 1.0]]])
    dst, src = grid_partition(2, 2)
    assert match(x, dst, src, 3, threshold=0.99).merged == 1        # row 0 has one source this alike
    assert match(x, dst, src, 3, threshold=-1.0).merged == 3
    assert match(x, dst, src, 1, threshold=0.5).merged == 1         # capped by r


def test_adaptive_merges_fewer_tokens_where_fewer_are_alike():
    unet = tiny_unet()
    flat = torch.zeros(1, 4, 16, 16)
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    ref = run(unet, noisy, t)
    trim(unet, {"method": "tome", "reduction_ratio": 0.5, "adaptive": True, "merge_threshold": 1.0})
    assert torch.equal(run(unet, noisy, t), ref)                    # nothing is that alike: nothing merges
    assert stats(unet)["merging_blocks"] == 0 and stats(unet)["adaptive"]
    trim(unet, {"method": "tome", "reduction_ratio": 0.5, "adaptive": True, "merge_threshold": 0.9})
    run(unet, flat, t)
    merged_flat = stats(unet)["blocks"][0]["merged"]
    run(unet, noisy, t)
    merged_noisy = stats(unet)["blocks"][0]["merged"]
    assert merged_flat == 128 and merged_noisy < merged_flat     # the flat latent merges up to the cap


def test_a_pipeline_is_trimmed_through_its_denoiser():
    pipe = SimpleNamespace(unet=tiny_unet(), vae=None)
    assert trim(pipe, method="tome", reduction_ratio=0.3) is pipe
    assert is_trimmed(pipe) and is_trimmed(pipe.unet)
    run(pipe.unet, *inputs())
    assert stats(pipe)["reduction_ratio"] == pytest.approx(0.3)
    untrim(pipe)
    assert not is_trimmed(pipe.unet)


@pytest.mark.parametrize("options, message", [
    ({"method": "lazy"}, "diffusion model, whose methods are: tome"),
    ({"method": "tome", "r": 8}, "give reduction_ratio"),
    ({"method": "tome", "adaptive": True, "adaptive_mode": "mass"}, "merges by similarity"),
    ({"method": "tome", "merge_parts": ["attention"]}, "merge_parts must be"),
    ({"method": "tome", "max_downsample": 3}, "max_downsample must be one of"),
    ({"method": "tome", "stride": 0}, "stride must be"),
])
def test_bad_options_are_refused_and_the_model_is_untouched(options, message):
    unet = tiny_unet()
    with pytest.raises((ConfigError, UnsupportedMethodError), match=message):
        trim(unet, **options)
    assert not is_trimmed(unet)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_a_forward_without_a_latent_grid_is_refused():
    unet = tiny_unet()
    trim(unet, method="tome")
    with pytest.raises(TrimformerError, match="latent"):
        unet(torch.randn(2, 16, 4), torch.tensor([1, 1]), torch.randn(2, 7, 32))


def test_merges_stay_inside_flat_regions_and_are_drawn(tmp_path):
    from PIL import Image

    from trimformer_lab.visualize import latent_merges, latent_merges_png

    unet = tiny_unet()
    x = torch.zeros(1, 4, 16, 16)
    x[:, :, 8:] = torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None, None]        # two flat halves, top and bottom
    trim(unet, method="tome", reduction_ratio=0.5, trace_source=True, random_destinations=False)
    run(unet, x, torch.tensor([500]))
    first = latent_merges(unet)[0]
    assert first.slot.shape == (1, 256) and first.grid == (16, 16)
    slot = first.slot[0]
    interior = [y * 16 + c for y in (*range(2, 6), *range(10, 14)) for c in range(2, 14)]
    for pos in interior:                        # a token well inside a half is merged with its own half only
        members = (slot == slot[pos]).nonzero().flatten().tolist()
        assert len({m // 16 < 8 for m in members}) == 1
    path = latent_merges_png(unet, tmp_path / "merges.png", latents=x, cell=4)
    assert Image.open(path).size == (4 * (16 * 4) + 3 * 4, 16 * 4)     # the latent and 3 merging blocks
    trim(unet, method="tome", reduction_ratio=0.5)
    run(unet, x, torch.tensor([500]))
    with pytest.raises(TrimformerError, match="trace_source"):
        latent_merges(unet)


# ---- real sizes: the SD 1.5 U-Net and PixArt-alpha XL-2-1024 configs (random weights) ---------------
@pytest.mark.parametrize("name, resolution", [("sd15-unet-random", 128), ("pixart-alpha-1024-random", 256)])
def test_published_configs_exact_at_ratio_zero_and_after_untrim(name, resolution):
    from trimformer_lab.diffusion.models import load_denoiser, noise_prediction, step_inputs

    torch.set_num_threads(2)
    model = load_denoiser(name)
    inputs = step_inputs(model, resolution, batch=2)
    with torch.inference_mode():
        ref = noise_prediction(model, inputs)
        trim(model, method="tome", reduction_ratio=0.0, merge_parts=["self_attention", "cross_attention", "mlp"],
             max_downsample=8)
        assert torch.equal(noise_prediction(model, inputs), ref)
        trim(model, method="tome", reduction_ratio=0.5)
        merged = noise_prediction(model, inputs)
        s = stats(model)
        untrim(model)
        assert torch.equal(noise_prediction(model, inputs), ref)
    assert not torch.equal(merged, ref)
    first = s["blocks"][0]
    assert first["merged"] == first["tokens"] // 2 == (resolution // 8 // (2 if "pixart" in name else 1)) ** 2 // 2
    assert s["merging_blocks"] == (5 if "unet" in name else 28)
