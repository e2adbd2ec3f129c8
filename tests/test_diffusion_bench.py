"""Diffusion benchmarks on tiny denoisers: the FLOP counter (SDPA's CPU kernel included), the CPU memory
tracker, the denoisers and their step inputs, the benchmark's rows and the `bench diffusion` command."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusion]'")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from trimformer.cli import main  # noqa: E402
from trimformer.errors import ConfigError, InputError, ModelLoadError  # noqa: E402
from trimformer_lab.diffusion import (MODELS, TensorMemory, bench_diffusion, flop_counter, format_table,  # noqa: E402
                                      load_denoiser, measure, noise_prediction, parse_parts, step_inputs)

KEYS = {"model", "resolution", "reduction_ratio", "full_s", "trimmed_s", "speedup", "flop_ratio", "full_peak_bytes",
        "trimmed_peak_bytes", "settings", "rel_error"}


def sdpa_flops(b: int, h: int, s_q: int, s_k: int, d: int) -> int:
    return 2 * (2 * b * h * s_q * s_k * d)          # Q K^T and P V, 2 FLOPs per multiply-add


# ---- measuring ------------------------------------------------------------------------------------
def test_flop_counter_counts_sdpa_on_cpu():
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == sdpa_flops(2, 4, 16, 16, 8)


def test_flop_counter_adds_every_attention_of_a_denoiser():
    model = load_denoiser("tiny-pixart-random")     # 2 blocks: self-attention on 4x4 patches, cross to 120 tokens
    inputs = step_inputs(model, 64)
    with torch.inference_mode(), FlopCounterMode(display=False) as plain:
        noise_prediction(model, inputs)
    with torch.inference_mode(), flop_counter() as counter:
        noise_prediction(model, inputs)
    per_block = sdpa_flops(2, 2, 16, 16, 12) + sdpa_flops(2, 2, 16, 120, 12)
    assert counter.get_total_flops() - plain.get_total_flops() == 2 * per_block


def test_tensor_memory_follows_allocations_and_frees():
    weight = torch.ones(100)                         # allocated before: neither it nor its views count
    with TensorMemory() as memory:
        a = torch.empty(1000)                        # 4000 bytes
        b = torch.empty(2000)                        # 8000
        assert memory.live == 12000
        del a
        c = torch.empty(500)                         # 2000
        view = b.view(40, 50)
        b.add_(1)
        weight[:10].sum()                            # the sum's 4-byte result is freed at once
        assert memory.live == 10000
        d = weight + 1                               # 400
        del b
        assert memory.live == 10400                  # b's storage lives on in its view
        del view
        assert memory.live == 2400
    assert memory.peak == 12000
    assert c.numel() + d.numel() == 600


def test_measure_returns_output_flops_and_peak():
    x, w = torch.randn(8, 16), torch.randn(16, 32)
    out, cost = measure(lambda: (x @ w).relu())
    assert out.shape == (8, 32)
    assert cost.flops == 2 * 8 * 16 * 32
    assert cost.peak_bytes == 2 * 8 * 32 * 4           # the product and its relu, both live at the end


# ---- denoisers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [("tiny-unet-random", (2, 77, 32)), ("tiny-pixart-random", (2, 120, 32))])
def test_step_inputs_and_noise_prediction(name, text):
    model = load_denoiser(name)
    inputs = step_inputs(model, 128)
    latents = inputs.get("sample", inputs.get("hidden_states"))
    assert latents.shape == (2, 4, 16, 16)
    assert inputs["encoder_hidden_states"].shape == text
    assert torch.equal(latents, step_inputs(model, 128)["sample" if "sample" in inputs else "hidden_states"])
    with torch.inference_mode():
        eps = noise_prediction(model, inputs)
    assert eps.shape == (2, 4, 16, 16) and eps.norm() > 0


def test_pixart_inputs_carry_resolution_and_aspect_ratio():
    inputs = step_inputs(load_denoiser("tiny-pixart-random"), 64, batch=3)
    assert inputs["added_cond_kwargs"]["resolution"].tolist() == [[64.0, 64.0]] * 3
    assert inputs["added_cond_kwargs"]["aspect_ratio"].shape == (3, 1)


def test_bad_resolution_and_unknown_model():
    with pytest.raises(InputError, match="multiple of 16"):
        step_inputs(load_denoiser("tiny-pixart-random"), 72)
    with pytest.raises(ModelLoadError, match="sd15-unet-random"):
        load_denoiser("no-such-denoiser")


def test_published_configs_build():
    counts = {}
    for name in ("sd15-unet-random", "pixart-alpha-1024-random"):
        cls, config = MODELS[name]
        with torch.device("meta"):                   # shapes only: no memory, no initialisation
            counts[name] = sum(p.numel() for p in cls(**config).parameters())
    assert counts == {"sd15-unet-random": 859_520_964, "pixart-alpha-1024-random": 611_349_152}


def test_pipeline_folder_loads_its_unet(tmp_path):
    model = load_denoiser("tiny-unet-random")
    model.save_pretrained(tmp_path / "unet")
    loaded = load_denoiser(str(tmp_path))
    inputs = step_inputs(model, 64)
    with torch.inference_mode():
        assert torch.equal(noise_prediction(loaded, inputs), noise_prediction(model, inputs))


# ---- the benchmark -------------------------------------------------------------------------------------
def test_rows_keys_and_the_unmerged_variant():
    rows = bench_diffusion("tiny-unet-random", [64], [0.0, 0.5], parts=parse_parts("self_attention;self_attention,mlp"),
                           max_downsample=[1, 2], repeats=1, warmup=1, progress=False)
    assert len(rows) == 8
    for row in rows:
        data = vars(row)
        assert set(data) == KEYS
        assert set(data["settings"]) == {"merge_parts", "max_downsample"}
        assert row.full_s > 0 and row.trimmed_s > 0 and row.full_peak_bytes > 0
        if row.reduction_ratio == 0:
            assert row.rel_error == 0 and row.flop_ratio == 1 and row.trimmed_peak_bytes == row.full_peak_bytes
        else:
            assert row.rel_error > 0 and row.flop_ratio > 1
    assert "| tiny-unet-random | 64 | 0.5 | self_attention+mlp | 2 |" in format_table(rows)


def test_parse_parts_refuses_unknown_parts():
    assert parse_parts("self_attention; cross_attention,mlp") == [("self_attention",), ("cross_attention", "mlp")]
    with pytest.raises(ConfigError, match="self_attention"):
        parse_parts("attention")


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "diffusion", "--model", "tiny-pixart-random", "--resolution", "64",
                 "--reduction-ratio", "0,0.5", "--parts", "self_attention;self_attention,cross_attention,mlp",
                 "--repeats", "1", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 4 and all(set(row) == KEYS for row in rows)
    assert rows[3]["settings"] == {"merge_parts": ["self_attention", "cross_attention", "mlp"], "max_downsample": 1}
    assert "| tiny-pixart-random | 64 |" in capsys.readouterr().out


def test_cli_unknown_model_fails_cleanly(capsys):
    assert main(["bench", "diffusion", "--model", "no-such-denoiser", "--no-progress"]) == 2
    assert "sd15-unet-random" in capsys.readouterr().err
