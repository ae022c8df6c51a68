"""The ``wdm3d`` command: what is not a bundle run.

    wdm3d info                 versions, device, U-Net presets and their parameter counts
    wdm3d demo [--output DIR]  train a tiny WDM on generated phantoms (CPU, ~1 min) and write NIfTI samples
"""

from __future__ import annotations

import argparse
import json
import sys


def _info(_: argparse.Namespace) -> int:
    import monai
    import torch

    import wdm3d
    from wdm3d.networks import PRESETS, count_parameters, wdm_unet

    print(f"wdm3d {wdm3d.__version__}  monai {monai.__version__}  torch {torch.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    for name in PRESETS:
        with torch.device("meta"):
            n = count_parameters(wdm_unet(name))
        print(f"  preset {name}: {n / 1e6:.2f}M parameters")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from wdm3d.demo import run_demo

    summary = run_demo(
        output_dir=args.output,
        size=args.size,
        iterations=args.iterations,
        num_samples=args.num_samples,
        sampler=args.sampler,
        num_steps=args.num_steps,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps({k: summary[k] for k in ("iterations", "loss_first", "loss_last", "train_seconds", "sample_seconds")}))
    print(f"Wrote {len(summary['files'])} NIfTI volumes and summary.json to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wdm3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and presets").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="train a tiny WDM on generated phantoms and sample NIfTI volumes")
    demo.add_argument("--output", default="wdm3d_demo", help="output folder (default: wdm3d_demo)")
    demo.add_argument("--size", type=int, default=16, help="phantom edge length in voxels (even, default 16)")
    demo.add_argument("--iterations", type=int, default=300, help="training iterations (default 300)")
    demo.add_argument("--num-samples", type=int, default=2, help="volumes to generate (default 2)")
    demo.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"], help="sampler (default ddim)")
    demo.add_argument("--num-steps", type=int, default=50, help="sampling steps (default 50)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
