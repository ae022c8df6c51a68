"""NIfTI writing that keeps geometry, done atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

__all__ = ["save_nifti", "nifti_geometry", "atomic_write_bytes", "atomic_write_text"]


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    return _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _matrix(m: np.ndarray | torch.Tensor, name: str, path: str | os.PathLike) -> np.ndarray:
    m = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
    m = m.astype(np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all() or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"{name} must be a finite, invertible 4x4 matrix, got {m.tolist()} for {path}.")
    return m


def nifti_geometry(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """The header geometry of a loaded image: ``(affine, (qform_code, sform_code), qform)``, so that an output written
    with :func:`save_nifti` (``codes``, ``qform``) keeps it. ``affine`` is nibabel's (the sform when its code is set,
    else the qform); the qform may differ from it. Non-NIfTI images give codes ``(0, 0)`` and their affine."""
    affine = np.asarray(img.affine, dtype=np.float64)
    if not isinstance(img.header, nib.Nifti1Header):
        return affine, (0, 0), affine
    hdr = img.header
    return affine, (int(hdr["qform_code"]), int(hdr["sform_code"])), np.asarray(img.get_qform(), dtype=np.float64)


def save_nifti(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.float32,
    description: str | None = None,
    codes: tuple[int, int] = (1, 1),
    qform: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write a 3D volume as NIfTI with the given voxel-to-world (RAS) affine, atomically.

    Args:
        volume: ``(D, H, W)`` array (voxel axes in the order the affine describes) or ``(C, D, H, W)`` (several
            channels, e.g. a latent, are written as a 4D image with the channels last).
        affine: 4x4 voxel-to-world matrix, e.g. the MetaTensor affine of the training data.
        path: output file (``.nii`` or ``.nii.gz``).
        dtype: on-disk data type.
        description: goes into the header's ``descrip`` field (80 bytes max), e.g. "synthetic (wdm3d)".
        codes: ``(qform_code, sform_code)``, e.g. the source's to keep them. A code of 0 (unset) is kept when the
            other one is set; when both are <= 0 both become 1, so that the geometry is always stored.
        qform: the qform's own matrix when it differs from ``affine`` (the sform), e.g. copied with the codes from a
            source file whose qform and sform disagree; None: the qform is ``affine`` too.

    Both the sform and the qform are set (code 1, scanner, by default) and units are mm, which is what 3D Slicer reads.
    """
    arr = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 4:  # (C, D, H, W): channels on the 4th NIfTI axis, which MONAI's loader reads as channels
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim not in (3, 4):
        raise ValueError(f"volume must be (D, H, W) or (C, D, H, W), got shape {arr.shape} for {path}.")
    aff = _matrix(affine, "affine", path)
    qaff = aff if qform is None else _matrix(qform, "qform", path)
    img = nib.Nifti1Image(arr.astype(dtype), aff)
    qcode, scode = (max(int(c), 0) for c in codes)
    if qcode == scode == 0:
        qcode = scode = 1
    img.set_sform(aff, code=scode)
    img.set_qform(qaff, code=qcode)
    img.header.set_xyzt_units("mm", "sec")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI output path must end in .nii or .nii.gz, got {path}.")
    return _atomic(path, lambda tmp: nib.save(img, tmp))
