"""The 2.5D perceptual loss: a frozen 2D feature network (:mod:`wdm3d.losses.feature_net`) on slices along the three
axes of a volume, and the bundles' factory that turns it on or off."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from .feature_net import VGG16_LAYOUT, SliceFeatureNet2D, load_slice_feature_weights

__all__ = ["Perceptual25DLoss", "perceptual_loss"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


class Perceptual25DLoss(nn.Module):
    """2.5D perceptual distance: a frozen 2D feature network on slices along the three axes of a volume.

    For each axis in ``axes`` a random subset of slices (the same for both volumes, ``slice_fraction`` of them, at
    least one) is taken, every image channel as a grey slice (repeated to the network's ``in_channels``), mapped from
    ``input_range`` to [0, 1] and, optionally, ImageNet-normalised. The distance per slice is LPIPS's with equal layer
    weights: at every tap, features are scaled to unit norm over channels, the squared difference is summed over
    channels and averaged over positions; the taps are summed. The result is averaged over slices and over the axes
    (one 2D distance in scale, so the weights of 2D LPIPS carry over).

    Args:
        weights_path: local weights file for the 2D network (see :func:`load_slice_feature_weights`); required.
        layout: the network's layout (:data:`VGG16_LAYOUT` for torchvision VGG16 weights).
        in_channels: the network's input channels.
        slice_fraction: fraction of slices per axis used per call, in (0, 1].
        axes: spatial axes of ``(B, C, D, H, W)`` to slice along, a non-empty subset of (2, 3, 4).
        input_range: intensity range of the volumes, mapped to [0, 1].
        imagenet_normalize: subtract ImageNet's mean and divide by its std (needs ``in_channels`` 3); set False for
            networks trained on other data.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.pt")
        >>> torch.save(SliceFeatureNet2D((8, "M", 8)).state_dict(), path)
        >>> loss = Perceptual25DLoss(path, layout=(8, "M", 8), slice_fraction=1.0)
        >>> x = torch.rand(1, 1, 8, 8, 8)
        >>> float(loss(x, x))
        0.0
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        layout: Sequence[int | str] = VGG16_LAYOUT,
        in_channels: int = 3,
        slice_fraction: float = 0.5,
        axes: Sequence[int] = (2, 3, 4),
        input_range: tuple[float, float] = (-1.0, 1.0),
        imagenet_normalize: bool = True,
    ) -> None:
        super().__init__()
        if weights_path is None:
            raise FileNotFoundError(
                "Perceptual25DLoss needs weights_path, a local weights file; wdm3d never downloads weights."
            )
        if not (isinstance(slice_fraction, (int, float)) and 0 < slice_fraction <= 1):
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction!r}.")
        axes = tuple(axes)
        if not axes or len(set(axes)) != len(axes) or any(a not in (2, 3, 4) for a in axes):
            raise ValueError(f"axes must be distinct spatial axes of (B, C, D, H, W), from (2, 3, 4); got {axes!r}.")
        lo, hi = (float(v) for v in input_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range!r}.")
        if imagenet_normalize and in_channels != 3:
            raise ValueError("imagenet_normalize needs in_channels=3 (ImageNet statistics are per RGB channel).")
        self.net = load_slice_feature_weights(SliceFeatureNet2D(layout, in_channels), weights_path)
        self.net.requires_grad_(False)
        self.net.eval()
        self.weights_path = str(weights_path)
        self.slice_fraction, self.axes, self.input_range = float(slice_fraction), axes, (lo, hi)
        self.imagenet_normalize = bool(imagenet_normalize)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Perceptual25DLoss:
        """Keep the feature network in eval mode whatever the surrounding module does."""
        super().train(mode)
        self.net.eval()
        return self

    def _prepare(self, slices: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        slices = (slices - lo) / (hi - lo)
        slices = slices.expand(-1, self.net.in_channels, -1, -1)
        if self.imagenet_normalize:
            slices = (slices - self.mean.to(slices.dtype)) / self.std.to(slices.dtype)
        return slices

    def _slices(self, x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
        # (B, C, D, H, W) -> (B * C * n, 1, a, b): the chosen slices along `axis`, each channel a grey image
        x = x.index_select(axis, index).movedim(axis, 2)
        return x.reshape(-1, 1, *x.shape[-2:])

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = None
        for fa, fb in zip(self.net(self._prepare(a)), self.net(self._prepare(b))):
            d = (_unit_channels(fa) - _unit_channels(fb)).square().sum(dim=1).mean()
            total = d if total is None else total + d
        return total

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean 2.5D perceptual distance between two volume batches.

        Args:
            input: ``(B, C, D, H, W)``, e.g. the reconstruction (gradients flow to it).
            target: same shape.

        Returns:
            A scalar, 0 for identical inputs.
        """
        if input.ndim != 5 or input.shape != target.shape:
            raise ValueError(
                f"input and target must both be (B, C, D, H, W) of the same shape, got {tuple(input.shape)} and "
                f"{tuple(target.shape)}."
            )
        need = 2**self.net.num_pools
        for axis in self.axes:
            plane = [s for i, s in enumerate(input.shape[2:], start=2) if i != axis]
            if min(plane) < need:
                raise ValueError(
                    f"slices along axis {axis} are {tuple(plane)}; the 2D network pools {self.net.num_pools} times and "
                    f"needs slices of at least {need}x{need}. Use larger volumes, other axes or a shallower layout."
                )
        losses = []
        for axis in self.axes:
            n = input.shape[axis]
            keep = max(1, round(self.slice_fraction * n))
            index = torch.randperm(n)[:keep].to(input.device)
            losses.append(self._distance(self._slices(input, axis, index), self._slices(target, axis, index)))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"weights_path={self.weights_path!r}, slice_fraction={self.slice_fraction}, axes={self.axes}"


def perceptual_loss(
    weights_path: str | os.PathLike | None, weight: float, device: str | torch.device = "cpu"
) -> Perceptual25DLoss | None:
    """The bundles' perceptual term: a :class:`Perceptual25DLoss` from ``weights_path``, or None when it is off.

    Refuses the two settings that silently do something else: a weight > 0 without a weights file (no perceptual
    term would be trained, yet the run would record the weight) and a weights file with weight 0 (the VGG passes
    would run every step and be multiplied by 0).

    Example:
        >>> perceptual_loss(None, 0.0) is None
        True
    """
    if weights_path:
        if not weight > 0:
            raise ValueError(
                f"perceptual_weights={str(weights_path)!r} is set but perceptual_weight={weight!r}: the perceptual loss "
                "would be computed every step and not trained on. Set perceptual_weight > 0 (WF-VAE: 0.1), or drop "
                "perceptual_weights."
            )
        return Perceptual25DLoss(weights_path).to(device)
    if weight > 0:
        raise ValueError(
            f"perceptual_weight={weight!r} needs perceptual_weights, the path of a VGG16 state dict (nothing is "
            "downloaded); without it there is no perceptual term to weigh."
        )
    return None
