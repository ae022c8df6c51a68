"""LIDC-IDRI preparation: raw DICOM downloads in, preprocessed CT NIfTI volumes and a MONAI datalist out.

    python -m data_prep.lidc --src RAW --dst OUT [--spacing 1] [--spatial-size 256 256 256] [--pool 2] ...

Discovery (:func:`find_cases`): every file below ``--src`` (any depth, hidden files ignored) that carries the DICOM
preamble (``DICM`` at byte 128) has its header read (``stop_before_pixels``); other files (LIDC's XML annotations,
licences) are ignored; a file named ``*.dcm`` without it (empty, cut short, a symlink to itself) is *dropped*: listed
with its reason in the patient's report entry (``dropped``, and in ``reason``) and logged as a warning. Files are
grouped into series by ``SeriesInstanceUID`` and into patients by ``PatientID``.
A file with the DICOM preamble whose header cannot be parsed fails its patient: it cannot be known which series it
belonged to, so nothing of that patient is half-read. A folder named like a patient (``LIDC-IDRI-0001``) without any
DICOM file is reported as a failed case.

Series choice, per patient: only ``Modality`` CT series that are not localizers are candidates (a patient with none
fails, naming what was found instead, e.g. ``CR``/``DX``/``MR``). They are ranked by ``series_rule``
(:data:`SERIES_RULES`): ``most_slices`` (default; ties: thinnest slices, then the series UID) or ``thinnest``
(smallest slice spacing; ties: most slices). The first candidate that passes every check below is used; candidates
rejected on the way are listed in the report with their reason.

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

Outputs, the report, re-runs and the split work as in ``data_prep.brats``: ``OUT/<case>/<case>-ct.nii.gz`` (float32 in
[0, 1], written atomically), ``OUT/<case>/prepare_record.json`` (input fingerprint over all the patient's DICOM files,
settings, chosen series), ``OUT/prepare_summary.json`` and ``OUT/prepare_report.csv`` (every case done / skipped (why)
/ failed (why)), and a seeded patient-level split in ``OUT/datalist.json``::

    {"name": "LIDC-IDRI (prepared by data_prep.lidc)", "modality": "CT", "image_key": "ct",
     "spatial_size": [128, 128, 128], "spacing": [2.0, 2.0, 2.0], "intensity_range": [0.0, 1.0],
     "hu_clip": {"low": -1000.0, "high": "percentile 99.9"}, "series_rule": "most_slices", "pool": 2, ...,
     "numTraining": 8, "numValidation": 1, "numTest": 1,
     "training": [{"case": "LIDC-IDRI-0001", "patient": "LIDC-IDRI-0001",
                   "ct": "LIDC-IDRI-0001/LIDC-IDRI-0001-ct.nii.gz"}, ...], "validation": [...], "test": [...]}

The sources are only read. The exit status is 1 when any case failed (the others are still prepared), 2 when the
output cannot be written (checked before any header is read) or the disk fills up (the batch stops), as in
``data_prep.brats``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .brats import (
    add_batch_arguments,
    RECORD_NAME,
    REPORT_COLUMNS,
    REPORT_CSV_NAME,
    SPLIT_KEYS,
    SUMMARY_NAME,
    UP_TO_DATE,
    _check_pool,
    _check_spatial_size,
    _check_split,
    _is_within,
    _remove_partial,
    _same_or_none,
    _spacing,
    _stopped_by_full_disk,
    _write_json,
    _write_nifti,
    input_fingerprint,
    pad_or_crop,
    pool_volume,
    read_case_record,
    run_cases,
    split_patients,
    write_case_record,
    write_report,
)
from .common import (
    OutputError,
    check_output_dir,
    make_output_dir,
    not_started,
    os_error_text,
    stops_batch,
    write_failure,
    writing_output,
)

__all__ = [
    "IMAGE_KEY",
    "SERIES_RULES",
    "AIR_HU",
    "SeriesError",
    "DicomSeries",
    "LidcCase",
    "find_cases",
    "hu_from_dataset",
    "read_ct_series",
    "lps_to_ras",
    "resample",
    "preprocess_ct",
    "prepare_lidc",
    "main",
]

logger = logging.getLogger(__name__)

#: Datalist key of the CT volume.
IMAGE_KEY = "ct"
#: Air in HU: the floor of the clip and the padding value.
AIR_HU = -1000.0
#: Series-choice rules: name -> what it prefers.
SERIES_RULES: dict[str, str] = {
    "most_slices": "the CT series with the most slices (ties: thinnest slice spacing, then series UID)",
    "thinnest": "the CT series with the smallest slice spacing (ties: most slices, then series UID)",
}
_PATIENT_DIR = re.compile(r"^LIDC-[A-Za-z]+-\d+$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one path component, no "..", no separators


def _case_id(patient_id: str | None, folder: Path) -> str:
    """The case id (output folder and file names): the DICOM PatientID when it is a safe file name, else the
    patient's folder name. A PatientID is free text: "../x" or "a/b" would write outside the output folder."""
    if patient_id and _SAFE_ID.match(patient_id) and ".." not in patient_id:
        return patient_id
    if patient_id:
        logger.warning("PatientID %r under %s is not a safe file name; the case is named after its folder %r.",
                       patient_id, folder, folder.name)
    return folder.name
_HEADER_TAGS = ["PatientID", "SeriesInstanceUID", "Modality", "ImageType", "ImagePositionPatient",
                "ImageOrientationPatient", "SliceThickness", "Rows", "Columns"]


class SeriesError(ValueError):
    """A DICOM series that cannot be read into one regular volume; the message says why and names the file."""


@dataclass
class DicomSeries:
    """One DICOM series as found from headers.

    Attributes:
        uid: SeriesInstanceUID.
        modality: its Modality (``CT``, ``MR``, ``CR``...).
        files: the files of the series (file-name order; reading sorts by position).
        localizer: ``ImageType`` says LOCALIZER (scout images are never candidates).
        slice_spacing: median spacing of the header positions along the slice normal (mm), inf if unknown.
    """

    uid: str
    modality: str
    files: list[Path] = field(default_factory=list)
    localizer: bool = False
    slice_spacing: float = float("inf")


@dataclass
class LidcCase:
    """One patient: its series, unreadable files, and the folders it was found in.

    Attributes:
        case_id: PatientID (or the patient folder's name for an empty folder / unreadable files).
        series: SeriesInstanceUID -> :class:`DicomSeries`.
        unreadable: ``[(path, reason)]`` of files with a DICOM preamble whose header could not be parsed.
        folder: the patient folder (for the report).
        dropped: ``[(path, reason)]`` of files named ``*.dcm`` that are not DICOM files (empty, too short, no
            preamble, cannot be opened: a dangling or looping symlink); listed in the report, not read.
    """

    case_id: str
    series: dict[str, DicomSeries] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    folder: str = ""
    dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        """Every DICOM file of the patient (readable or not): the input of its fingerprint."""
        return sorted([f for s in self.series.values() for f in s.files] + [Path(p) for p, _ in self.unreadable])


# --------------------------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------------------------


def _not_dicom(path: str) -> str | None:
    """None for a file with the DICOM preamble (``DICM`` at byte 128), else why it is not one."""
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


def _read_header(path: str) -> dict[str, Any]:
    """The tags discovery needs, or ``{"error": reason}``; runs in worker processes."""
    import pydicom

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


def _patient_folder(path: Path, root: Path) -> Path:
    """The nearest ancestor named like a patient (``LIDC-IDRI-0001``), else the first folder below ``root``."""
    for parent in path.parents:
        if parent == root:
            break
        if _PATIENT_DIR.match(parent.name):
            return parent
    rel = path.relative_to(root)
    return root / rel.parts[0] if len(rel.parts) > 1 else root


def _median_step(ipps: list[list[float]], iop: list[float] | None) -> float:
    if iop is None or len(ipps) < 2:
        return float("inf")
    n = np.cross(iop[:3], iop[3:])
    proj = np.sort(np.asarray(ipps) @ n)
    steps = np.diff(proj)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if steps.size else float("inf")


def find_cases(src: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[LidcCase]:
    """All patients below ``src`` with their DICOM series, from headers only; sorted by case id.

    A file named ``*.dcm`` that is not a DICOM file (empty, cut short, no preamble, or not openable, e.g. a symlink to
    itself) is *dropped*: listed with its reason in :attr:`LidcCase.dropped` of the patient whose folder it is in, and
    logged as a warning. Other files without the DICOM preamble (annotations, licences) are ignored.

    Args:
        src: the folder the LIDC-IDRI download (TCIA's ``LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/*.dcm``) is in.
        workers: processes reading headers.
        progress: show a tqdm bar over files.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"LIDC source folder {str(root)!r} does not exist or is not a folder.")
    paths, patient_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if _PATIENT_DIR.match(Path(dirpath).name):
            patient_dirs.add(Path(dirpath))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    dicom, dropped = [], []
    for p in paths:
        why = _not_dicom(p)
        if why is None:
            dicom.append(p)
        elif p.lower().endswith(".dcm"):  # named as a DICOM slice: a lost slice must not pass unnoticed
            dropped.append((p, why))
    paths = dicom
    bar = tqdm(total=len(paths), desc="DICOM headers", unit="file", disable=not progress)
    try:
        if workers > 1 and len(paths) > 64:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                headers = []
                for h in ex.map(_read_header, paths, chunksize=64):
                    headers.append(h)
                    bar.update()
        else:
            headers = []
            for p in paths:
                headers.append(_read_header(p))
                bar.update()
    finally:
        bar.close()

    cases: dict[str, LidcCase] = {}
    geometry: dict[tuple[str, str], tuple[list, list | None]] = {}
    used_dirs = set()
    for path, h in zip(paths, headers):
        folder = _patient_folder(Path(path), root)
        used_dirs.add(folder)
        if "error" in h:
            case = cases.setdefault(folder.name, LidcCase(folder.name, folder=str(folder)))
            case.unreadable.append((path, h["error"]))
            continue
        pid = _case_id(h["patient"], folder)
        case = cases.setdefault(pid, LidcCase(pid, folder=str(folder)))
        series = case.series.setdefault(h["series"], DicomSeries(h["series"], h["modality"]))
        series.files.append(Path(path))
        series.localizer |= h["localizer"]
        ipps, iop = geometry.setdefault((pid, h["series"]), ([], h["iop"]))
        if h["ipp"] is not None:
            ipps.append(h["ipp"])
    for (pid, uid), (ipps, iop) in geometry.items():
        cases[pid].series[uid].slice_spacing = _median_step(ipps, iop)
    by_folder: dict[str, LidcCase] = {}
    for case in cases.values():
        by_folder.setdefault(case.folder, case)
    for path, why in dropped:
        folder = _patient_folder(Path(path), root)
        used_dirs.add(folder)
        logger.warning("dropped DICOM file %s: %s", path, why)
        case = by_folder.get(str(folder)) or cases.setdefault(folder.name, LidcCase(folder.name, folder=str(folder)))
        by_folder.setdefault(str(folder), case)
        case.dropped.append((path, why))
    for d in patient_dirs:
        if d not in used_dirs and d.name not in cases and not any(_is_within(u, d) for u in used_dirs):
            cases[d.name] = LidcCase(d.name, folder=str(d))  # an empty patient folder
    return [cases[k] for k in sorted(cases)]


def _rank_series(case: LidcCase, rule: str) -> tuple[list[DicomSeries], list[DicomSeries]]:
    """``(CT candidates in rule order, other series)``."""
    ct = [s for s in case.series.values() if s.modality == "CT" and not s.localizer]
    other = [s for s in case.series.values() if s not in ct]
    if rule == "most_slices":
        ct.sort(key=lambda s: (-len(s.files), s.slice_spacing, s.uid))
    else:
        ct.sort(key=lambda s: (s.slice_spacing, -len(s.files), s.uid))
    return ct, other


# --------------------------------------------------------------------------------------------------------------------
# reading a series
# --------------------------------------------------------------------------------------------------------------------


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
    import pydicom

    if len(files) < max(2, int(min_slices)):
        raise SeriesError(f"{len(files)} slice(s), fewer than min_slices={max(2, int(min_slices))}")
    slices = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(f))
            missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
                       if t not in ds]
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
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(row_dir @ col_dir) > 1e-3:
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
    """DICOM patient coordinates (LPS) to NIfTI world coordinates (RAS): ``diag(-1, -1, 1, 1) @ affine``."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------------


def _check_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
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
    from scipy import ndimage as ndi

    old = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(_check_spacing(spacing))
    ratio = new / old
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(x.shape, ratio))
    offset = (ratio - 1.0) / 2.0
    if np.allclose(ratio, 1.0, atol=1e-6) and shape == x.shape:
        return x, np.asarray(affine, dtype=np.float64)
    out = ndi.affine_transform(x, ratio, offset=offset, output_shape=shape, order=order, mode="nearest",
                               output=np.float32)
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
    size = _check_spatial_size(spatial_size)
    f = _check_pool(pool)
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


# --------------------------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------------------------


def _dropped_note(case: LidcCase) -> dict[str, Any]:
    """The record fields listing a case's dropped ``.dcm`` files (empty when there are none)."""
    if not case.dropped:
        return {}
    return {"dropped": [{"file": path, "reason": why} for path, why in case.dropped]}


def _with_dropped(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its dropped files also in ``reason``, the column a reader of the CSV report sees (applied to
    the report only: a record's own reason, e.g. ``"up to date"``, is what the run's logic reads)."""
    if not record.get("dropped"):
        return record
    listing = "; ".join(f"{d['file']} ({d['reason']})" for d in record["dropped"])
    note = f"dropped {len(record['dropped'])} DICOM file(s): {listing}"
    return record | {"reason": f"{record['reason']}; {note}" if record.get("reason") else note}


def _process_case(case: LidcCase, dst: str, settings: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Prepare one patient; never raises for a bad case: returns a record with status done / failed.

    The record lists the patient's dropped ``.dcm`` files (``dropped``). A failed write (full disk, permissions)
    names the output path and the errno, not the series being read.

    Args:
        case: the patient as found by :func:`find_cases`.
        dst: the output folder.
        settings: the preparation settings (see :func:`prepare_lidc`).
        fingerprint: input fingerprint of the patient's DICOM files, stored in its record.
    """
    record: dict[str, Any] = {"case": case.case_id, "patient": case.case_id, **_dropped_note(case)}
    if case.unreadable:
        path, reason = case.unreadable[0]
        more = f" (and {len(case.unreadable) - 1} more)" if len(case.unreadable) > 1 else ""
        return record | {"status": "failed", "file": path,
                         "reason": f"corrupt DICOM file{more}, its series is unknown: {reason}"}
    if not case.series and case.dropped:
        return record | {"status": "failed", "file": case.folder, "reason": "no readable DICOM file"}
    if not case.series:
        return record | {"status": "failed", "file": case.folder, "reason": "empty folder: no DICOM files"}
    candidates, others = _rank_series(case, settings["series_rule"])
    if not candidates:
        found = ", ".join(f"{s.modality or '?'}{' localizer' if s.localizer else ''} ({len(s.files)} files)"
                          for s in others)
        return record | {"status": "failed", "file": case.folder, "reason": f"no CT series (found {found})"}
    rejected: dict[str, str] = {}
    for series in candidates:
        try:
            hu, affine_lps = read_ct_series(series.files, settings["spacing_tolerance"], settings["tilt_tolerance"],
                                            settings["min_slices"])
            break
        except SeriesError as err:
            rejected[series.uid] = str(err)
    else:
        reasons = "; ".join(f"series {uid}: {why}" for uid, why in rejected.items())
        return record | {"status": "failed", "file": str(candidates[0].files[0].parent), "reason": reasons}
    source_spacing = _spacing(affine_lps)
    out_dir = Path(dst) / case.case_id
    path = out_dir / f"{case.case_id}-{IMAGE_KEY}.nii.gz"
    writing: Path | None = None  # the output being written: an OSError while it is set is the destination's fault
    try:
        out, out_affine = preprocess_ct(
            hu, lps_to_ras(affine_lps), settings["spacing"], settings["spatial_size"], settings["window"],
            settings["percentile"], settings["pool"],
        )
        del hu
        writing = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        writing = out_dir / RECORD_NAME
        writing.unlink(missing_ok=True)
        writing = path
        _write_nifti(out, out_affine, path)
        writing = None
        result = {
            "status": "done",
            "reason": "; ".join(f"rejected series {uid}: {why}" for uid, why in rejected.items()),
            "outputs": {IMAGE_KEY: f"{case.case_id}/{path.name}"},
            "shape": list(out.shape),
            "spacing": _spacing(out_affine),
            "series": series.uid,
            "num_slices": len(series.files),
            "source_spacing": source_spacing,
        }
        writing = out_dir / RECORD_NAME
        write_case_record(out_dir, record | result | {"fingerprint": fingerprint, "settings": settings})
    except Exception as err:  # noqa: BLE001 - report, remove partial output, go on
        _remove_partial(out_dir, [path])
        if writing is not None and isinstance(err, OSError):
            return write_failure(record, writing, err)
        return record | {"status": "failed", "file": str(series.files[0].parent),
                         "reason": f"{type(err).__name__}: {err}"}
    return record | result


# --------------------------------------------------------------------------------------------------------------------
# the whole dataset
# --------------------------------------------------------------------------------------------------------------------


def prepare_lidc(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    series_rule: str = "most_slices",
    spacing: float | Sequence[float] = 1.0,
    spatial_size: Sequence[int] = (256, 256, 256),
    window: Sequence[float] | None = None,
    percentile: float = 99.9,
    pool: int = 1,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_slices: int = 10,
    spacing_tolerance: float = 0.02,
    tilt_tolerance: float = 0.5,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare every LIDC-IDRI patient below ``src`` into ``dst``: NIfTI volumes, ``datalist.json``, reports.

    Args:
        src: the DICOM download (any depth). Only read.
        dst: output folder (created); must not overlap ``src``.
        series_rule: which CT series of a patient is used, see :data:`SERIES_RULES`.
        spacing: voxel size after resampling in mm (one number or three).
        spatial_size: ``(X, Y, Z)`` after centre crop / air padding, before pooling (256^3 as WDM).
        window: fixed HU clip ``(low, high)``; None: -1000 up to the ``percentile`` of each scan (WDM).
        percentile: top clip percentile when ``window`` is None.
        pool: average-pooling factor (2: 256^3 -> 128^3).
        split: fractions ``(training, validation, test)`` of patients, summing to 1.
        seed: seed of the patient shuffle (:func:`data_prep.brats.split_patients`).
        min_slices: series with fewer slices are rejected.
        spacing_tolerance: relative deviation of a slice step from the median that rejects a series.
        tilt_tolerance: degrees between the slice normal and the slice stacking direction that reject a series.
        workers: processes reading headers and preparing patients.
        progress: tqdm bars and a closing message.
        overwrite: prepare every patient again instead of skipping those whose outputs are up to date.

    Returns:
        The summary (also ``dst/prepare_summary.json``; every case also in ``dst/prepare_report.csv``): ``settings``,
        ``counts`` (found / done / skipped / failed), ``done``, ``skipped`` (``{"case", "reason"}``), ``failed``
        (``{"case", "file", "reason"}``), ``cases`` (each also with ``series`` and ``dropped``, the ``.dcm`` files
        that are not DICOM files as ``{"file", "reason"}``; they are named in ``reason`` too), ``splits``,
        ``datalist``, ``report_csv``, ``seconds``.

    Raises:
        FileNotFoundError: ``src`` is not a folder or holds no DICOM file nor patient folder.
        ValueError: an argument is invalid or ``dst`` overlaps ``src``.
        OutputError: ``dst`` cannot be written (checked before reading any header), a report cannot be written, or
            the disk filled up (ENOSPC / EDQUOT): the batch then stops after that patient, the summary lists the
            patients not started, and no datalist is written. The message names the path and the errno.
        RuntimeError: patients were found but none could be prepared (the summary is still written).
    """
    start = time.perf_counter()
    if series_rule not in SERIES_RULES:
        raise ValueError(f"series_rule must be one of {sorted(SERIES_RULES)}, got {series_rule!r}.")
    settings: dict[str, Any] = {
        "series_rule": series_rule,
        "spacing": list(_check_spacing(spacing)),
        "spatial_size": list(_check_spatial_size(spatial_size)),
        "window": None,
        "percentile": float(percentile),
        "pool": _check_pool(pool),
        "min_slices": int(min_slices),
        "spacing_tolerance": float(spacing_tolerance),
        "tilt_tolerance": float(tilt_tolerance),
    }
    if window is not None:
        try:
            lo, hi = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be two HU values (low, high), got {window!r}.") from None
        if not hi > lo:
            raise ValueError(f"window must be (low, high) HU with low < high, got {window!r}.")
        settings["window"] = [lo, hi]
    if not 0.0 < settings["percentile"] <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}.")
    bad = [s for s in settings["spatial_size"] if s != -1 and s % settings["pool"]]
    if bad:
        raise ValueError(f"spatial_size {settings['spatial_size']} is not divisible by pool={settings['pool']}.")
    if settings["spacing_tolerance"] <= 0 or settings["tilt_tolerance"] < 0 or settings["min_slices"] < 2:
        raise ValueError("spacing_tolerance must be > 0, tilt_tolerance >= 0 and min_slices >= 2.")
    fractions = _check_split(split)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")

    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if not src_path.is_dir():
        raise FileNotFoundError(f"LIDC source folder {str(src)!r} does not exist or is not a folder.")
    if _is_within(dst_path, src_path) or _is_within(src_path, dst_path):
        raise ValueError(
            f"dst {str(dst_path)!r} and src {str(src_path)!r} overlap; write the prepared data to a folder outside "
            "the raw download (the source is never modified)."
        )
    check_output_dir(dst_path)  # before reading every header: an unwritable dst is one clear error, at once
    cases = find_cases(src_path, workers=workers, progress=progress)
    if not cases:
        raise FileNotFoundError(
            f"No DICOM files found below {str(src_path)!r}. Expected the TCIA layout "
            "LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/1-001.dcm (files with the DICOM preamble)."
        )
    make_output_dir(dst_path)

    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for case in cases:
        files = case.files
        try:
            fingerprint = input_fingerprint(files) if files else ""
        except Exception as err:  # noqa: BLE001 - e.g. a file removed since discovery: this patient fails alone
            records[case.case_id] = {
                "case": case.case_id, "patient": case.case_id, "status": "failed",
                "file": str(getattr(err, "filename", None) or case.folder),
                "reason": f"cannot read the file: {os_error_text(err)}", **_dropped_note(case)}
            continue
        previous = None if overwrite or not fingerprint else read_case_record(dst_path / case.case_id, fingerprint,
                                                                               settings)
        if previous is not None:
            records[case.case_id] = {
                "case": case.case_id, "patient": case.case_id, "status": "skipped", "reason": UP_TO_DATE,
                "outputs": previous["outputs"], "shape": previous["shape"], "spacing": previous["spacing"],
                "series": previous.get("series"), **_dropped_note(case),
            }
        else:
            jobs.append((case.case_id, (case, str(dst_path), settings, fingerprint)))
    # A full disk stops the batch with exit status 2 rather than failing every remaining patient the same way after
    # reading and resampling its series; patients done so far are kept and skipped as up to date by the next run.
    records |= run_cases(
        _process_case, jobs, workers, "LIDC patients", progress,
        lambda key, err: {"case": key, "patient": key, "status": "failed", "file": "",
                          "reason": f"worker error {type(err).__name__}: {err}"},
        stop=stops_batch,
    )
    full = next((records[key] for key, _ in jobs if key in records and stops_batch(records[key])), None)
    waiting = [key for key, _ in jobs if key not in records] if full is not None else []
    for key in waiting:
        records[key] = not_started({"case": key, "patient": key}, full)

    current = [records[c.case_id] for c in cases
               if records[c.case_id]["status"] == "done" or records[c.case_id].get("reason") == UP_TO_DATE]
    ordered = [_with_dropped(records[c.case_id]) for c in cases]
    done = [r for r in ordered if r["status"] == "done"]
    skipped = [{"case": r["case"], "reason": r["reason"]} for r in ordered if r["status"] == "skipped"]
    failed = [{"case": r["case"], "file": r["file"], "reason": r["reason"]} for r in ordered if r["status"] == "failed"]
    for entry in failed:
        logger.warning("failed %s (%s): %s", entry["case"], entry["file"], entry["reason"])

    datalist_path = dst_path / "datalist.json"
    summary: dict[str, Any] = {
        "src": str(src_path),
        "dst": str(dst_path),
        "datalist": str(datalist_path) if current and full is None else None,
        "report_csv": str(dst_path / REPORT_CSV_NAME),
        "settings": settings | {"split": list(fractions), "seed": int(seed)},
        "counts": {"found": len(cases), "done": len(done), "skipped": len(skipped), "failed": len(failed)},
        "done": [r["case"] for r in done],
        "skipped": skipped,
        "failed": failed,
        "cases": [{k: r.get(k, "") for k in REPORT_COLUMNS}
                  | {"series": r.get("series", ""), "dropped": r.get("dropped", [])} for r in ordered],
    }
    if full is not None:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        raise _stopped_by_full_disk(full, summary, ordered, dst_path, "patients", len(waiting))
    with writing_output(dst_path / REPORT_CSV_NAME):
        write_report(ordered, dst_path)
    if not current:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        with writing_output(dst_path / SUMMARY_NAME):
            _write_json(summary, dst_path / SUMMARY_NAME)
        raise RuntimeError(
            f"None of the {len(cases)} LIDC patients below {str(src_path)!r} could be prepared "
            f"({len(failed)} failed); see {dst_path / SUMMARY_NAME}."
        )

    splits = split_patients((r["patient"] for r in current), fractions, seed)
    split_of = {p: key for key, ids in splits.items() for p in ids}
    entries: dict[str, list[dict[str, str]]] = {key: [] for key in SPLIT_KEYS}
    for r in current:
        entries[split_of[r["patient"]]].append({"case": r["case"], "patient": r["patient"], **r["outputs"]})
    shape = _same_or_none([r["shape"] for r in current], tol=0)
    datalist: dict[str, Any] = {
        "name": "LIDC-IDRI (prepared by data_prep.lidc)",
        "description": "Preprocessed chest CT volumes; paths are relative to this file's folder.",
        "tensorImageSize": "3D",
        "modality": "CT",
        "image_key": IMAGE_KEY,
        "spatial_size": [int(v) for v in shape] if shape is not None else None,
        "spacing": _same_or_none([r["spacing"] for r in current]),
        "intensity_range": [0.0, 1.0],
        "hu_clip": {"low": settings["window"][0] if settings["window"] else AIR_HU,
                    "high": settings["window"][1] if settings["window"] else f"percentile {settings['percentile']:g}"},
        "series_rule": series_rule,
        "resample_spacing": settings["spacing"],
        "pool": settings["pool"],
        "split": list(fractions),
        "seed": int(seed),
        "numTraining": len(entries["training"]),
        "numValidation": len(entries["validation"]),
        "numTest": len(entries["test"]),
        **entries,
    }
    with writing_output(datalist_path):
        _write_json(datalist, datalist_path)
    summary["splits"] = {key: len(v) for key, v in entries.items()}
    summary["spatial_size"] = datalist["spatial_size"]
    summary["spacing"] = datalist["spacing"]
    summary["seconds"] = round(time.perf_counter() - start, 3)
    with writing_output(dst_path / SUMMARY_NAME):
        _write_json(summary, dst_path / SUMMARY_NAME)
    if progress:
        print(
            f"Prepared {len(done)} of {len(cases)} LIDC patients ({len(skipped)} skipped as up to date, "
            f"{len(failed)} failed) into {dst_path}\n  datalist: {datalist_path} (training "
            f"{summary['splits']['training']}, validation {summary['splits']['validation']}, test "
            f"{summary['splits']['test']})\n  summary:  {dst_path / SUMMARY_NAME}\n  report:   {summary['report_csv']}"
        )
    return summary


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.lidc",
        description="Prepare the LIDC-IDRI DICOM download into [0, 1] CT NIfTI volumes and a MONAI datalist.\n"
        "Example: python -m data_prep.lidc --src /data/LIDC-IDRI --dst data/lidc128 --pool 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="folder with the DICOM download (only read)")
    parser.add_argument("--dst", required=True, help="output folder, outside --src")
    parser.add_argument("--series-rule", default="most_slices", choices=sorted(SERIES_RULES),
                        help="which CT series per patient: most_slices (default) or thinnest")
    parser.add_argument("--spacing", nargs="+", type=float, default=[1.0], metavar="MM",
                        help="voxel size after resampling, one value or three (default: 1)")
    parser.add_argument("--spatial-size", nargs=3, type=int, default=(256, 256, 256), metavar=("X", "Y", "Z"),
                        help="size after centre crop / air padding, before pooling (default: 256 256 256)")
    parser.add_argument("--window", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                        help="fixed HU clip (default: -1000 up to the --percentile of each scan, as WDM)")
    parser.add_argument("--percentile", type=float, default=99.9, help="top clip percentile (default: 99.9)")
    parser.add_argument("--pool", type=int, default=1, help="average-pooling factor, 2 gives 128^3 (default: 1)")
    parser.add_argument("--min-slices", type=int, default=10, help="reject series with fewer slices (default: 10)")
    parser.add_argument("--spacing-tolerance", type=float, default=0.02,
                        help="relative slice-step deviation that rejects a series (default: 0.02)")
    parser.add_argument("--tilt-tolerance", type=float, default=0.5,
                        help="degrees of gantry tilt that reject a series (default: 0.5)")
    add_batch_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 0: no case failed, 1: some or all cases failed, 2: bad arguments, a
    missing source, or an output that cannot be written (an unwritable ``--dst``, a full disk).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spacing = args.spacing[0] if len(args.spacing) == 1 else args.spacing
    try:
        summary = prepare_lidc(
            args.src, args.dst, series_rule=args.series_rule, spacing=spacing, spatial_size=args.spatial_size,
            window=args.window, percentile=args.percentile, pool=args.pool, split=args.split, seed=args.seed,
            min_slices=args.min_slices, spacing_tolerance=args.spacing_tolerance, tilt_tolerance=args.tilt_tolerance,
            workers=args.workers, progress=not args.quiet, overwrite=args.overwrite,
        )
    except (FileNotFoundError, ValueError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = summary["counts"]
    if args.quiet:
        print(f"Prepared {counts['done']} patients ({counts['skipped']} skipped, {counts['failed']} failed) into "
              f"{summary['dst']} (datalist: {summary['datalist']})")
    if counts["failed"]:
        print(f"error: {counts['failed']} patient(s) failed; see {summary['report_csv']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
