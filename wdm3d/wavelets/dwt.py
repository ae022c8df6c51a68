"""One level of the 3D DWT and its inverse (any wavelet), their Haar forms that TorchScript also compiles, and the
multi-level decomposition.

Haar runs through an ``autograd.Function`` (the transform is orthonormal, so the gradient of the DWT is the IDWT of
the incoming gradient and vice versa) by the fused GPU kernel where it applies (:mod:`wdm3d.wavelets.fused`), else by
the in-place torch path (:mod:`wdm3d.wavelets.haar`). Other wavelets run through pytorch_wavelets
(:mod:`wdm3d.wavelets.generic`), whose own modules give the gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import fused
from .generic import _generic_forward, _generic_inverse
from .haar import _haar_forward_kernel, _haar_inverse_kernel, haar_forward, haar_inverse
from .layout import WAVELET_MODES, _check_pad_mode, _check_volume, _crop, _is_haar, _pad_to_even

__all__ = ["WaveletPyramid", "dwt3d", "haar_dwt3d", "haar_idwt3d", "idwt3d", "wavedec3d", "waverec3d"]


def _haar(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The Haar transform of ``x`` by the fused kernel where it applies, else by the torch path."""
    # the kernel indexes in int32: tensors of 2^31 elements or more (e.g. (1, 3, 1024, 1024, 1024)) take the torch path
    if fused.fused_haar_available(x) and x.numel() < 2**31:
        try:
            return fused._fused_haar_launch(x, inverse)
        except Exception as err:  # a Triton build/launch failure: fall back for good, say so once
            fused._fused_haar["failed"] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"The fused Triton Haar kernel failed ({fused._fused_haar['failed'][:300]}); falling back to the torch "
                "implementation for the rest of this process (same results, more memory passes). "
                "Set WDM3D_FUSED_HAAR=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _haar_inverse_kernel(x) if inverse else _haar_forward_kernel(x)


class _HaarDWT(torch.autograd.Function):
    # The transform is orthonormal, so the gradient of the DWT is the IDWT of the incoming gradient and vice versa.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _haar(x, inverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _HaarIDWT.apply(grad)


class _HaarIDWT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _haar(y, inverse=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _HaarDWT.apply(grad)


def dwt3d(
    x: torch.Tensor,
    wavelet: str = "haar",
    mode: str = "periodization",
    pad_mode: str | None = None,
) -> torch.Tensor:
    """One level of the 3D discrete wavelet transform.

    Args:
        x: volume batch, shape ``(B, C, D, H, W)``, any floating dtype and device.
        wavelet: ``"haar"`` (fast path) or any PyWavelets name (``"db2"``, ``"sym4"``, ``"coif1"``...).
        mode: boundary mode for non-Haar wavelets, one of :data:`WAVELET_MODES` (ignored for Haar).
        pad_mode: what to do with odd spatial sizes: None raises, otherwise pad one voxel at the end of each odd
            axis with this ``torch.nn.functional.pad`` mode.

    Returns:
        ``(B, 8C, D/2, H/2, W/2)`` (sizes rounded up after padding; larger for non-periodic modes), subband-major.

    Example:
        >>> dwt3d(torch.randn(2, 1, 16, 16, 16)).shape  # y[:, :1] is LLL
        torch.Size([2, 8, 8, 8, 8])
    """
    _check_volume(x)
    _check_pad_mode(pad_mode)
    x = _pad_to_even(x, pad_mode)
    if _is_haar(wavelet):
        return _HaarDWT.apply(x)
    if mode not in WAVELET_MODES:
        raise ValueError(f"mode must be one of {WAVELET_MODES} for wavelet {wavelet!r}, got {mode!r}.")
    return _generic_forward(x, wavelet, mode)


def idwt3d(
    y: torch.Tensor,
    wavelet: str = "haar",
    mode: str = "periodization",
    output_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`dwt3d`: ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)``, cropped to ``output_shape``.

    Args:
        y: subband-major coefficients as returned by :func:`dwt3d`.
        wavelet: the wavelet used for the forward transform.
        mode: the boundary mode used for the forward transform (non-Haar only).
        output_shape: spatial shape ``(D, H, W)`` of the original volume (needed after padding or with
            non-periodic modes); None keeps the full reconstruction.
    """
    _check_volume(y, "y")
    if y.shape[1] % 8 != 0:
        raise ValueError(
            f"y must have 8*C channels (8 subbands per input channel), got shape {tuple(y.shape)} with "
            f"{y.shape[1]} channels."
        )
    if _is_haar(wavelet):
        x = _HaarIDWT.apply(y)
    else:
        if mode not in WAVELET_MODES:
            raise ValueError(f"mode must be one of {WAVELET_MODES} for wavelet {wavelet!r}, got {mode!r}.")
        x = _generic_inverse(y, wavelet, mode)
    return _crop(x, output_shape)


class WaveletPyramid(NamedTuple):
    """A multi-level decomposition.

    Attributes:
        low: the coarsest low band (LLL of the last level), ``(B, C, D/2^L, H/2^L, W/2^L)``.
        details: the 7 detail subbands of each level, finest first, each ``(B, 7C, ...)`` in :data:`SUBBANDS`
            order without LLL.
        shapes: the spatial shape of the input of each level, finest first (used to crop after padding).
    """

    low: torch.Tensor
    details: list[torch.Tensor]
    shapes: list[tuple[int, int, int]]


def wavedec3d(
    x: torch.Tensor,
    levels: int,
    wavelet: str = "haar",
    mode: str = "periodization",
    pad_mode: str | None = None,
) -> WaveletPyramid:
    """Multi-level 3D DWT: the LLL band is transformed again ``levels`` times.

    Args:
        x: ``(B, C, D, H, W)``.
        levels: number of levels (>= 1). Without ``pad_mode`` every level's size must be even.
        wavelet, mode, pad_mode: as in :func:`dwt3d`.
    """
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}.")
    _check_volume(x)
    c = x.shape[1]
    low, details, shapes = x, [], []
    for _ in range(levels):
        shapes.append(tuple(low.shape[-3:]))
        y = dwt3d(low, wavelet, mode, pad_mode)
        low, detail = y[:, :c], y[:, c:]
        details.append(detail)
    return WaveletPyramid(low, details, shapes)


def waverec3d(pyramid: WaveletPyramid, wavelet: str = "haar", mode: str = "periodization") -> torch.Tensor:
    """Inverse of :func:`wavedec3d`; returns a volume of the shape that was decomposed.

    Args:
        pyramid: what :func:`wavedec3d` returned.
        wavelet, mode: as given to :func:`wavedec3d`.
    """
    low = pyramid.low
    for detail, shape in zip(reversed(pyramid.details), reversed(pyramid.shapes)):
        if detail.shape[-3:] != low.shape[-3:]:
            raise ValueError(
                f"detail bands of shape {tuple(detail.shape)} do not match the low band {tuple(low.shape)}."
            )
        low = idwt3d(torch.cat((low, detail), dim=1), wavelet, mode, output_shape=shape)
    return low


def haar_dwt3d(x: torch.Tensor) -> torch.Tensor:
    """One level of the 3D Haar DWT, ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``, also inside TorchScript.

    Eager: :func:`dwt3d` (its checks, autograd rule and fused GPU kernel). Scripted (``torch.jit.script``, MONAI's
    ``ckpt_export``): :func:`~wdm3d.wavelets.haar.haar_forward` out of place, differentiable, the same bits.

    Args:
        x: volume batch with even spatial sizes.
    """
    if not torch.jit.is_scripting():
        return dwt3d(x)
    return haar_forward(x)


def haar_idwt3d(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt3d`, ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)``: :func:`idwt3d` in eager mode,
    :func:`~wdm3d.wavelets.haar.haar_inverse` out of place when scripted.

    Args:
        y: subband-major Haar coefficients.
    """
    if not torch.jit.is_scripting():
        return idwt3d(y)
    return haar_inverse(y)
