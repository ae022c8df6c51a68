"""A small end-to-end WDM run that needs no data and no GPU.

It trains a narrow WDM U-Net with MONAI's stock ``SupervisedTrainer`` + ``DiffusionInferer`` on procedurally
generated "head phantoms" (a bright shell around a darker ellipsoid with an inner blob, in [-1, 1]), then samples
volumes and writes them as NIfTI. It exercises the same pieces the bundles use (wavelet space, diffusion target,
sampler, clip projection) in about a minute on a laptop CPU.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from .diffusion import WaveletDiffusion, WaveletDiffusionPrepareBatch, WaveletMSELoss
from .networks import WDMUNet, count_parameters

__all__ = ["phantom_volumes", "run_demo"]


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


def _save_nifti(volume: np.ndarray, path: Path, spacing: float) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_demo(
    output_dir: str | os.PathLike = "wdm3d_demo",
    size: int = 16,
    iterations: int = 300,
    batch_size: int = 4,
    num_samples: int = 2,
    sampler: str = "ddim",
    num_steps: int = 50,
    base_channels: int = 16,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a tiny WDM on phantoms and write ``num_samples`` generated NIfTI volumes to ``output_dir``.

    Returns a summary dict (also written to ``output_dir/summary.json``): first and last training loss, parameter
    count, sampler settings, output files and times.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_determinism(seed)

    data = [{"image": v} for v in phantom_volumes(max(32, batch_size), size, seed)]
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    epoch_length = len(loader)
    network = WDMUNet(
        base_channels=base_channels, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8
    ).to(device)
    diffusion = WaveletDiffusion()  # WDM defaults: T=1000, linear betas, x0 prediction, LLL / 3
    losses: list[float] = []
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=math.ceil(iterations / epoch_length),
        epoch_length=epoch_length,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=2e-3),
        loss_function=WaveletMSELoss(),
        inferer=DiffusionInferer(diffusion.scheduler),
        prepare_batch=WaveletDiffusionPrepareBatch(diffusion),
        decollate=False,
    )

    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        losses.append(engine.state.output["loss"].item())
        if engine.state.iteration >= iterations:
            engine.terminate()

    t0 = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - t0

    network.eval()
    t0 = time.perf_counter()
    images = diffusion.sample(
        network, (1, size, size, size), num_samples=num_samples, sampler=sampler, num_steps=num_steps,
        seed=seed, device=device, progress=progress,
    )
    sample_s = time.perf_counter() - t0
    files = []
    for i, vol in enumerate(images[:, 0].cpu().numpy()):
        path = out / f"sample_{i:03d}.nii.gz"
        _save_nifti(vol, path, spacing=2.0)
        files.append(str(path))
    k = max(1, len(losses) // 10)
    summary = {
        "iterations": len(losses),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "parameters": count_parameters(network),
        "diffusion": diffusion.config(),
        "sampler": sampler,
        "num_steps": num_steps,
        "seed": seed,
        "device": str(device),
        "train_seconds": round(train_s, 2),
        "sample_seconds": round(sample_s, 2),
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
