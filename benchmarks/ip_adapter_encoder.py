"""A small trained WF-VAE-3D for the IP-Adapter benchmarks: the frozen image encoder, trained quickly on CPU.

:func:`train_wfvae_encoder` trains a narrow :class:`wdm3d.networks.WFVAE3D` on a handful of volumes (32^3 or 64^3)
with the wfvae bundle's generator loss (:class:`wdm3d.losses.VAELoss`: L1 + 0.1 x wavelet pyramid + a small KL; no
GAN, no perceptual term) plus ``mse_weight`` x the voxel MSE, and AdamW, and writes one checkpoint laid out like the
bundle's (``checkpoint_final_iteration=N.pt`` with ``model``, ``ema``, ``optimizer``, ``trainer``, ``geometry`` and a
``run_config`` recording the network), so that
``wdm3d.diffusion.conditioning.frozen.build_image_encoder("wfvae", checkpoint=out)`` rebuilds and loads it like a
bundle-trained VAE. A short run has no EMA worth the name: ``ema`` holds the final weights.

Why the MSE term: the known-truth volumes are ~97% background (exactly -1). Under the L1 terms alone the small VAE
settles on the per-voxel median, an all-background volume (about 22.5 dB on the training volumes, the organ lost), and
stayed there for 600 steps at every learning rate tried (5e-4 to 5e-3, wavelet weight 0 to 1, sampled or mean
latent); with ``10 x MSE`` added it leaves that state within ~150 steps (~30 dB after 300).

A finished run is not repeated: when the checkpoint and its ``encoder_info.json`` are in ``out``, the info is read
back.

Manual use::

    python benchmarks/ip_adapter_encoder.py OUT --shapes 32 --num 64 --iterations 300
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wdm3d.artifacts import save_checkpoint_file
from wdm3d.engine import RunConfig
from wdm3d.losses import VAELoss
from wdm3d.networks import WFVAE3D

__all__ = ["DEFAULT_VAE", "INFO_FILE", "train_wfvae_encoder"]

logger = logging.getLogger(__name__)

#: The default network: 0.38 M parameters, 4x compression per axis, 8 latent channels (32^3 -> 8 x 8^3). One CPU
#: thread, 32^3, batch 4: ~0.14 s per step (with 2 residual and 2 middle blocks 0.21 s; base_channels 32: 1.5 M
#: parameters, 0.36 s).
DEFAULT_VAE: dict[str, Any] = {
    "latent_channels": 8,
    "levels": 2,
    "base_channels": 16,
    "num_res_blocks": 1,
    "num_mid_blocks": 1,
}

#: The JSON written beside the checkpoint (what :func:`train_wfvae_encoder` returns).
INFO_FILE = "encoder_info.json"

_GRAD_CLIP_NORM = 1.0  # the wfvae bundle's grad_clip_norm


def _checkpoint_name(iterations: int) -> str:
    # the bundle's final checkpoint name (wdm3d.engine.TrainingCheckpoints)
    return f"checkpoint_final_iteration={iterations}.pt"


def _to_model_range(volumes: np.ndarray) -> torch.Tensor:
    vols = np.asarray(volumes, dtype=np.float32)
    if vols.ndim != 4:
        raise ValueError(f"volumes must have shape (N, D, H, W), got {vols.shape}.")
    if not np.isfinite(vols).all():
        raise ValueError("volumes must be finite.")
    # the bundles map the prepared intensity range to [-1, 1]; here that range is [0, 1]
    return torch.from_numpy(vols * 2.0 - 1.0).unsqueeze(1)


@torch.no_grad()
def _recon_psnr(vae: WFVAE3D, x: torch.Tensor, batch_size: int) -> float:
    """Mean over volumes of the PSNR (dB, data range 2) of posterior-mode reconstructions, clipped to [-1, 1]."""
    was_training = vae.training
    vae.eval()
    psnrs = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        rec = vae.decode(vae.encode(xb).mode()).clamp(-1.0, 1.0)
        mse = ((rec - xb) ** 2).flatten(1).mean(1)
        psnrs.extend((10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))).tolist())
    vae.train(was_training)
    return float(np.mean(psnrs))


def train_wfvae_encoder(
    volumes: np.ndarray,
    out: Path,
    seed: int = 0,
    iterations: int = 300,
    batch_size: int = 4,
    lr: float = 1e-3,
    mse_weight: float = 10.0,
    **vae_overrides: Any,
) -> dict[str, Any]:
    """Train a small WF-VAE-3D on ``volumes`` and save it as a wfvae-bundle checkpoint in ``out``.

    Args:
        volumes: ``(N, D, H, W)`` in [0, 1] (mapped to [-1, 1] as the bundles do); D, H, W divisible by
            ``2**levels``.
        out: the folder for the checkpoint and :data:`INFO_FILE`.
        seed: ``torch.manual_seed`` (initialisation, posterior samples) and the batch order
            (``numpy.random.default_rng(seed)``).
        iterations: optimiser steps.
        batch_size: volumes per step, drawn without replacement within each pass over the data.
        lr: AdamW's learning rate (weight decay 1e-4, betas (0.9, 0.999) as in the bundle; gradient norm clipped
            to 1).
        mse_weight: weight of the voxel MSE added to :class:`~wdm3d.losses.VAELoss` (0: the bundle's loss alone).
        **vae_overrides: :class:`~wdm3d.networks.WFVAE3D` arguments replacing :data:`DEFAULT_VAE`'s.

    Returns:
        ``{"checkpoint", "iterations", "seconds", "recon_psnr_db", "latent_shape", "parameters", "seed",
        "batch_size", "lr", "network"}``: ``recon_psnr_db`` is the mean PSNR over the training volumes of the
        posterior-mode reconstruction in [-1, 1] (data range 2); ``latent_shape`` is one volume's ``(Z, d, h, w)``;
        ``seconds`` is the training time (steps only). Also written to ``out/encoder_info.json``; when that file and
        the checkpoint it names exist already, they are returned without training.
    """
    out = Path(out)
    ckpt_path = out / _checkpoint_name(iterations)
    info_path = out / INFO_FILE
    if ckpt_path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if Path(info.get("checkpoint", "")).resolve() == ckpt_path.resolve():
            logger.info("WF-VAE encoder already trained: %s", ckpt_path)
            return info
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}.")
    x = _to_model_range(volumes)
    if batch_size < 1 or batch_size > len(x):
        raise ValueError(f"batch_size must be in [1, {len(x)}] (the number of volumes), got {batch_size!r}.")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = WFVAE3D(in_channels=1, **{**DEFAULT_VAE, **vae_overrides})
    loss_fn = VAELoss(recon_weight=1.0, wavelet_weight=0.1, kl_weight=1e-6)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.999))

    vae.train()
    order: list[int] = []
    start = time.perf_counter()
    for step in range(iterations):
        if len(order) < batch_size:  # a new pass over the data, shuffled
            order.extend(rng.permutation(len(x)).tolist())
        idx, order = order[:batch_size], order[batch_size:]
        xb = x[idx]
        output = vae(xb)
        total, terms = loss_fn(output, xb, model=vae)
        if mse_weight:
            total = total + mse_weight * (output.reconstruction - xb).square().mean()
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss at step {step}: {total.item()}.")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), _GRAD_CLIP_NORM)
        optimizer.step()
        if step % 50 == 0 or step == iterations - 1:
            logger.info("step %d: loss %.4f (L1 %.4f)", step, total.item(), terms["recon"].item())
    seconds = time.perf_counter() - start

    vae.eval()
    psnr = _recon_psnr(vae, x, batch_size)
    with torch.no_grad():
        latent_shape = list(vae.encode(x[:1]).mode().shape[1:])
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    image_size = list(x.shape[2:])
    run_config = RunConfig(
        vae,
        settings={
            "num_channels": 1,
            "image_size": image_size,
            "latent_channels": vae.latent_channels,
            "levels": vae.levels,
            "intensity_range": [0.0, 1.0],
        },
    )
    checkpoint = {
        "model": state,
        "ema": state,  # a short run: the final weights stand in for the EMA that load_frozen prefers
        "optimizer": optimizer.state_dict(),
        "trainer": {"epoch_length": iterations, "max_epochs": 1, "iteration": iterations},
        "geometry": {
            "affine": torch.eye(4, dtype=torch.float64),
            "shape": torch.tensor(image_size, dtype=torch.int64),
            "intensity_range": torch.tensor([0.0, 1.0], dtype=torch.float64),
        },
        "run_config": run_config.state_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint_file(checkpoint, ckpt_path)
    info = {
        "checkpoint": str(ckpt_path.resolve()),
        "iterations": iterations,
        "seconds": round(seconds, 2),
        "recon_psnr_db": round(psnr, 3) if math.isfinite(psnr) else psnr,
        "latent_shape": latent_shape,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "mse_weight": mse_weight,
        "network": checkpoint["run_config"]["network"],
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the checkpoint and encoder_info.json")
    parser.add_argument("--shapes", type=int, default=32, choices=(32, 64), help="volume size (known_truth shapes)")
    parser.add_argument("--num", type=int, default=64, help="training volumes")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mse-weight", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--base-channels", type=int, default=None, help="override DEFAULT_VAE's base_channels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from data_prep.known_truth import make_volumes

    volumes, _ = make_volumes(args.num, args.shapes, args.seed)
    overrides = {} if args.base_channels is None else {"base_channels": args.base_channels}
    info = train_wfvae_encoder(
        volumes,
        args.out,
        seed=args.seed,
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        mse_weight=args.mse_weight,
        **overrides,
    )
    print(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
