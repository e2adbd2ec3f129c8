"""Peers side by side: ToMe for Stable Diffusion's own package (tomesd) beside trimformer's `tome` on the same
U-Net, inputs and ratio: one denoising step each, alternating after a warm-up, medians, and each one's
noise-prediction error against the unmerged step.

tomesd is pure Python; it is installed without dependencies into a folder of its own (never into the
project's environment):

    .venv/bin/python -m pip install --no-deps --target benchmarks/.tomesd tomesd==0.1.3
    .venv/bin/python benchmarks/tomesd_compare.py --resolution 512,1024 --json benchmarks/results/diffusion/tomesd_side_by_side.json

Both at their defaults for ratio 0.5: self-attention merged in the highest-resolution blocks, 2 x 2 cells,
random destinations. The U-Net is called positionally, as tomesd's hook reads the latent from the first
positional argument.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from trimformer import trim, untrim
from trimformer_lab.diffusion.models import load_denoiser, step_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-unet-random")
    parser.add_argument("--resolution", default="512,1024")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tomesd-path", default=str(Path(__file__).parent / ".tomesd"))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.tomesd_path)
    import tomesd

    torch.set_num_threads(args.threads)
    unet = load_denoiser(args.model)

    def step(inputs):
        start = time.perf_counter()
        with torch.inference_mode():
            out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]
        return time.perf_counter() - start, out

    def merged(apply, remove, inputs):
        apply()
        try:
            return step(inputs)
        finally:
            remove()

    variants = {
        "tomesd": (lambda: tomesd.apply_patch(unet, ratio=args.ratio), lambda: tomesd.remove_patch(unet)),
        "trimformer": (lambda: trim(unet, method="tome", reduction_ratio=args.ratio), lambda: untrim(unet)),
    }
    rows = []
    for resolution in [int(r) for r in args.resolution.split(",")]:
        inputs = step_inputs(unet, resolution, batch=2)
        _, reference = step(inputs)
        errors = {name: float((merged(*fns, inputs)[1] - reference).norm() / reference.norm())
                  for name, fns in variants.items()}
        times = {"full": [], **{name: [] for name in variants}}
        for _ in range(args.repeats):
            times["full"].append(step(inputs)[0])
            for name, fns in variants.items():
                times[name].append(merged(*fns, inputs)[0])
        median = {name: statistics.median(values) for name, values in times.items()}
        row = {"model": args.model, "resolution": resolution, "ratio": args.ratio, "median_s": median,
               **{f"speedup_{n}": median["full"] / median[n] for n in variants},
               **{f"rel_error_{n}": errors[n] for n in variants}}
        print(json.dumps(row))
        rows.append(row)
    Path(args.json).write_text(json.dumps({"tomesd": tomesd.__version__ if hasattr(tomesd, "__version__") else
                                           "0.1.3", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
