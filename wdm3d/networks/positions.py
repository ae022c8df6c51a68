"""Fixed sinusoidal positions of a 3D grid: by voxel index, for the token sequences of
:class:`~wdm3d.networks.DiT3D` and the IP-Adapter's :class:`~wdm3d.networks.PerceiverResampler`; and by position in
the volume (voxel centres in [0, 1]), which agree between grids of different sizes, for matching an image prompt's
feature grid with a U-Net level."""

from __future__ import annotations

import torch

from .scripting import shape_repr

__all__ = ["PLACE_DIM", "place_features", "sincos_position_3d", "volume_position_3d"]


def sincos_position_3d(
    size: list[int], dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed sinusoidal positions of a ``(d, h, w)`` grid (Vaswani et al. 2017, sec. 3.5, one third per axis).

    Returns ``(d*h*w, dim)`` (row-major voxel order): per axis ``dim // 6`` frequencies ``10000^(-k/n)``, sine and
    cosine of the voxel index; zero-padded to ``dim``. ``size`` may be any sequence of three ints and ``device`` a
    string outside TorchScript (which compiles this for :class:`~wdm3d.networks.DiT3D`).
    """
    if len(size) != 3 or dim < 1:
        raise ValueError(f"size must be (d, h, w) and dim >= 1, got {shape_repr(size)}, {dim}.")
    n = dim // 6
    grids = torch.meshgrid([torch.arange(s, device=device, dtype=torch.float64) for s in size], indexing="ij")
    parts: list[torch.Tensor] = []
    if n > 0:
        freqs = 10000.0 ** (-torch.arange(n, device=device, dtype=torch.float64) / n)
        for g in grids:
            angle = g.reshape(-1, 1) * freqs
            parts.append(angle.sin())
            parts.append(angle.cos())
    if len(parts) > 0:
        pos = torch.cat(parts, 1)
    else:
        pos = torch.zeros(size[0] * size[1] * size[2], 0, device=device, dtype=torch.float64)
    pos = torch.nn.functional.pad(pos, [0, dim - pos.shape[1]])
    return pos.to(dtype)


def volume_position_3d(
    size: list[int] | tuple[int, ...],
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed Fourier features of where each voxel of a ``(d, h, w)`` grid sits in the volume: ``(d*h*w, dim)``.

    Per axis, the voxel centre ``p = (i + 0.5) / n`` in [0, 1] and ``dim // 6`` frequencies ``pi 2^k``: sine and
    cosine of ``pi 2^k p``; zero-padded to ``dim``. Grids of any size share the coordinates, and the dot product of
    two voxels' features is ``sum_k cos(pi 2^k (p - p'))`` per axis, largest where they coincide: attention between a
    U-Net level and a coarser image-feature grid can find the same place.

    Args:
        size: ``(d, h, w)``.
        dim: feature width.
        device, dtype: of the result.
    """
    if len(size) != 3 or dim < 1 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (d, h, w) of positive sizes and dim >= 1, got {tuple(size)}, {dim}.")
    n = dim // 6
    axes = [(torch.arange(int(s), device=device, dtype=torch.float64) + 0.5) / int(s) for s in size]
    grids = torch.meshgrid(axes, indexing="ij")
    parts = []
    if n > 0:
        freqs = torch.pi * 2.0 ** torch.arange(n, device=device, dtype=torch.float64)
        for g in grids:
            angle = g.reshape(-1, 1) * freqs
            parts += [angle.sin(), angle.cos()]
    pos = (
        torch.cat(parts, 1) if parts else torch.zeros(len(grids[0].reshape(-1)), 0, device=device, dtype=torch.float64)
    )
    return torch.nn.functional.pad(pos, [0, dim - pos.shape[1]]).to(dtype)


#: width of :func:`place_features` (5 octaves per axis: the finest resolves 1/32 of the volume)
PLACE_DIM = 30


def place_features(
    size: list[int] | tuple[int, ...], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """:func:`volume_position_3d` of a ``(d, h, w)`` grid at width :data:`PLACE_DIM`, scaled to unit length:
    ``(d*h*w, PLACE_DIM)``. The dot product of two voxels' features is 1 where they coincide and less elsewhere, on
    grids of any size (a fine voxel's largest product is with the coarse cell it lies in): a place bias for attention
    between a U-Net level and an image feature grid."""
    return volume_position_3d(size, PLACE_DIM, device, torch.float32).mul_((PLACE_DIM / 2) ** -0.5).to(dtype)
