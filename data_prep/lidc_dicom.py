"""Reading DICOM files: the preamble check, the header tags discovery needs, and one CT series into HU.

Reading and checks (:func:`read_ct_series`), a series failing any of them is rejected, never half-read:

- every file decodes, with ``Rows``/``Columns``/``PixelSpacing``/``ImageOrientationPatient`` identical over the series
  (``mixed slice sizes`` otherwise) and a complete pixel buffer (a truncated file is named);
- HU = stored value * ``RescaleSlope`` + ``RescaleIntercept`` per slice; any NaN/inf is an error;
- slices are sorted by their position along the slice normal ``n = row x column direction`` (``n . IPP``), not by
  file name or InstanceNumber; two slices at one position are an error (``duplicate slice positions``);
- steps between sorted positions must equal their median within ``spacing_tolerance`` (relative); a step that is a
  multiple of the median is reported as ``missing slice(s)``, any other deviation as ``uneven slice spacing``;
- the line through the slice positions must run along ``n`` within ``tilt_tolerance`` degrees (``gantry tilt``:
  slices sheared against their own plane, which an orthogonal affine cannot describe).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from .common import os_error_text

__all__ = ["SeriesError", "not_dicom", "read_header", "hu_from_dataset", "read_ct_series", "lps_to_ras"]

_HEADER_TAGS = [
    "PatientID",
    "SeriesInstanceUID",
    "Modality",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "Rows",
    "Columns",
]


class SeriesError(ValueError):
    """A DICOM series that cannot be read into one regular volume; the message says why and names the file."""


def not_dicom(path: str) -> str | None:
    """None for a file with the DICOM preamble (``DICM`` at byte 128), else why it is not one.

    Args:
        path: the file to check (only its first 132 bytes are read).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        return f"cannot be read: {os_error_text(err)}"
    if not head:
        return "empty file (0 bytes)"
    if len(head) < 132:
        return f"{len(head)} bytes, too short for a DICOM file"
    if head[128:132] != b"DICM":
        return "no DICOM preamble ('DICM' at byte 128)"
    return None


def read_header(path: str) -> dict[str, Any]:
    """The tags discovery needs, or ``{"error": reason}``; runs in worker processes.

    Args:
        path: a file with the DICOM preamble (see :func:`not_dicom`); its pixel data is not read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            return {"error": "no SeriesInstanceUID in the header"}
        ipp = ds.get("ImagePositionPatient")
        iop = ds.get("ImageOrientationPatient")
        return {
            "patient": str(ds.get("PatientID", "") or ""),
            "series": uid,
            "modality": str(ds.get("Modality", "") or "").upper(),
            "localizer": "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])],
            "ipp": [float(v) for v in ipp] if ipp is not None and len(ipp) == 3 else None,
            "iop": [float(v) for v in iop] if iop is not None and len(iop) == 6 else None,
        }
    except Exception as err:  # noqa: BLE001 - any parse error is reported per file
        return {"error": f"{type(err).__name__}: {err}"}


def hu_from_dataset(ds: Any) -> np.ndarray:
    """Hounsfield units of one CT slice: ``pixel_array * RescaleSlope + RescaleIntercept``, ``(rows, columns)`` float32.

    Args:
        ds: a ``pydicom.Dataset`` with pixel data (slope 1 and intercept 0 when the tags are absent).

    Raises:
        SeriesError: the pixel buffer is shorter than ``Rows * Columns`` samples, or a value is NaN/inf.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    need = rows * cols * int(ds.get("BitsAllocated", 16)) // 8
    raw = ds.get("PixelData")
    if raw is None:
        raise SeriesError("no pixel data")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if (syntax is None or not syntax.is_compressed) and len(raw) < need:
        raise SeriesError(f"pixel data is {len(raw)} bytes, {rows}x{cols} needs {need}: the file is truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope = 1.0 if slope is None or slope == "" else float(slope)
        intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    hu = ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.all(np.isfinite(hu)):
        raise SeriesError(
            f"{int(np.size(hu) - np.isfinite(hu).sum())} NaN/inf voxels (RescaleSlope {slope}, RescaleIntercept "
            f"{intercept})"
        )
    return hu


def read_ct_series(
    files: Sequence[str | os.PathLike],
    spacing_tolerance: float = 0.02,
    tilt_tolerance: float = 0.5,
    min_slices: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CT series into HU with its LPS affine, after checking it is one regular volume.

    Args:
        files: the files of the series, any order.
        spacing_tolerance: allowed relative deviation of a slice step from the median step.
        tilt_tolerance: allowed angle (degrees) between the slice normal and the line through the slice positions.
        min_slices: fewer slices than this is an error (scouts, partial series).

    Returns:
        ``(hu, affine_lps)``: float32 ``(columns, rows, slices)`` with slices in increasing position along the normal,
        and the 4x4 voxel-to-LPS matrix.

    Raises:
        SeriesError: with what is wrong and the file it is in.
    """
    if len(files) < max(2, int(min_slices)):
        raise SeriesError(f"{len(files)} slice(s), fewer than min_slices={max(2, int(min_slices))}")
    slices = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(f))
            missing = [
                t
                for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
                if t not in ds
            ]
            if missing:
                raise SeriesError(f"missing tag(s) {missing}")
            slices.append((Path(f), ds))
        except Exception as err:  # noqa: BLE001 - name the file
            raise SeriesError(f"{f}: unreadable: {type(err).__name__}: {err}") from None
    sizes: dict[tuple[int, int], int] = {}
    for _, ds in slices:
        sizes[(int(ds.Rows), int(ds.Columns))] = sizes.get((int(ds.Rows), int(ds.Columns)), 0) + 1
    if len(sizes) > 1:
        listing = ", ".join(f"{r}x{c}: {n} slice(s)" for (r, c), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        odd = [str(p) for p, ds in slices if (int(ds.Rows), int(ds.Columns)) != max(sizes, key=sizes.get)]
        raise SeriesError(f"mixed slice sizes (rows x columns {listing}), e.g. {odd[0]}")
    iop0 = np.asarray([float(v) for v in slices[0][1].ImageOrientationPatient])
    ps0 = np.asarray([float(v) for v in slices[0][1].PixelSpacing])
    for p, ds in slices[1:]:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop0, atol=1e-4):
            raise SeriesError(f"mixed ImageOrientationPatient: {p}")
        if not np.allclose([float(v) for v in ds.PixelSpacing], ps0, rtol=1e-4):
            raise SeriesError(f"mixed PixelSpacing: {p}")
    row_dir, col_dir = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1) > 1e-3
        or abs(row_dir @ col_dir) > 1e-3
    ):
        raise SeriesError(f"ImageOrientationPatient {iop0.tolist()} is not two orthonormal directions")
    normal = np.cross(row_dir, col_dir)
    ipps = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    proj = ipps @ normal
    order = np.argsort(proj, kind="stable")
    proj, ipps = proj[order], ipps[order]
    slices = [slices[i] for i in order]
    steps = np.diff(proj)
    if np.any(steps < 1e-3):
        k = int(np.argmax(steps < 1e-3))
        raise SeriesError(f"duplicate slice positions at {proj[k]:.3f} mm: {slices[k][0]} and {slices[k + 1][0]}")
    step = float(np.median(steps))
    bad = np.abs(steps - step) > spacing_tolerance * step
    if np.any(bad):
        k = int(np.argmax(np.abs(steps - step)))
        ratio = steps[k] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1 and np.count_nonzero(bad) <= max(1, len(steps) // 10):
            raise SeriesError(
                f"missing slice(s): a gap of {steps[k]:.3f} mm ({round(ratio) - 1} slice(s) of {step:.3f} mm) after "
                f"position {proj[k]:.3f} mm ({slices[k][0]})"
            )
        raise SeriesError(
            f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm (median {step:.3f} mm, "
            f"tolerance {100 * spacing_tolerance:g}%)"
        )
    span = ipps[-1] - ipps[0]
    along = float(span @ normal)
    angle = float(np.degrees(np.arctan2(np.linalg.norm(span - along * normal), along)))
    if angle > tilt_tolerance:
        raise SeriesError(
            f"gantry tilt: slice positions run {angle:.2f} degrees off the slice normal "
            f"(tolerance {tilt_tolerance:g}); resample the series to an orthogonal grid first"
        )
    hu = np.empty((int(slices[0][1].Columns), int(slices[0][1].Rows), len(slices)), dtype=np.float32)
    for k, (p, ds) in enumerate(slices):
        try:
            hu[:, :, k] = hu_from_dataset(ds).T
        except SeriesError as err:
            raise SeriesError(f"{p}: {err}") from None
        except Exception as err:  # noqa: BLE001 - decoding errors name the file
            raise SeriesError(f"{p}: pixel data unreadable: {type(err).__name__}: {err}") from None
    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]  # along a row: increasing column index, column spacing
    affine[:3, 1] = col_dir * ps0[0]  # down a column: increasing row index, row spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = ipps[0]
    return hu, affine


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """DICOM patient coordinates (LPS) to NIfTI world coordinates (RAS): ``diag(-1, -1, 1, 1) @ affine``.

    Args:
        affine: a 4x4 voxel-to-LPS matrix.
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
