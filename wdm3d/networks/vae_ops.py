"""Operations on a trained volume autoencoder's latents: the posterior mean, decoding (optionally slab by slab along
depth), deterministic reconstruction, the latent grid's affine, a latent datalist's normalisation, and
:class:`LatentDecoder` that turns normalised diffusion samples back into volumes.

These sit in the networks layer so that training (validation), diffusion (conditioning on latents) and the apps use
one definition; they only need torch / MONAI and :mod:`wdm3d.artifacts` (loading the frozen autoencoder).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from ..artifacts import build_network, load_frozen, unwrap

__all__ = [
    "AUTOENCODER_HINT",
    "LatentDecoder",
    "ReconstructionInferer",
    "check_chunk",
    "decode_latent",
    "encode_mean",
    "latent_affine",
    "read_latent_stats",
    "reconstruct",
]

logger = logging.getLogger(__name__)

#: what to do when an autoencoder checkpoint is missing, for :func:`wdm3d.artifacts.load_frozen`'s messages
AUTOENCODER_HINT = "train the autoencoder first or set the path."


def check_chunk(model: nn.Module, chunk: int | None, what: str) -> None:
    """Refuse slab-by-slab processing for an autoencoder that cannot do it exactly.

    Args:
        model: the autoencoder (DDP / torch.compile wrappers are looked through).
        chunk: slices per slab, or None (whole volume: always allowed).
        what: ``"encode"`` or ``"decode"``; the network needs a ``<what>_chunked`` method (a causal cache).

    Raises:
        ValueError: ``chunk`` is set and the network has no ``<what>_chunked``.
    """
    net = unwrap(model)
    if chunk is not None and not hasattr(net, f"{what}_chunked"):
        raise ValueError(f"{type(net).__name__} has no {what}_chunked (no causal cache); set chunk to null.")


@torch.no_grad()
def encode_mean(model: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The posterior mean of ``x``: ``(B, C, D, H, W) -> (B, Z, D/f, H/f, W/f)``.

    Args:
        model: an autoencoder (:mod:`wdm3d.networks.vae_base`).
        x: volumes in the model's intensity range.
        chunk: encode slab by slab along depth with the causal cache (WF-VAE; exact), this many slices at a time.
    """
    net = unwrap(model)
    check_chunk(net, chunk, "encode")
    posterior = net.encode_chunked(x, chunk) if chunk else net.encode(x)
    return posterior.mean


@torch.no_grad()
def decode_latent(model: nn.Module, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Decode latents ``(B, Z, d, h, w) -> (B, C, d*f, h*f, w*f)``.

    Args:
        model: an autoencoder (:mod:`wdm3d.networks.vae_base`).
        z: latents (not normalised: see :class:`LatentDecoder` for diffusion samples).
        chunk: decode this many latent slices at a time along depth (None: the whole latent).
    """
    net = unwrap(model)
    check_chunk(net, chunk, "decode")
    return net.decode_chunked(z, chunk) if chunk else net.decode(z)


@torch.no_grad()
def reconstruct(
    model: nn.Module, x: torch.Tensor, chunk: int | None = None, latent_chunk: int | None = None
) -> torch.Tensor:
    """Deterministic reconstruction ``decode(encode(x).mean)``, same shape as ``x``.

    Args:
        model: an autoencoder (:mod:`wdm3d.networks.vae_base`).
        x: volumes in the model's intensity range.
        chunk: image slices encoded at a time (None: whole volume).
        latent_chunk: latent slices decoded at a time (None: whole latent).
    """
    return decode_latent(model, encode_mean(model, x, chunk), latent_chunk)


class ReconstructionInferer(Inferer):
    """``inferer(x, network)``: the autoencoder's reconstruction of ``x`` from the posterior mean (:func:`reconstruct`),
    ``(B, C, D, H, W) -> (B, C, D, H, W)``; the ``inferer`` of the VAE bundles' ``inference.json``.

    MONAI's ``SimpleInferer`` calls ``network(x)``, which samples the posterior and returns a ``VAEOutput``;
    reconstruction metrics need the deterministic mean path and, for WF-VAE, the chunked one.

    Args:
        chunk: encode slab by slab along depth, this many slices at a time (WF-VAE's causal cache; exact);
            None: the whole volume at once.
        latent_chunk: decode this many latent slices at a time (None: the whole latent).
    """

    def __init__(self, chunk: int | None = None, latent_chunk: int | None = None) -> None:
        for name, value in (("chunk", chunk), ("latent_chunk", latent_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of slices or null (whole volume), got {value!r}.")
        super().__init__()
        self.chunk, self.latent_chunk = chunk, latent_chunk

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return reconstruct(network, inputs, self.chunk, self.latent_chunk)


def latent_affine(affine: np.ndarray | torch.Tensor, factor: int) -> np.ndarray:
    """The voxel-to-world matrix of a latent grid downsampled ``factor`` times per axis from ``affine``.

    Latent voxel ``i`` covers image voxels ``f*i ... f*i + f - 1``; its centre is image voxel ``f*i + (f-1)/2``.

    Args:
        affine: the image's 4x4 voxel-to-world matrix.
        factor: the autoencoder's downsampling factor per axis.
    """
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return a @ scale


def read_latent_stats(path: str | os.PathLike) -> dict[str, Any]:
    """The normalisation and provenance entries of a latent datalist (written by
    :func:`wdm3d.autoencoder.encode_dataset`).

    Args:
        path: the ``datalist_latents.json``.

    Raises:
        KeyError: an entry the latent diffusion needs is missing (not a latent datalist).
    """
    data = json.loads(Path(path).read_text())
    for key in ("latent_shift", "latent_scale", "latent_channels", "downsample_factor", "autoencoder"):
        if key not in data:
            raise KeyError(f"{path} has no {key!r}: it is not a latent datalist written by wdm3d's encode step.")
    return data


class LatentDecoder(nn.Module):
    """Normalised latents from the diffusion -> volumes in [-1, 1]: undo shift/scale, then decode (optionally
    chunked along depth, exact for WF-VAE).

    Args:
        autoencoder: the autoencoder network (built from the autoencoder bundle's ``network_def``); None: rebuilt
            from the checkpoint's recorded settings (:func:`wdm3d.artifacts.build_network`).
        latent_datalist: the ``datalist_latents.json`` the diffusion was trained on (normalisation, checkpoint).
        checkpoint: the autoencoder checkpoint; None: the one recorded in the latent datalist.
        chunk: latent slices decoded at a time (None: whole volume).
        use_ema: prefer the checkpoint's EMA weights.
    """

    def __init__(
        self,
        autoencoder: nn.Module | None,
        latent_datalist: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        chunk: int | None = None,
        use_ema: bool = True,
    ) -> None:
        super().__init__()
        stats = read_latent_stats(latent_datalist)
        checkpoint = checkpoint or stats["autoencoder"]["checkpoint"]
        if autoencoder is None:
            autoencoder = build_network(checkpoint)
        self.autoencoder, self.info = load_frozen(
            autoencoder, checkpoint, use_ema, what="autoencoder", hint=AUTOENCODER_HINT
        )
        if stats.get("autoencoder", {}).get("sha256") not in (None, self.info["sha256"]):
            logger.warning(
                "Autoencoder checkpoint %s differs from the one the latents were encoded with (%s).",
                checkpoint,
                stats["autoencoder"].get("checkpoint"),
            )
        check_chunk(self.autoencoder, chunk, "decode")
        self.chunk = chunk
        self.downsample_factor = int(stats["downsample_factor"])
        self.latent_channels = int(stats["latent_channels"])
        self.register_buffer("shift", torch.tensor(stats["latent_shift"], dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("scale", torch.tensor(stats["latent_scale"], dtype=torch.float32).view(1, -1, 1, 1, 1))

    def latent_shape(self, image_size: Sequence[int]) -> list[int]:
        """``(Z, D/f, H/f, W/f)`` for an image size.

        Args:
            image_size: ``(D, H, W)``, each divisible by the downsampling factor.
        """
        f = self.downsample_factor
        if any(int(s) % f for s in image_size):
            raise ValueError(f"image_size {list(image_size)} must be divisible by the downsample factor {f}.")
        return [self.latent_channels] + [int(s) // f for s in image_size]

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float() / self.scale.to(z.device) + self.shift.to(z.device)
        self.autoencoder.to(z.device)
        return decode_latent(self.autoencoder, z, self.chunk)
