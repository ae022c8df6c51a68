"""The embedded demo: the whole WDM loop on a fresh CPU machine, with no downloads.

``wdm3d demo --output DIR`` (1) builds a small BraTS-like dataset from the MNI152 T1 template shipped in the
nilearn wheel (``data_prep.demo``: torchio augmentations, synthetic lesions, BraTS 2023 layout) and prepares it
with the same code real BraTS data goes through (``data_prep.brats``, 64^3 at 4 mm); (2) trains the
``wdm3d_brats`` bundle on it with the ``demo.json`` overlay (narrow U-Net, higher learning rate, short run) via
MONAI's bundle runner; (3) runs the bundle's inference to write NIfTI volumes and PNG previews.

:func:`phantom_volumes` makes tiny procedural head phantoms for tests that need volumes but no files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from data_prep.demo import make_demo_dataset

from . import bundle
from .io import atomic_write_text

__all__ = ["phantom_volumes", "run_demo", "QUICK"]

BUNDLE = "wdm3d_brats"
#: Overrides that shrink the demo to seconds (tests, smoke checks): 16^3 images, a tiny U-Net, one epoch.
QUICK: dict = {
    "image_size": [16, 16, 16],
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
    "batch_size": 2,
    "max_epochs": 1,
    "val_interval": 1,
    "val_num_steps": 2,
    "num_steps": 2,
}


def phantom_volumes(num: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``num`` random head-like phantoms, ``(num, 1, size, size, size)`` in [-1, 1] (background -1)."""
    if size < 8 or size % 2:
        raise ValueError(f"size must be an even number >= 8, got {size}.")
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    vols = []
    for _ in range(num):
        r = 0.65 + 0.2 * torch.rand(3, generator=g)  # outer radii
        c = 0.1 * (torch.rand(3, generator=g) - 0.5)  # centre jitter
        outer = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        inner = outer / 0.8**2
        vol = torch.full_like(outer, -1.0)
        vol[outer <= 1] = 0.8  # shell ("skull")
        vol[inner <= 1] = 0.1 + 0.2 * torch.rand((), generator=g)  # "brain"
        b = 0.4 * (torch.rand(3, generator=g) - 0.5)
        rb = 0.15 + 0.1 * torch.rand((), generator=g)
        blob = ((zz - b[0]) ** 2 + (yy - b[1]) ** 2 + (xx - b[2]) ** 2) / rb**2
        vol[(blob <= 1) & (inner <= 1)] = 0.6  # "lesion"
        vols.append(vol)
    return torch.stack(vols)[:, None]


class DemoInterrupted(RuntimeError):
    """The demo's training stopped before its last epoch (SIGTERM): nothing was sampled."""


def _check_training_finished(workflow, out: Path) -> None:
    """Raise :class:`DemoInterrupted` when the training run stopped early (on SIGTERM it saves a checkpoint and
    returns normally, so sampling would otherwise go on with a half-trained network and report success)."""
    state = workflow.parser.get_parsed_content("train#trainer").state
    if state.epoch < state.max_epochs:
        raise DemoInterrupted(
            f"the demo's training stopped at epoch {state.epoch} of {state.max_epochs} (iteration {state.iteration}; "
            f"interrupted). Its checkpoint is in {out / 'models'}; run the demo again with the same output folder "
            "to resume training from it."
        )


def run_demo(
    output_dir: str | os.PathLike = "wdm3d_demo",
    num_cases: int = 16,
    max_epochs: int | None = None,
    num_samples: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """Build the demo dataset, train the bundle on it, generate samples; return (and write) a summary.

    Args:
        output_dir: everything goes here: ``data/`` (raw + prepared demo dataset), ``models/`` (checkpoints),
            ``validation/`` (previews during training), ``samples/`` (NIfTI, PNG, manifest), ``summary.json``.
        num_cases: demo cases to generate.
        max_epochs, num_samples, sampler, num_steps: override the ``demo.json`` values.
        seed: seeds the dataset, training and sampling.
        quick: shrink everything to seconds (:data:`QUICK`), for tests.
        progress: progress bars.
        overrides: any other bundle config key (``learning_rate=...``, ``device=...``).
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = dict(QUICK) if quick else {}
    for key, value in (
        ("max_epochs", max_epochs),
        ("num_samples", num_samples),
        ("sampler", sampler),
        ("num_steps", num_steps),
    ):
        if value is not None:
            config[key] = value
    config.update(overrides)
    times = {}

    t0 = time.perf_counter()
    pool = 8 if quick else 2  # 128^3 at 2 mm -> 16^3 (quick) or 64^3
    datalist = make_demo_dataset(
        out / "data", num_cases=num_cases, seed=seed, resolution=2, pool=pool, progress=progress
    )
    times["data_seconds"] = round(time.perf_counter() - t0, 1)
    common = {"dataset_dir": str(Path(datalist).parent), "output_dir": str(out), "seed": seed, **config}

    t0 = time.perf_counter()
    workflow = bundle.run_bundle(BUNDLE, "training", ["train.json", "demo.json"], **common)
    times["train_seconds"] = round(time.perf_counter() - t0, 1)
    _check_training_finished(workflow, out)

    t0 = time.perf_counter()
    bundle.run_bundle(BUNDLE, "inference", ["inference.json", "demo.json"], **common)
    times["sample_seconds"] = round(time.perf_counter() - t0, 1)

    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    summary = {
        **times,
        "datalist": str(datalist),
        "samples": [str(out / "samples" / s["nifti"]) for s in manifest["samples"]],
        "previews": [str(out / "samples" / s["png"]) for s in manifest["samples"]],
        "validation_previews": sorted(str(p) for p in (out / "validation").glob("epoch_*.png")),
        "checkpoint": manifest["checkpoint"],
        "sampler": manifest["sampler"],
        "num_steps": manifest["num_steps"],
        "overrides": config,
        "mlflow_uri": json.loads((out / "mlflow_run.json").read_text())["tracking_uri"]
        if (out / "mlflow_run.json").is_file()
        else None,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
