"""PNG previews of volumes: axial / coronal / sagittal mid-slices side by side."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from .nifti import atomic_write_bytes

__all__ = ["mid_slices", "montage", "save_montage"]


def _to_numpy(volume) -> np.ndarray:
    arr = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume, float)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"a volume must be (D, H, W) or (1, D, H, W), got shape {arr.shape}.")
    return arr


def mid_slices(volume, affine=None) -> list[np.ndarray]:
    """The axial, coronal and sagittal mid-slices of a volume, oriented for display.

    With an ``affine`` the volume is first brought to the closest RAS orientation (nibabel), so that axial shows
    anterior at the top and the patient's right on the image's right (neurological convention) whatever the voxel
    order on disk; without one the voxel axes are taken as (R, A, S).

    Args:
        volume: ``(D, H, W)`` array or tensor.
        affine: optional 4x4 voxel-to-world matrix.

    Returns:
        ``[axial, coronal, sagittal]`` 2D arrays.
    """
    arr = _to_numpy(volume)
    if affine is not None:
        aff = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
        ornt = nib.orientations.io_orientation(aff)
        arr = nib.orientations.apply_orientation(arr, ornt)
    x, y, z = (s // 2 for s in arr.shape)
    # np.rot90 puts the second axis (A or S) pointing up
    return [np.rot90(arr[:, :, z]), np.rot90(arr[:, y, :]), np.rot90(arr[x, :, :])]


def montage(
    volumes: Sequence | torch.Tensor,
    affine=None,
    value_range: Sequence[float] | None = None,
    zoom: int = 1,
) -> np.ndarray:
    """One uint8 image: a row of (axial, coronal, sagittal) mid-slices per volume.

    Args:
        volumes: a sequence of ``(D, H, W)`` volumes, or a tensor ``(B, 1, D, H, W)`` / ``(B, D, H, W)``.
        affine: voxel-to-world matrix shared by the volumes (see :func:`mid_slices`).
        value_range: intensities mapped to black and white (default: the min and max over all volumes).
        zoom: integer upscaling (nearest), for small volumes.
    """
    if isinstance(volumes, torch.Tensor) and volumes.ndim == 5:
        volumes = list(volumes[:, 0])
    rows = [mid_slices(v, affine) for v in volumes]
    if not rows:
        raise ValueError("montage needs at least one volume.")
    if value_range is None:
        lo = min(float(s.min()) for r in rows for s in r)
        hi = max(float(s.max()) for r in rows for s in r)
    else:
        lo, hi = (float(v) for v in value_range)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    height = max(s.shape[0] for r in rows for s in r)
    tiles = []
    for r in rows:
        padded = [np.pad(s, ((0, height - s.shape[0]), (0, 1)), constant_values=lo) for s in r]
        tiles.append(np.concatenate(padded, axis=1))
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 1), (0, width - t.shape[1])), constant_values=lo) for t in tiles], axis=0)
    img = np.clip((grid - lo) * scale, 0, 255).astype(np.uint8)
    if zoom > 1:
        img = img.repeat(zoom, 0).repeat(zoom, 1)
    return img


def save_montage(path: str | os.PathLike, volumes, affine=None, value_range=None, zoom: int | None = None) -> Path:
    """Write :func:`montage` as a PNG, atomically. ``zoom`` defaults to enough to make slices ~128 px tall."""
    if zoom is None:
        first = volumes[0] if not isinstance(volumes, torch.Tensor) else volumes.reshape(-1, *volumes.shape[-3:])[0]
        zoom = max(1, 128 // max(1, min(_to_numpy(first).shape)))
    buf = io.BytesIO()
    Image.fromarray(montage(volumes, affine, value_range, zoom)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
