"""One LIDC-IDRI patient: CT preprocessing and the per-patient job the batch runs in worker processes.

Preprocessing (:func:`preprocess_ct`, WDM's LIDC recipe without its data loss; REFERENCE section 1):

1. resample to ``spacing`` mm (1 mm isotropic by default; linear interpolation, the field of view kept: ``n`` voxels
   of ``s`` mm become ``round(n * s / spacing)`` voxels covering the same extent);
2. centre-crop to ``spatial_size`` where larger (256^3 by default); a scan smaller than the target is *padded* with
   air (-1000 HU), never dropped;
3. clip: below -1000 HU to -1000 and the top at the 99.9th percentile of the (cropped, unpadded) scan, as WDM; or a
   fixed ``window=(low, high)`` in HU;
4. map the clip range to [0, 1]: ``(clip(x, low, high) - low) / (high - low)`` (WDM's min-max, as the volume always
   holds air at -1000);
5. average-pool by ``pool`` (2 gives WDM's 128^3 from 256^3).

Geometry: the DICOM affine (LPS) is ``[c * Δc, r * Δr, n * Δs, IPP_first]`` (row direction ``c`` times the column
spacing, column direction ``r`` times the row spacing, slice normal times the slice spacing); the NIfTI affine is
``diag(-1, -1, 1, 1)`` times it (RAS, what NIfTI and 3D Slicer expect), updated by each step like
``data_prep.brats`` does (resampling, cropping/padding, pooling). Array axes stay (column, row, slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .batch import RECORD_NAME, remove_partial, write_case_record
from .common import write_failure, write_nifti
from .lidc_dicom import SeriesError, lps_to_ras, read_ct_series
from .lidc_discovery import LidcCase, rank_series
from .volume import check_pool, check_spatial_size, pad_or_crop, pool_volume, voxel_spacing

__all__ = [
    "IMAGE_KEY",
    "AIR_HU",
    "check_spacing",
    "resample",
    "preprocess_ct",
    "dropped_note",
    "with_dropped",
    "process_case",
]

#: Datalist key of the CT volume.
IMAGE_KEY = "ct"
#: Air in HU: the floor of the clip and the padding value.
AIR_HU = -1000.0


def check_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    """Three positive finite voxel sizes (mm) from one number or three; a ValueError otherwise.

    Args:
        spacing: one number (isotropic) or three.
    """
    values = [spacing] * 3 if isinstance(spacing, (int, float)) else list(spacing)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a positive number or three (mm), got {spacing!r}.") from None
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"spacing must be a positive number or three positive numbers (mm), got {spacing!r}.")
    return out  # type: ignore[return-value]


def resample(
    x: np.ndarray, affine: np.ndarray, spacing: Sequence[float], order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``(X, Y, Z)`` to voxel size ``spacing`` (mm) over the same field of view: ``(X', Y', Z')``.

    ``n`` voxels of size ``s`` cover ``n * s`` mm; the output has ``max(1, round(n * s / t))`` voxels of size ``t``,
    output voxel ``j`` sitting at input voxel coordinate ``(j + 0.5) * t / s - 0.5`` (centres aligned on the field of
    view), so the new affine is ``affine @ [[t/s, 0, 0, (t/s - 1)/2], ...]``. An axis already at ``t`` is copied.

    Args:
        x: volume, float.
        affine: its voxel-to-world matrix (orthogonal columns).
        spacing: target voxel size per axis (mm).
        order: spline order (1: linear).
    """
    old = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(check_spacing(spacing))
    ratio = new / old
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(x.shape, ratio))
    offset = (ratio - 1.0) / 2.0
    if np.allclose(ratio, 1.0, atol=1e-6) and shape == x.shape:
        return x, np.asarray(affine, dtype=np.float64)
    out = ndi.affine_transform(
        x, ratio, offset=offset, output_shape=shape, order=order, mode="nearest", output=np.float32
    )
    step = np.diag([*ratio, 1.0])
    step[:3, 3] = offset
    return out, np.asarray(affine, dtype=np.float64) @ step


def preprocess_ct(
    hu: np.ndarray,
    affine: np.ndarray,
    spacing: float | Sequence[float] = 1.0,
    spatial_size: Sequence[int] = (256, 256, 256),
    window: Sequence[float] | None = None,
    percentile: float = 99.9,
    pool: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample, crop/pad with air, clip HU, scale to [0, 1], pool: WDM's LIDC preprocessing, geometry kept.

    Args:
        hu: ``(X, Y, Z)`` CT in HU.
        affine: its voxel-to-world matrix (RAS for NIfTI output).
        spacing: voxel size in mm after resampling (one number or three); None: no resampling.
        spatial_size: size after centre crop / air padding (before pooling); -1 keeps an axis.
        window: fixed ``(low, high)`` HU clip; None: ``low = -1000`` and ``high`` = the ``percentile`` of the
            cropped scan (padding excluded).
        percentile: top clip percentile when ``window`` is None.
        pool: average-pooling factor.

    Returns:
        ``(float32 array in [0, 1] of shape spatial_size / pool, affine)``.
    """
    x = np.asarray(hu, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"hu must be a 3D array (X, Y, Z), got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the CT volume has {int(x.size - np.isfinite(x).sum())} NaN/inf voxels.")
    size = check_spatial_size(spatial_size)
    f = check_pool(pool)
    if spacing is not None:
        x, affine = resample(x, affine, spacing)
    crop = [n if s == -1 else min(n, s) for n, s in zip(x.shape, size)]
    x, affine = pad_or_crop(x, affine, crop)
    if window is not None:
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"window must be (low, high) HU with low < high, got {window!r}.")
    else:
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}.")
        lo = AIR_HU
        hi = float(np.percentile(np.maximum(x, lo), float(percentile)))
        if not hi > lo:
            raise ValueError(f"the scan holds nothing above {lo:g} HU after clipping (a blank series?).")
    x, affine = pad_or_crop(x, affine, [n if s == -1 else s for n, s in zip(x.shape, size)], value=AIR_HU)
    out = ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return pool_volume(out, affine, f, mode="mean")


def dropped_note(case: LidcCase) -> dict[str, Any]:
    """The record fields listing a case's dropped ``.dcm`` files (empty when there are none).

    Args:
        case: the patient as found by :func:`data_prep.lidc_discovery.find_cases`.
    """
    if not case.dropped:
        return {}
    return {"dropped": [{"file": path, "reason": why} for path, why in case.dropped]}


def with_dropped(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its dropped files also in ``reason``, the column a reader of the CSV report sees (applied to
    the report only: a record's own reason, e.g. ``"up to date"``, is what the run's logic reads).

    Args:
        record: a patient's record (with ``dropped`` from :func:`dropped_note`).
    """
    if not record.get("dropped"):
        return record
    listing = "; ".join(f"{d['file']} ({d['reason']})" for d in record["dropped"])
    note = f"dropped {len(record['dropped'])} DICOM file(s): {listing}"
    return record | {"reason": f"{record['reason']}; {note}" if record.get("reason") else note}


def process_case(case: LidcCase, dst: str, settings: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Prepare one patient; never raises for a bad case: returns a record with status done / failed.

    The record lists the patient's dropped ``.dcm`` files (``dropped``). A failed write (full disk, permissions)
    names the output path and the errno, not the series being read.

    Args:
        case: the patient as found by :func:`data_prep.lidc_discovery.find_cases`.
        dst: the output folder.
        settings: the preparation settings (see :func:`data_prep.lidc.prepare_lidc`).
        fingerprint: input fingerprint of the patient's DICOM files, stored in its record.
    """
    record: dict[str, Any] = {"case": case.case_id, "patient": case.case_id, **dropped_note(case)}
    if case.unreadable:
        path, reason = case.unreadable[0]
        more = f" (and {len(case.unreadable) - 1} more)" if len(case.unreadable) > 1 else ""
        return record | {
            "status": "failed",
            "file": path,
            "reason": f"corrupt DICOM file{more}, its series is unknown: {reason}",
        }
    if not case.series and case.dropped:
        return record | {"status": "failed", "file": case.folder, "reason": "no readable DICOM file"}
    if not case.series:
        return record | {"status": "failed", "file": case.folder, "reason": "empty folder: no DICOM files"}
    candidates, others = rank_series(case, settings["series_rule"])
    if not candidates:
        found = ", ".join(
            f"{s.modality or '?'}{' localizer' if s.localizer else ''} ({len(s.files)} files)" for s in others
        )
        return record | {"status": "failed", "file": case.folder, "reason": f"no CT series (found {found})"}
    rejected: dict[str, str] = {}
    for series in candidates:
        try:
            hu, affine_lps = read_ct_series(
                series.files, settings["spacing_tolerance"], settings["tilt_tolerance"], settings["min_slices"]
            )
            break
        except SeriesError as err:
            rejected[series.uid] = str(err)
    else:
        reasons = "; ".join(f"series {uid}: {why}" for uid, why in rejected.items())
        return record | {"status": "failed", "file": str(candidates[0].files[0].parent), "reason": reasons}
    source_spacing = voxel_spacing(affine_lps)
    out_dir = Path(dst) / case.case_id
    path = out_dir / f"{case.case_id}-{IMAGE_KEY}.nii.gz"
    writing: Path | None = None  # the output being written: an OSError while it is set is the destination's fault
    try:
        out, out_affine = preprocess_ct(
            hu,
            lps_to_ras(affine_lps),
            settings["spacing"],
            settings["spatial_size"],
            settings["window"],
            settings["percentile"],
            settings["pool"],
        )
        del hu
        writing = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        writing = out_dir / RECORD_NAME
        writing.unlink(missing_ok=True)
        writing = path
        write_nifti(out, out_affine, path)
        writing = None
        result = {
            "status": "done",
            "reason": "; ".join(f"rejected series {uid}: {why}" for uid, why in rejected.items()),
            "outputs": {IMAGE_KEY: f"{case.case_id}/{path.name}"},
            "shape": list(out.shape),
            "spacing": voxel_spacing(out_affine),
            "series": series.uid,
            "num_slices": len(series.files),
            "source_spacing": source_spacing,
        }
        writing = out_dir / RECORD_NAME
        write_case_record(out_dir, record | result | {"fingerprint": fingerprint, "settings": settings})
    except Exception as err:  # noqa: BLE001 - report, remove partial output, go on
        remove_partial(out_dir, [path])
        if writing is not None and isinstance(err, OSError):
            return write_failure(record, writing, err)
        return record | {
            "status": "failed",
            "file": str(series.files[0].parent),
            "reason": f"{type(err).__name__}: {err}",
        }
    return record | result
