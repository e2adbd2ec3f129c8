"""Which latent tokens ToMe merges into which: the merge map of every merging block of a U-Net, for a latent
with flat regions (a disc and a bar on a background), drawn beside that latent.

    .venv/bin/python benchmarks/diffusion_merge_map.py --model sd15-unet-random --out docs/images/diffusion_merges.png

A source token may merge into any destination of the grid, so a group's tokens can lie far apart; tokens in
grey found no match close enough to be among the merged half. With random weights this shows the mechanics;
a pretrained U-Net (``--model path/to/pipeline``) and a real latent show what it finds similar.
"""

import argparse

import torch

from trimformer import stats, trim
from trimformer_lab.diffusion.models import load_denoiser, noise_prediction, step_inputs
from trimformer_lab.visualize import latent_merges_png


def shapes_latent(side: int) -> torch.Tensor:
    """(1, 4, side, side): a background, a disc and a bar, each a constant 4-channel value, plus faint noise."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    latent = torch.tensor([0.2, -0.4, 0.1, 0.3])[:, None, None].expand(4, side, side).clone()
    disc = (y - side * 0.4) ** 2 + (x - side * 0.35) ** 2 < (side * 0.22) ** 2
    bar = (y > side * 0.7) & (y < side * 0.85) & (x > side * 0.15) & (x < side * 0.9)
    latent[:, disc] = torch.tensor([1.2, 0.8, -0.9, 0.5])[:, None]
    latent[:, bar] = torch.tensor([-1.0, 1.1, 0.9, -0.7])[:, None]
    return (latent + 0.02 * torch.randn(4, side, side, generator=torch.Generator().manual_seed(0)))[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-unet-random")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--reduction-ratio", type=float, default=0.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    unet = load_denoiser(args.model)
    inputs = step_inputs(unet, args.resolution, batch=1)
    inputs["sample"] = shapes_latent(args.resolution // 8)
    trim(unet, method="tome", reduction_ratio=args.reduction_ratio, trace_source=True)
    with torch.inference_mode():
        noise_prediction(unet, inputs)
    s = stats(unet)
    names = [b["block"] for b in s["blocks"] if b["merged"]]
    latent_merges_png(unet, args.out, latents=inputs["sample"], blocks=[names[0], names[-1]], cell=6)
    print(f"{args.out}: blocks {names[0]} and {names[-1]} of {len(names)} merging; "
          f"{s['blocks'][0]['merged']} of {s['blocks'][0]['tokens']} tokens merged per block")


if __name__ == "__main__":
    main()
