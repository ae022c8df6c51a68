"""The ``wdm3d`` command: what is not a bundle run.

    wdm3d info                 versions, device, U-Net presets and their parameter counts
    wdm3d demo [--output DIR]  the embedded demo: build a brain dataset from the MNI152 template, train the
                               wdm3d_brats bundle on it (CPU, ~10 min), write NIfTI + PNG samples
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
        output_dir=args.output, num_cases=args.num_cases, max_epochs=args.epochs, num_samples=args.num_samples,
        sampler=args.sampler, num_steps=args.num_steps, seed=args.seed, quick=args.quick,
        **({"device": f"$torch.device('{args.device}')"} if args.device else {}),
    )
    print(f"Demo done: data {summary['data_seconds']} s, training {summary['train_seconds']} s, "
          f"sampling {summary['sample_seconds']} s.")
    print(f"Synthetic volumes (open in 3D Slicer): {Path(args.output).resolve() / 'samples'}/sample_*.nii.gz")
    print(f"Previews: {Path(args.output).resolve() / 'samples'}/sample_*.png; training progress: "
          f"{Path(args.output).resolve() / 'validation'}/epoch_*.png; summary: {Path(args.output).resolve() / 'summary.json'}")
    if summary.get("mlflow_uri"):
        print(f"MLflow dashboard: mlflow ui --backend-store-uri {summary['mlflow_uri']}  (then open http://127.0.0.1:5000)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wdm3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and presets").set_defaults(func=_info)
    demo = sub.add_parser(
        "demo", help="build the demo brain dataset, train the wdm3d_brats bundle on it, write NIfTI + PNG samples"
    )
    demo.add_argument("--output", default="wdm3d_demo", help="output folder (default: wdm3d_demo)")
    demo.add_argument("--num-cases", type=int, default=16, help="demo cases to generate (default 16)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: demo.json's)")
    demo.add_argument("--num-samples", type=int, default=None, help="volumes to generate (default: demo.json's)")
    demo.add_argument("--sampler", default=None, choices=["ddpm", "ddim"], help="sampler (default: demo.json's)")
    demo.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: demo.json's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    demo.add_argument("--quick", action="store_true", help="shrink everything to seconds (16^3, tiny U-Net)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
