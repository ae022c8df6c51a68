"""The reference volume's voxel grid, and putting a model-grid volume back on it exactly (the inverse of the
loading chain's centre pad/crop)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop

from ..io import nifti_geometry

__all__ = ["ReferenceGrid", "axis_positions", "reference_grid", "restore_grid"]


class ReferenceGrid(NamedTuple):
    """The voxel grid and orientation header of a reference NIfTI file (see :func:`reference_grid`)."""

    affine: np.ndarray  # 4x4, what nibabel uses (the sform when its code is set, else the qform)
    shape: tuple[int, int, int]
    codes: tuple[int, int]  # (qform_code, sform_code)
    qform: np.ndarray  # 4x4, the qform's own matrix (may differ from the sform)


def reference_grid(path: str | os.PathLike) -> ReferenceGrid:
    """The voxel grid of a NIfTI file: ``(affine, (D, H, W), (qform_code, sform_code), qform)``, so that an output
    written with it (:func:`wdm3d.io.save_nifti` with ``codes`` and ``qform``) carries the same header geometry.

    Args:
        path: the reference NIfTI file (3D).
    """
    try:
        img = nib.load(str(path))
    except Exception as err:
        raise RuntimeError(f"Could not read the reference volume {path}: {type(err).__name__}: {err}") from err
    if len(img.shape) < 3 or any(int(s) != 1 for s in img.shape[3:]):
        raise ValueError(f"The reference volume {path} must be 3D, got shape {img.shape}.")
    affine, codes, qform = nifti_geometry(img)
    return ReferenceGrid(affine, tuple(int(s) for s in img.shape[:3]), codes, qform)


def axis_positions(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loading chain's centre pad/crop (``ResizeWithPadOrCrop``, size ``n`` -> ``m`` along one axis) puts
    the original voxels: ``(positions in the model grid, their positions in the original grid)``.

    Read off the transform itself (applied to an index ramp) rather than restated: its pad puts the odd voxel after
    the volume and its crop drops it before, so applying the same transform backwards is off by one voxel for odd
    differences.
    """
    ramp = torch.arange(1, n + 1, dtype=torch.float32)[None]  # (channel, one spatial axis); 0 marks padding
    landed = torch.as_tensor(ResizeWithPadOrCrop(spatial_size=[m], mode="constant", constant_values=0)(ramp))[0]
    model_pos = torch.nonzero(landed > 0)[:, 0]
    return model_pos, landed[model_pos].round().long() - 1


def restore_grid(volume: torch.Tensor, shape: Sequence[int], fill: float) -> torch.Tensor:
    """Undo the centre pad/crop of the loading chain exactly: ``(C, D', H', W') -> (C, *shape)``; every voxel that
    came from the reference grid goes back to its place, voxels cropped away by the chain are ``fill``.

    Args:
        volume: ``(C, D', H', W')`` on the model grid.
        shape: the reference grid's ``(D, H, W)``.
        fill: the value of voxels the chain cropped away (the intensity range's low end).
    """
    volume = torch.as_tensor(volume)
    maps = [axis_positions(int(n), int(m)) for n, m in zip(shape, volume.shape[1:])]
    out = volume.new_full((volume.shape[0], *(int(n) for n in shape)), float(fill))
    (m0, o0), (m1, o1), (m2, o2) = maps
    out[:, o0[:, None, None], o1[None, :, None], o2[None, None, :]] = volume[
        :, m0[:, None, None], m1[None, :, None], m2[None, None, :]
    ]
    return out
