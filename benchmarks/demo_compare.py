"""The demo, recipe against recipe (issue 19): same data, seeds and training budget; a montage for the README.

Runs ``wdm3d demo`` (:func:`wdm3d.demo.run_demo`) once per recipe into ``OUT/<recipe>/`` with the same seed and
epochs, times each stage, and writes ``OUT/montage.png``: a row of axial / coronal / sagittal mid-slices for each of
``--rows`` real demo cases and for each recipe's first samples, with the rows labelled in ``OUT/montage.json``,
which also holds each sample's brain likeness (NCC with the mean training volume, :func:`brain_likeness`).

    python benchmarks/demo_compare.py /tmp/demo_cmp --montage docs/demo_montage.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: recipe name -> bundle overrides on top of demo.json ("default" is what the demo runs today)
RECIPES: dict[str, dict] = {
    "default": {},
    # WDM's recipe as the demo ran it before issue 19: DDPM, x0 prediction, one Haar level, DDIM-50
    "wdm": {
        "diffusion#flow_map": None,
        "diffusion#process": "ddpm",
        "diffusion#prediction_type": "sample",
        "diffusion#loss_weighting": "none",
        "diffusion#levels": 1,
        "sampler": "ddim",
        "num_steps": 50,
    },
    # the demo's and the bundles' default since 2026-12-06 (the quality benchmark's pick among the recipes that pass
    # the demo-scale check): rectified flow (logit-normal t), x prediction with a velocity loss (JiT), two Haar levels,
    # 50 Euler steps
    "jit_2level": {
        "diffusion#flow_map": None,
        "diffusion#process": "rflow",
        "diffusion#prediction_type": "sample",
        "diffusion#loss_weighting": "velocity",
        "diffusion#rflow_sample_method": "logit-normal",
        "diffusion#levels": 2,
        "sampler": "rflow",
        "num_steps": 50,
    },
    # the pick of the quality benchmark's rule: a shortcut model (x prediction) on the same two Haar levels, 4 jumps
    "shortcut_2level": {
        "diffusion#process": "rflow",
        "diffusion#prediction_type": "sample",
        "diffusion#loss_weighting": "none",
        "diffusion#levels": 2,
        "diffusion#flow_map": "shortcut",
        "sampler": "shortcut",
        "num_steps": 4,
    },
    # the same with the JiT's time law for its flow-matching pairs, logit-normal(0, 1) (MeanFlow's is (-0.4, 1))
    "shortcut_2level_t0": {
        "diffusion#process": "rflow",
        "diffusion#prediction_type": "sample",
        "diffusion#loss_weighting": "none",
        "diffusion#levels": 2,
        "diffusion#flow_map": "shortcut",
        "diffusion#flow_map_time_mean": 0.0,
        "sampler": "shortcut",
        "num_steps": 4,
    },
}


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two volumes (1: the same up to brightness and contrast)."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def brain_likeness(samples: list[np.ndarray], reals: list[np.ndarray]) -> list[float]:
    """Each sample's NCC with the mean training volume: whether it has the brain's layout (ventricles, cortex,
    cerebellum where the real ones have them). Coarse (a copy of the mean would score 1), so read it beside the
    montage; the real cases' own figure is the reference."""
    mean = np.mean(reals, axis=0)
    return [round(ncc(v, mean), 4) for v in samples]


def main(argv: list[str] | None = None) -> None:
    from PIL import Image

    from wdm3d.demo import run_demo
    from wdm3d.io.preview import montage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["wdm", "jit_2level", "shortcut_2level", "shortcut_2level_t0"],
        choices=sorted(RECIPES),
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: demo.json's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=3, help="volumes per recipe in the montage")
    parser.add_argument("--montage", default=None, help="also copy the montage here (e.g. docs/demo_montage.png)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, volumes, labels, likeness, reals = {}, [], [], {}, []
    for name in args.recipes:
        summary_path = out / name / "summary.json"
        if not summary_path.is_file():
            t0 = time.perf_counter()
            run_demo(out / name, max_epochs=args.epochs, seed=args.seed, progress=False, mlflow=False, **RECIPES[name])
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        summary = json.loads(summary_path.read_text())
        timings[name] = {k: summary[k] for k in ("data_seconds", "train_seconds", "sample_seconds")}
        if not volumes:  # the real cases first, from the first recipe's prepared data
            datalist = Path(summary["datalist"])
            entries = json.loads(datalist.read_text())["training"]
            reals = [np.asarray(nib.load(datalist.parent / e["t1n"]).dataobj, np.float32) for e in entries]
            volumes += reals[: args.rows]
            labels += [f"real {e['case']}" for e in entries[: args.rows]]
            likeness["real"] = brain_likeness(reals, reals)
        likeness[name] = brain_likeness(
            [np.asarray(nib.load(path).dataobj, np.float32) for path in summary["samples"]], reals
        )
        for path in summary["samples"][: args.rows]:
            volumes.append(np.asarray(nib.load(path).dataobj, np.float32))
            labels.append(f"{name} {Path(path).name}")
    affine = nib.load(json.loads((out / args.recipes[0] / "summary.json").read_text())["samples"][0]).affine
    img = montage(volumes, affine=affine, value_range=(0.0, 1.0), zoom=2)
    Image.fromarray(img).save(out / "montage.png")
    (out / "montage.json").write_text(
        json.dumps(
            {
                "rows": labels,
                "timings": timings,
                "brain_likeness": likeness,
                "seed": args.seed,
                "epochs": args.epochs,
                "recipes": {k: RECIPES[k] for k in args.recipes},
            },
            indent=1,
        )
    )
    if args.montage:
        Image.fromarray(img).save(args.montage)
    print(json.dumps({"timings": timings, "brain_likeness": likeness}, indent=1))
    print(f"montage: {out / 'montage.png'}")


if __name__ == "__main__":
    main()
