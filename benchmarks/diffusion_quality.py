"""Image quality of ToMe merging on a pretrained diffusers pipeline: the same prompts and seeds unmerged and
merged; seconds per image, PSNR of each merged image against its unmerged twin, and with torchmetrics the
CLIP score of each set and the FID of the merged images against the unmerged ones.

    pip install "torchmetrics[image,multimodal]"      # CLIP score and FID (they fetch their weights)
    .venv/bin/python benchmarks/diffusion_quality.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --device cuda --dtype float16 --reduction-ratio 0.5 --steps 50 --clip-model openai/clip-vit-base-patch16 \
        --fid --json sd15_quality.json
"""

import argparse
import json

import torch

from trimformer_lab.diffusion.quality import PROMPTS, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a pipeline folder or hub id (DiffusionPipeline)")
    parser.add_argument("--prompts", help="a file with one prompt per line (default: 16 ImageNet classes)")
    parser.add_argument("--reduction-ratio", type=float, default=0.5)
    parser.add_argument("--parts", default="self_attention", help="comma-separated merge_parts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--clip-model", help="a CLIP model id or folder for the CLIP score")
    parser.add_argument("--fid", action="store_true", help="FID of the merged images against the unmerged")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    prompts = open(args.prompts).read().split("\n") if args.prompts else PROMPTS
    result = compare(pipe, args.reduction_ratio, [p for p in prompts if p.strip()], args.steps, args.size,
                     clip_model=args.clip_model, fid=args.fid, merge_parts=tuple(args.parts.split(",")))
    result["pipeline"] = args.pipeline
    print(json.dumps({k: v for k, v in result.items() if k != "psnr_db"}, indent=1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
