"""`trimformer bench diffusion`: one denoising step of a diffusion denoiser, full against ToMe-merged
(`diffusion/bench.py`). diffusers is imported only when the command runs, so the rest of the CLI works
without it."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from trimformer.cli_options import int_list
from trimformer.errors import TrimformerError

from . import bench


def add_bench_diffusion_parser(bench_sub) -> argparse.ArgumentParser:
    """Add the subcommand's parser to `bench_sub` and return it (the caller sets its function)."""
    b = bench_sub.add_parser("diffusion", help="one denoising step of a diffusion denoiser, full vs ToMe-merged: "
                                               "time, FLOPs, peak memory, noise prediction error")
    b.add_argument("--model", default="sd15-unet-random",
                   help="sd15-unet-random, pixart-alpha-1024-random (published configs, random weights), "
                        "tiny-unet-random, tiny-pixart-random, or a local denoiser or pipeline folder "
                        "(default: %(default)s)")
    b.add_argument("--resolution", default="512", help="image side in pixels; comma-separated for several")
    b.add_argument("--reduction-ratio", default="0.5", help="share of tokens merged; comma-separated for several")
    b.add_argument("--parts", default="self_attention",
                   help="what runs on merged tokens: comma-separated of self_attention, cross_attention, mlp; "
                        "';' separates settings compared in one run (default: %(default)s)")
    b.add_argument("--max-downsample", default="1",
                   help="merge in blocks whose grid is at most this much coarser than the finest (1, 2, 4, 8); "
                        "comma-separated for several")
    b.add_argument("--batch", type=int, default=2, help="latents per step (2: one image with classifier-free "
                                                        "guidance; default: %(default)s)")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    b.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds first; the first measures FLOPs, peak memory and outputs (at least 1)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    return b


def cmd_bench_diffusion(args: argparse.Namespace) -> int:
    """Run the benchmark, print its table and write its JSON."""
    if importlib.util.find_spec("diffusers") is None:
        raise TrimformerError('`trimformer bench diffusion` needs diffusers: pip install -e ".[diffusion]"')
    from .diffusion import bench as diffusion_bench

    try:
        ratios = [float(x) for x in args.reduction_ratio.split(",") if x.strip()]
    except ValueError as exc:
        raise TrimformerError(f"--reduction-ratio takes comma-separated numbers, got {args.reduction_ratio!r}") from exc
    rows = diffusion_bench.bench_diffusion(
        args.model, int_list(args.resolution, "--resolution"), ratios, parts=diffusion_bench.parse_parts(args.parts),
        max_downsample=int_list(args.max_downsample, "--max-downsample"), batch=args.batch, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, device=args.device, dtype=getattr(torch, args.dtype),
        progress=not args.no_progress)
    print(diffusion_bench.format_table(rows))
    if args.json:
        bench.write_json(rows, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
