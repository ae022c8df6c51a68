"""The frozen parts of IP-Adapter training: the trained base and the image encoder, loaded (EMA weights first) and
frozen through :mod:`wdm3d.artifacts`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ...artifacts import build_network, load_frozen, resolve_checkpoint
from ...networks.ip_adapter import FrozenImageEncoder
from ...networks.medicalnet import RandomConv3dFeatures

__all__ = ["IMAGE_ENCODERS", "build_image_encoder", "encoder_feature_grid", "load_frozen_base"]

logger = logging.getLogger(__name__)

#: Image encoders :func:`build_image_encoder` knows.
IMAGE_ENCODERS = ("wfvae", "random")


def load_frozen_base(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    diffusion: Any = None,
) -> nn.Module:
    """Load a trained base into ``network`` (EMA weights first), freeze it (``requires_grad=False``), eval mode.

    The network records where its weights came from in ``network.base_checkpoint`` (``{"path", "weights"}``), which
    the bundles write into their run manifests.

    Args:
        network: the base, built like it was trained (the bundle's ``network_def``).
        checkpoint: a checkpoint file, or a folder (its newest ``*.pt``), e.g. ``output/models/base``.
        use_ema: prefer the ``"ema"`` weights over ``"model"``.
        device: move it there.
        diffusion: the process that will sample or train on it; refused when the base was trained with another
            (:func:`~wdm3d.artifacts.check_diffusion_matches`).

    Raises:
        FileNotFoundError: no such checkpoint (the message says to train the base first).
        RuntimeError: the checkpoint does not fit ``network`` (names the first mismatching weight).
        ValueError: ``diffusion`` differs from the one the base was trained with.
    """
    network, info = load_frozen(
        network,
        checkpoint,
        use_ema,
        device,
        diffusion,
        what="base model",
        hint="train the context-conditioned base first (train_base.json writes output/models/base) or set "
        "base_checkpoint.",
    )
    network.base_checkpoint = {"path": info["checkpoint"], "weights": info["weights"]}
    logger.info("Base model loaded from %s (%s weights) and frozen.", info["checkpoint"], info["weights"])
    return network


def build_image_encoder(
    kind: str = "wfvae",
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    in_channels: int = 1,
    use_ema: bool = True,
) -> nn.Module:
    """The frozen image encoder of the IP-Adapter.

    Args:
        kind: ``"wfvae"``: the project's trained WF-VAE (rebuilt from ``checkpoint`` with
            :func:`wdm3d.artifacts.build_network`; the adapter reads its posterior mean, ``(B, Z, D/f, H/f, W/f)``);
            ``"random"``: a fixed, seeded random conv net (:class:`~wdm3d.networks.RandomConv3dFeatures`,
            ``(B, 480)`` global statistics) for tests and demos without a trained VAE.
        checkpoint: the WF-VAE checkpoint file or folder (e.g. ``bundles/wfvae/output/models``).
        seed: the random encoder's seed.
        in_channels: the reference volume's channels (random encoder).
        use_ema: prefer the VAE checkpoint's EMA weights.

    Raises:
        ValueError: an unknown ``kind``.
        FileNotFoundError: ``"wfvae"`` without a checkpoint, or with one that does not exist.
    """
    if kind == "random":
        return RandomConv3dFeatures(seed=seed, in_channels=in_channels)
    if kind != "wfvae":
        raise ValueError(f"image_encoder_type must be one of {IMAGE_ENCODERS}, got {kind!r}.")
    hint = (
        "train it with bundles/wfvae (train.json writes bundles/wfvae/output/models), set "
        "image_encoder_checkpoint, or use image_encoder_type 'random' (an untrained encoder, demos only)."
    )
    if checkpoint is None:
        raise FileNotFoundError(
            f"The IP-Adapter's image encoder is the trained WF-VAE, but no checkpoint was given; {hint}"
        )
    path = resolve_checkpoint(checkpoint, "WF-VAE image encoder", hint)
    vae, info = load_frozen(build_network(path), path, use_ema)
    vae.encoder_info = info
    return vae


@torch.no_grad()
def encoder_feature_grid(
    image_encoder: nn.Module, image_size: list[int] | tuple[int, ...], in_channels: int = 1
) -> list[int] | None:
    """The ``(d, h, w)`` of the feature map ``image_encoder`` makes of a volume of ``image_size`` (one encoding of
    zeros), or None for an encoder that returns a vector: the ``feature_grid`` of an IP-Adapter with
    ``projection="global+grid"``.

    Args:
        image_encoder: a wdm3d VAE (its posterior mode), a module or callable, as :class:`IPAdapter` takes it.
        image_size: ``(D, H, W)`` of the reference volumes.
        in_channels: their channels.
    """
    encoder = image_encoder if isinstance(image_encoder, FrozenImageEncoder) else FrozenImageEncoder(image_encoder)
    param = next(iter(encoder.parameters()), None)
    probe = torch.zeros(
        1, in_channels, *[int(s) for s in image_size], device=param.device if param is not None else None
    )
    out = encoder(probe)
    return [int(s) for s in out.shape[2:]] if out.ndim == 5 else None
