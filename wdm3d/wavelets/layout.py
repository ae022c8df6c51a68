"""The coefficient layout every transform here shares: subband order, accepted modes, input checks, odd-size padding
and cropping back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PAD_MODES", "SUBBANDS", "WAVELET_MODES", "subband"]

#: Subband names in channel order; the letters are the filters along (D, H, W).
SUBBANDS: tuple[str, ...] = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")
#: Accepted values of ``pad_mode`` (None: odd sizes are an error).
PAD_MODES: tuple[str | None, ...] = (None, "replicate", "reflect", "constant")
#: Boundary modes for non-Haar wavelets (pytorch_wavelets' names).
WAVELET_MODES: tuple[str, ...] = ("periodization", "zero", "symmetric", "reflect")


def _check_volume(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, D, H, W), got {type(x).__name__}.")
    if x.ndim != 5:
        raise ValueError(f"{name} must have shape (B, C, D, H, W) (5 dimensions), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float().")


def _check_pad_mode(pad_mode: str | None) -> None:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")


def _is_haar(wavelet: str) -> bool:
    if not isinstance(wavelet, str):
        raise TypeError(f"wavelet must be a name such as 'haar' or 'db2', got {type(wavelet).__name__}.")
    return wavelet.lower() in ("haar", "db1")


def _pad_to_even(x: torch.Tensor, pad_mode: str | None) -> torch.Tensor:
    """Pad each odd spatial axis of ``x`` by one voxel at its end, or raise if ``pad_mode`` is None."""
    odd = [s % 2 for s in x.shape[-3:]]
    if not any(odd):
        return x
    if pad_mode is None:
        raise ValueError(
            f"3D DWT needs even spatial sizes, got a tensor of shape {tuple(x.shape)} (odd axes: "
            f"{[ax for ax, o in zip('DHW', odd) if o]}). Crop or pad the volume to even sizes, or pass "
            f"pad_mode='replicate' (or 'reflect'/'constant') and give output_shape to the inverse to crop back."
        )
    d, h, w = odd
    return F.pad(x, (0, w, 0, h, 0, d), mode=pad_mode)


def _crop(x: torch.Tensor, output_shape: Sequence[int] | None) -> torch.Tensor:
    if output_shape is None:
        return x
    shape = tuple(int(s) for s in output_shape)[-3:]
    if len(shape) != 3:
        raise ValueError(f"output_shape must give (D, H, W) (or a full shape ending in them), got {output_shape}.")
    if any(s > have for s, have in zip(shape, x.shape[-3:])):
        raise ValueError(
            f"output_shape {shape} is larger than the reconstructed volume {tuple(x.shape[-3:])}; it must be the "
            "spatial shape of the tensor that was transformed."
        )
    return x[..., : shape[0], : shape[1], : shape[2]]


def subband(y: torch.Tensor, name: str | int) -> torch.Tensor:
    """The channels of one subband of ``y`` (B, 8C, ...), by name (``"LLH"``) or index: ``(B, C, ...)``.

    Args:
        y: subband-major coefficients, ``(B, 8C, ...)``.
        name: a name of :data:`SUBBANDS` (any case) or its index 0..7.
    """
    k = SUBBANDS.index(name.upper()) if isinstance(name, str) else int(name)
    if not 0 <= k < 8:
        raise ValueError(f"subband must be one of {SUBBANDS} or 0..7, got {name!r}.")
    c = y.shape[1] // 8
    return y[:, k * c : (k + 1) * c]
