"""Glue between :class:`WaveletDiffusion` and MONAI's stock training engine.

``SupervisedTrainer`` calls ``prepare_batch`` -> ``inferer(inputs, network, *args, **kwargs)`` -> ``loss(pred,
target)``. :class:`WaveletDiffusionPrepareBatch` returns the wavelet coefficients of the batch as ``inputs``, the
diffusion target, and ``noise``/``timesteps`` (plus ``condition``/``mode`` when conditioning) as keyword
arguments, the contract of MONAI's ``DiffusionPrepareBatch``. MONAI's own ``DiffusionInferer`` with
``diffusion.scheduler`` then noises the inputs and calls the network, so a bundle needs no custom engine:

.. code-block:: python

    trainer = SupervisedTrainer(
        ..., network=net,
        prepare_batch=WaveletDiffusionPrepareBatch(diffusion),
        inferer=DiffusionInferer(diffusion.scheduler),
        loss_function=WaveletMSELoss(),
    )
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from torch import nn

from ..wavelets import SUBBANDS
from .wavelet_diffusion import WaveletDiffusion

__all__ = ["WaveletDiffusionPrepareBatch", "WaveletMSELoss", "subband_mse"]


class WaveletDiffusionPrepareBatch(PrepareBatch):
    """Turn an image batch into a wavelet diffusion training example for ``SupervisedTrainer``.

    Args:
        diffusion: the :class:`WaveletDiffusion` that defines the wavelet space, timesteps and target.
        image_key: key of the images ``(B, C, D, H, W)`` in the batch dict.
        condition_key: optional key of conditioning data.
        condition_mode: ``"concat"``: the condition is an image ``(B, Cc, D, H, W)``; its wavelet coefficients
            (same space as the images) are concatenated to the noisy input. ``"crossattn"``: the condition is
            passed to the network as ``context`` unchanged.
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        image_key: str = "image",
        condition_key: str | None = None,
        condition_mode: str = "concat",
    ) -> None:
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        if condition_mode not in ("concat", "crossattn"):
            raise ValueError(f"condition_mode must be 'concat' or 'crossattn', got {condition_mode!r}.")
        self.diffusion = diffusion
        self.image_key = image_key
        self.condition_key = condition_key
        self.condition_mode = condition_mode

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor] | torch.Tensor,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if isinstance(batchdata, Mapping):
            if self.image_key not in batchdata:
                raise KeyError(f"batch has no key {self.image_key!r} (keys: {sorted(batchdata)}); set image_key.")
            images = batchdata[self.image_key]
        else:
            images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images = torch.as_tensor(images).to(device=device, non_blocking=non_blocking)
        if images.ndim != 5:
            raise ValueError(f"images must have shape (B, C, D, H, W), got {tuple(images.shape)}.")
        images = images.float() if not images.is_floating_point() else images
        x0 = self.diffusion.encode(images)
        noise = torch.randn_like(x0)
        timesteps = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
        target = self.diffusion.target(x0, noise, timesteps)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.condition_key is not None:
            if not isinstance(batchdata, Mapping) or self.condition_key not in batchdata:
                raise KeyError(f"batch has no condition key {self.condition_key!r}.")
            cond = torch.as_tensor(batchdata[self.condition_key]).to(device=device, non_blocking=non_blocking)
            if self.condition_mode == "concat":
                cond = self.diffusion.encode(cond.float())
            infer_kwargs.update(condition=cond, mode=self.condition_mode)
        return x0, target, (), infer_kwargs


def _channel_weights(weights: Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    if len(weights) != 8:
        raise ValueError(f"subband_weights needs 8 values (one per subband {SUBBANDS}), got {len(weights)}.")
    if channels % 8:
        raise ValueError(f"wavelet tensors must have 8*C channels, got {channels}.")
    w = torch.as_tensor(list(weights), dtype=like.dtype, device=like.device).repeat_interleave(channels // 8)
    return w.reshape(1, channels, *([1] * (like.ndim - 2)))


def subband_mse(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean squared error of each subband, ``{"LLL": ..., ..., "HHH": ...}`` (for logging)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
    c = pred.shape[1] // 8
    err = (pred.detach().float() - target.detach().float()).pow(2)
    return {name: err[:, k * c : (k + 1) * c].mean().item() for k, name in enumerate(SUBBANDS)}


class WaveletMSELoss(nn.Module):
    """MSE in the wavelet domain, optionally weighted per subband (WDM: plain MSE, all weights 1).

    Args:
        subband_weights: 8 weights in :data:`wdm3d.wavelets.SUBBANDS` order, or None for equal weights.
            The weighted loss is ``sum_k w_k * mse_k / sum_k w_k`` so its scale does not depend on the weights.
    """

    def __init__(self, subband_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if subband_weights is not None:
            subband_weights = [float(w) for w in subband_weights]
            if len(subband_weights) != 8 or any(w < 0 for w in subband_weights) or sum(subband_weights) <= 0:
                raise ValueError(f"subband_weights must be 8 non-negative numbers, not all 0; got {subband_weights}.")
        self.subband_weights = subband_weights

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
        err = (pred.float() - target.float()).pow(2)
        if self.subband_weights is None:
            return err.mean()
        w = _channel_weights(self.subband_weights, pred.shape[1], err)
        return (err * w).mean() * 8 / sum(self.subband_weights)
