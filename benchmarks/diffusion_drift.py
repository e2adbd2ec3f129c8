"""Drift of the final latents of a whole sampling run under token merging, on the tiny random Stable
Diffusion pipeline (`trimformer_lab.diffusion.pipeline`): for each reduction ratio and set of merged parts,
the relative L2 distance of the final latents from the unmerged run's, over several seeds.

    .venv/bin/python benchmarks/diffusion_drift.py --json benchmarks/results/diffusion/tiny_pipeline_drift.json
"""

import argparse
import json

import torch

from trimformer_lab.diffusion.pipeline import latent_drift, tiny_pipeline

PARTS = [("self_attention",), ("self_attention", "cross_attention", "mlp")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (DDIM)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = [row for parts in PARTS for row in latent_drift(pipe, ratios, args.steps, args.seeds, merge_parts=parts)]
    print("| merge parts | reduction | mean drift | block FLOP ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {'+'.join(row['merge_parts'])} | {row['reduction_ratio']:g} | {row['mean_drift']:.4f} | "
              f"{row['block_flop_ratio']:.2f}x |")
    with open(args.json, "w") as f:
        json.dump({"pipeline": "tiny random StableDiffusionPipeline (32 px)", "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
