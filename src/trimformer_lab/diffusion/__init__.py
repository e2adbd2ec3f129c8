"""Diffusion benchmarks: one denoising step of a Stable Diffusion UNet or a PixArt transformer, full against
ToMe-merged (`trim(denoiser, method="tome", ...)`), with time, counted FLOPs, peak memory and the noise
prediction's relative error. Needs `diffusers`.

    from trimformer_lab.diffusion import bench_diffusion, format_table
    rows = bench_diffusion("sd15-unet-random", [512], [0.5], parts=[("self_attention",)], max_downsample=[1])
    print(format_table(rows))
"""

from .bench import DiffusionRow, bench_diffusion, format_table, parse_parts
from .measure import Cost, TensorMemory, flop_counter, measure
from .models import MODELS, load_denoiser, noise_prediction, step_inputs

__all__ = ["MODELS", "Cost", "DiffusionRow", "TensorMemory", "bench_diffusion", "flop_counter", "format_table",
           "load_denoiser", "measure", "noise_prediction", "parse_parts", "step_inputs"]
