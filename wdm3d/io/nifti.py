"""NIfTI writing that keeps geometry, done atomically, with the file mode a plain ``open`` would give."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

__all__ = ["save_nifti", "nifti_geometry", "atomic_write", "atomic_write_bytes", "atomic_write_text", "new_file_mode"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read at each call (a job script or a library may change it after import).

    Linux reports it in ``/proc/self/status`` (kernel >= 4.7), which reads it without changing it. Elsewhere it is
    set and restored, under a lock against this module's own threads; a file that another thread creates in that
    instant gets the temporary mask, 0o077, so the race can only make a file less readable, never more.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode(directory: bool = False) -> int:
    """The permission bits a new file (``0o666 & ~umask``) or folder (``0o777 & ~umask``) gets from ``open`` or
    ``mkdir``: what outputs written through a temporary file or folder (created 0600 / 0700) are given instead."""
    return (0o777 if directory else 0o666) & ~_umask()


def _os_error(err: BaseException) -> OSError | None:
    """The OSError (with an errno) behind a failed write: ``err`` itself, or, for a ``RuntimeError``, the one it was
    raised from or while handling (``torch.save`` reports a failing file object's write as its own RuntimeError)."""
    if isinstance(err, OSError):
        return err if err.errno else None
    seen: set[int] = set()
    cause = (err.__cause__ or err.__context__) if type(err) is RuntimeError else None
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through a temporary file in the same folder and a rename, so that it is whole or absent.

    Args:
        path: the file to write (its folder is created).
        write: called with the temporary file's path; writes the content there.

    The file gets the mode a new file gets under the current umask (``mkstemp`` alone would leave 0600, unreadable
    by the rest of a group), is fsync'ed before the rename, and on any error the temporary file is removed and the
    error raised, leaving an earlier ``path`` as it was.

    Raises:
        OSError: the write failed (e.g. ENOSPC, a full disk): the errno is kept, the message names ``path`` (not the
            temporary file) and the errno. Other errors of ``write`` are raised as they are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, new_file_mode())
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as err:
        cause = _os_error(err)
        if cause is None:
            raise
        name = errno.errorcode.get(cause.errno)
        text = os.strerror(cause.errno) + (f" ({name})" if name else "")
        raise OSError(
            cause.errno, f"Could not write {path}: {text}. Nothing was written there and no temporary file is left."
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


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
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
