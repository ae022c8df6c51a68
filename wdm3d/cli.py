"""The ``wdm3d`` command: what is not a bundle run.

wdm3d info                 versions, device, U-Net presets and their parameter counts
wdm3d demo [--output DIR]  the embedded demo: build a brain dataset from the MNI152 template, train the
                           wdm3d_brats bundle on it (CPU, ~10 min), write NIfTI + PNG samples
wdm3d evaluate --real DIR_OR_DATALIST --fake DIR [--weights resnet_50_23dataset.pth] [--out DIR]
                           3D FID, MS-SSIM diversity, distribution checks, memorization audit; JSON + Markdown
                           report + PNG plots, logged to the MLflow run that generated the samples
wdm3d export-dicom INPUT.nii.gz [...] --out DIR --modality CT|MR [--intensity-range LOW HIGH] [--hu LOW HIGH]
                           NIfTI -> one DICOM series per file (DIR/<name>_dicom/), marked synthetic
wdm3d import-wdm CKPT --preset wdm_128|wdm_256 --out DIR [--name FILE.pt] [--spacing MM] [--overwrite]
                           WDM-3D's released U-Net weights (pfriedri/wdm-3d) -> a checkpoint the bundles'
                           inference samples from (docs/import_wdm.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wdm3d import __version__

# Each subcommand imports what it runs inside its handler: torch, MONAI and the imaging libraries take seconds to
# import, and `wdm3d --help` or a mistyped flag should answer at once.


def _info(_: argparse.Namespace) -> int:
    # heavy (torch, MONAI): imported only when this subcommand runs, so that `wdm3d --help` stays instant
    import monai
    import torch

    from wdm3d.networks import PRESETS, count_parameters, wdm_unet

    print(f"wdm3d {__version__}  monai {monai.__version__}  torch {torch.__version__}")
    print(
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
    )
    for name in PRESETS:
        with torch.device("meta"):
            n = count_parameters(wdm_unet(name))
        print(f"  preset {name}: {n / 1e6:.2f}M parameters")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from wdm3d.demo import DemoInterrupted, run_demo  # heavy (torch, MONAI bundles): only when the demo runs

    try:
        summary = run_demo(
            output_dir=args.output,
            num_cases=args.num_cases,
            max_epochs=args.epochs,
            num_samples=args.num_samples,
            sampler=args.sampler,
            num_steps=args.num_steps,
            seed=args.seed,
            quick=args.quick,
            **({"device": f"$torch.device('{args.device}')"} if args.device else {}),
        )
    except DemoInterrupted as err:
        print(f"wdm3d demo: {err}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a job ended by that signal
    print(
        f"Demo done: data {summary['data_seconds']} s, training {summary['train_seconds']} s, "
        f"sampling {summary['sample_seconds']} s."
    )
    print(f"Synthetic volumes (open in 3D Slicer): {Path(args.output).resolve() / 'samples'}/sample_*.nii.gz")
    print(
        f"Previews: {Path(args.output).resolve() / 'samples'}/sample_*.png; training progress: "
        f"{Path(args.output).resolve() / 'validation'}/epoch_*.png; summary: {Path(args.output).resolve() / 'summary.json'}"
    )
    if summary.get("mlflow_uri"):
        print(
            f"MLflow dashboard: mlflow ui --backend-store-uri {summary['mlflow_uri']}  (then open http://127.0.0.1:5000)"
        )
    return 0


def _pairs(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pairs takes a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--pairs takes a positive integer or 'all', got {text!r}")
    return value


def _evaluate(args: argparse.Namespace) -> int:
    from wdm3d.evaluate import evaluate  # heavy (torch, the metrics): only when an evaluation runs

    try:
        _run_evaluate(evaluate, args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"wdm3d evaluate: {err}", file=sys.stderr)
        return 2
    return 0


def _run_evaluate(evaluate, args: argparse.Namespace) -> None:
    evaluate(
        real=args.real,
        fake=args.fake,
        out_dir=args.out,
        weights=args.weights,
        features=args.features,
        preset=args.preset,
        pairs=args.pairs,
        kernel_size=args.kernel_size,
        ms_ssim_adapt=not args.no_ms_ssim_adapt,
        split=args.split,
        image_key=args.image_key,
        value_range=args.value_range,
        copy_threshold=args.copy_threshold,
        ncc_downsample=args.ncc_downsample,
        max_real=args.max_real,
        batch_size=args.batch_size,
        device=args.device,
        num_threads=args.threads,
        seed=args.seed,
        mlflow=not args.no_mlflow,
        mlflow_run_id=args.mlflow_run_id,
        tracking_uri=args.tracking_uri,
    )


def _export_dicom(args: argparse.Namespace) -> int:
    # the imaging libraries (nibabel, pydicom via wdm3d.io) take a while to import: only when an export runs
    import nibabel as nib
    import numpy as np

    from wdm3d.io import write_dicom_series

    if args.modality == "MR" and args.hu is not None:
        print("wdm3d export-dicom: --hu is for --modality CT.", file=sys.stderr)
        return 2
    if args.modality == "CT" and args.intensity_range is not None:
        print("wdm3d export-dicom: --intensity-range is for --modality MR (CT stores HU; see --hu).", file=sys.stderr)
        return 2
    out = Path(args.out)

    def series_dir(name: str) -> Path:
        return out / f"{Path(name).name.removesuffix('.gz').removesuffix('.nii')}_dicom"

    claimed: dict[Path, str] = {}
    for name in args.inputs:  # two inputs with one file name would write one series folder (--overwrite: silently)
        first = claimed.setdefault(series_dir(name), name)
        if Path(first).resolve() != Path(name).resolve():
            print(
                f"wdm3d export-dicom: {first} and {name} would both be written to {series_dir(name)}; export them "
                "to different --out folders (nothing was written).",
                file=sys.stderr,
            )
            return 2
    failed = []
    for name in dict.fromkeys(args.inputs):
        src, dst = Path(name), series_dir(name)
        try:
            if not src.is_file():
                raise FileNotFoundError("no such file")
            img = nib.load(str(src))
            data = np.asarray(img.dataobj, dtype=np.float32)
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            info = write_dicom_series(
                data,
                img.affine,
                dst,
                modality=args.modality,
                series_description=args.description,
                value_range=args.intensity_range,
                hu_window=args.hu,
                overwrite=args.overwrite,
            )
        except Exception as err:  # one bad file must not stop the others
            failed.append(name)
            print(f"wdm3d export-dicom: {name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        mapping = (
            f"rescale {info['rescale_slope']:g} x + {info['rescale_intercept']:g} {info['rescale_type']}"
            if args.modality == "CT"
            # the MR Image IOD has no rescale: a Real World Value Mapping
            else f"value = {info['rescale_slope']:g} x + {info['rescale_intercept']:g} (real world value mapping)"
        )
        print(f"{name} -> {info['dir']} ({info['num_slices']} slices, {args.modality}, {mapping})")
    total = len(dict.fromkeys(args.inputs))
    print(
        f"Wrote {total - len(failed)} of {total} DICOM series to {out.resolve()}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _import_wdm(args: argparse.Namespace) -> int:
    from wdm3d.engine.wdm_import import import_wdm  # heavy (torch, the networks): only when a conversion runs

    try:
        path = import_wdm(
            args.checkpoint, args.preset, args.out, name=args.name, spacing=args.spacing, overwrite=args.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # WDMImportError is a ValueError
        print(f"wdm3d import-wdm: {err}", file=sys.stderr)
        return 2
    bundle = "wdm3d_brats" if "lidc" not in Path(args.checkpoint).name.lower() else "wdm3d_lidc"
    # wdm_paper.json pins WDM's process, DDPM-1000, fp32 and the raw weights whatever the bundle's defaults are
    overlay = f",'bundles/{bundle}/configs/wdm_paper.json'" + (
        "" if args.preset == "wdm_128" else f",'bundles/{bundle}/configs/wdm_256.json'"
    )
    print(f"Converted {args.checkpoint} (WDM-3D, {args.preset}) -> {path}")
    print(
        "Sample it with WDM's setting (1000-step DDPM, --sampler ddpm --num_steps 1000 in wdm_paper.json), e.g.:\n"
        f"  python -m monai.bundle run inference --config_file \"['bundles/{bundle}/configs/inference.json'{overlay}]\" "
        f"--checkpoint {path} --num_samples 4\n"
        "or faster with --sampler ddim --num_steps 50 (see docs/import_wdm.md)."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wdm3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and presets").set_defaults(func=_info)
    demo = sub.add_parser(
        "demo", help="build the demo brain dataset, train the wdm3d_brats bundle on it, write NIfTI + PNG samples"
    )
    demo.add_argument("--output", default="wdm3d_demo", help="output folder (default: wdm3d_demo)")
    demo.add_argument("--num-cases", type=int, default=16, help="demo cases to generate (default 16)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: demo.json's)")
    demo.add_argument("--num-samples", type=int, default=None, help="volumes to generate (default: demo.json's)")
    demo.add_argument(
        "--sampler",
        default=None,
        choices=["rflow"],
        help="sampler (default: demo.json's rflow; the demo trains rectified flow, which ddpm and ddim cannot sample)",
    )
    demo.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: demo.json's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    demo.add_argument("--quick", action="store_true", help="shrink everything to seconds (16^3, tiny U-Net)")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser(
        "evaluate", help="3D FID, MS-SSIM diversity, distribution checks and memorization audit of synthetic volumes"
    )
    ev.add_argument(
        "--real", required=True, help="folder of real NIfTI volumes, or a datalist JSON (see --split, --image-key)"
    )
    ev.add_argument("--fake", required=True, help="folder of synthetic NIfTI volumes (an inference output folder)")
    ev.add_argument(
        "--weights",
        default=None,
        help="MedicalNet's resnet_50_23dataset.pth, for FIDs comparable with papers (never downloaded)",
    )
    ev.add_argument(
        "--features",
        default="auto",
        choices=["auto", "medicalnet", "random_conv3d"],
        help="FID features (auto: medicalnet with --weights, else random_conv3d, not comparable with papers)",
    )
    ev.add_argument("--out", default=None, help="output folder (default: FAKE/evaluation)")
    ev.add_argument("--pairs", type=_pairs, default=100, help="MS-SSIM pairs per set, or 'all' (default 100)")
    ev.add_argument(
        "--preset", default="wdm", choices=["wdm", "hagan"], help="FID input range: wdm [0,1], hagan [-1,1]"
    )
    ev.add_argument("--kernel-size", type=int, default=7, help="MS-SSIM kernel (default 7, the protocol's)")
    ev.add_argument(
        "--no-ms-ssim-adapt",
        action="store_true",
        help="fail on volumes too small for 5-scale MS-SSIM instead of using fewer scales",
    )
    ev.add_argument("--split", default="training", help="datalist split for --real (default training)")
    ev.add_argument("--image-key", default=None, help="datalist key of the volumes (e.g. t1n; guessed if only one)")
    ev.add_argument(
        "--value-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="data intensity range (default: manifest's / datalist's intensity_range, else real min/max)",
    )
    ev.add_argument("--copy-threshold", type=float, default=None, help="NCC for a suspected copy (default: automatic)")
    ev.add_argument("--ncc-downsample", type=int, default=1, help="average-pool factor before the NCC (default 1)")
    ev.add_argument("--max-real", type=int, default=None, help="use only the first N real volumes (default: all)")
    ev.add_argument("--batch-size", type=int, default=4, help="volumes per feature-extraction pass (default 4)")
    ev.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available)")
    ev.add_argument("--threads", type=int, default=None, help="CPU threads for MS-SSIM pairs (default: cores)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--mlflow-run-id", default=None, help="MLflow run to log to (default: the manifest's mlflow_run_id)"
    )
    ev.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the training run's mlflow_run.json)",
    )
    ev.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ev.set_defaults(func=_evaluate)
    dc = sub.add_parser(
        "export-dicom", help="write NIfTI volumes as DICOM series marked synthetic (new UIDs, synthetic patient)"
    )
    dc.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI files (.nii / .nii.gz)")
    dc.add_argument("--out", required=True, help="output folder; each INPUT goes to OUT/<name>_dicom/")
    dc.add_argument("--modality", required=True, choices=["CT", "MR"], help="CT Image or MR Image Storage")
    dc.add_argument(
        "--intensity-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="MR: intensities stored as [0, 4095] (default: each volume's min and max)",
    )
    dc.add_argument(
        "--hu",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="CT: the input is [0, 1]-normalised; map 0 -> LOW and 1 -> HIGH HU (the LIDC prep's clip "
        "range, e.g. -1000 and its high end); default: the input is taken as HU (RescaleType US if it "
        "does not look like HU: all values within [-100, 100])",
    )
    dc.add_argument("--description", default=None, help="added to the SeriesDescription after 'synthetic (wdm3d)'")
    dc.add_argument("--overwrite", action="store_true", help="replace existing series folders (default: refuse)")
    dc.set_defaults(func=_export_dicom)
    iw = sub.add_parser(
        "import-wdm", help="convert WDM-3D's released U-Net weights (pfriedri/wdm-3d) into a wdm3d checkpoint"
    )
    iw.add_argument("checkpoint", metavar="CKPT", help="WDM-3D checkpoint (a bare state dict, e.g. brats_1200000.pt)")
    iw.add_argument(
        "--preset",
        required=True,
        choices=["wdm_128", "wdm_256"],
        help="the U-Net it is: wdm_128 (128^3 models) or wdm_256 (256^3)",
    )
    iw.add_argument("--out", required=True, help="output folder (e.g. a bundle's output/models)")
    iw.add_argument("--name", default=None, help="output file name (default: <CKPT stem>_wdm3d.pt)")
    iw.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="voxel size in mm stored in the geometry (default: 2 at 128^3, 1 at 256^3, as WDM's data)",
    )
    iw.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    iw.set_defaults(func=_import_wdm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
