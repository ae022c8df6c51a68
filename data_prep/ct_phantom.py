"""A procedural chest-CT phantom written as real DICOM series in the LIDC-IDRI folder layout (no downloads).

    python -m data_prep.ct_phantom --dst RAW [--num-cases 4] [--seed 0] [--size 64 64 40] [--spacing 5 5 5]

No chest CT ships in any package this project can install (REFERENCE section 9), so this stands in for the
LIDC-IDRI download and lets ``data_prep.lidc`` run end to end offline. Nothing here is patient data: every series is
marked synthetic (``ImageType`` ``DERIVED\\SECONDARY``, ``SeriesDescription`` "synthetic phantom (wdm3d)").

Anatomy, in Hounsfield units (HU), on an axial grid (:func:`phantom_hu`): air outside (-1000), an elliptic body of
soft tissue (40) with a subcutaneous fat layer (-100), two lungs (-850, slightly textured), trachea and two main
bronchi (air, -1000), branching pulmonary vessels (40), heart/mediastinum (40, a slightly denser myocardium ring),
vertebral bodies with a cortical shell and a spinal canal, ribs as periodic arcs (bone, 700-1200), and random solid
nodules (count, radius, position seeded) inside the lungs. Gaussian noise (sigma 8 HU) on top.

DICOM (:func:`write_series`): one file per slice, CT Image Storage, int16 stored values with ``RescaleSlope`` 1 and
``RescaleIntercept`` -1024, axial ``ImageOrientationPatient`` (1, 0, 0, 0, 1, 0), ``ImagePositionPatient`` per slice
in LPS millimetres, ``PixelSpacing``, ``SliceThickness``, ``SpacingBetweenSlices``, new Study / Series / SOP /
FrameOfReference UIDs, ``PatientID`` per case. Files are numbered from the *top* (superior) slice down, as LIDC's are,
so a reader that sorts by file name instead of position gets the volume upside down. Layout::

    RAW/LIDC-PHANTOM-0001/<StudyInstanceUID>/<SeriesInstanceUID>/1-001.dcm, 1-002.dcm, ...

``defects`` turns a case into one of the bad inputs ``data_prep.lidc`` must reject (see :data:`DEFECTS`).
A case depends only on ``(seed, index)``; :func:`make_phantom_raw` returns what was written, including the patient
(LPS) positions of the nodules and of an optional bright ``marker``, so tests can check geometry end to end.

Time: the demo default (4 cases of 64x64x40 at 5 mm) takes about 1 s; the test size (32x32x24) well under that.

One module because it is one concept, the offline stand-in download; its anatomy, series writer and defects are kept
together because each defect is defined by how the writer breaks the series.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = [
    "DEFECTS",
    "SYNTHETIC_DESCRIPTION",
    "PhantomCase",
    "phantom_case_id",
    "phantom_hu",
    "write_series",
    "make_phantom_raw",
    "main",
]

#: What ``defects`` can ask for, and what each one does to the written series.
DEFECTS: dict[str, str] = {
    "missing_slice": "one slice in the middle of the series is not written",
    "uneven_spacing": "the slice positions step by alternating 0.8x / 1.2x the slice spacing",
    "gantry_tilt": "each slice is shifted along y by spacing * tan(15 deg): slices not stacked along their normal",
    "mixed_sizes": "one slice is written with fewer columns than the others",
    "non_ct": "the series is written with Modality MR (and MR Image Storage) instead of CT",
    "truncated": "one file is cut in half (a broken download)",
    "nan": "one slice has RescaleSlope 'NaN', so its HU values are not numbers",
    "empty": "the patient folder is created with no files in it",
}
#: SeriesDescription of every phantom series.
SYNTHETIC_DESCRIPTION = "synthetic phantom (wdm3d)"

_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_INTERCEPT = -1024


def phantom_case_id(index: int) -> str:
    """``LIDC-PHANTOM-0001`` for ``index`` 0 (LIDC numbers patients from 1).

    Args:
        index: the case index, from 0.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be an integer >= 0, got {index!r}.")
    return f"LIDC-PHANTOM-{index + 1:04d}"


@dataclass
class PhantomCase:
    """What :func:`make_phantom_raw` wrote for one case.

    Attributes:
        case_id: the PatientID, also the patient folder name.
        series_dir: folder of the series (None for an ``empty`` case).
        files: the DICOM files written, in file-name order.
        defects: the defects applied (keys of :data:`DEFECTS`).
        nodules: ``[{"center_lps": [x, y, z] mm, "radius_mm": r}, ...]``.
        marker_lps: patient (LPS) position of the marker's centre in mm, or None.
        shape: ``(columns, rows, slices)`` of the volume as generated.
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm.
    """

    case_id: str
    series_dir: Path | None
    files: list[Path] = field(default_factory=list)
    defects: tuple[str, ...] = ()
    nodules: list[dict[str, Any]] = field(default_factory=list)
    marker_lps: list[float] | None = None
    shape: tuple[int, int, int] = (0, 0, 0)
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------------------------------


def _tube(px, py, pz, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` (mm) of the segment ``a -> b`` (points in mm); grids ``px, py, pz`` in mm."""
    d = b - a
    t = ((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2 <= radius**2


def phantom_hu(
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (5.0, 5.0, 5.0),
    seed: int = 0,
    num_nodules: tuple[int, int] = (1, 4),
    nodule_radius_mm: tuple[float, float] = (4.0, 12.0),
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A chest phantom in HU on a grid centred on the body: ``(X, Y, Z)`` = (columns, rows, slices).

    Axes follow DICOM's LPS patient system with an axial orientation: x to the patient's left, y posterior, z superior.
    The grid is centred in x and y on the body and spans the thorax in z (lung bases at the bottom, above the lung
    apices the trachea only).

    Args:
        shape: ``(X, Y, Z)`` voxels, each >= 8.
        spacing: voxel size ``(x, y, z)`` in mm (the body is about 320 x 230 mm, so 5 mm with 64 voxels fits it).
        seed: seeds noise, texture, vessels and nodules.
        num_nodules: ``(min, max)`` number of nodules, inclusive.
        nodule_radius_mm: ``(min, max)`` nodule radius in mm.

    Returns:
        ``(hu, nodules)``: float32 HU array of ``shape``; nodules as ``[{"center_mm": [x, y, z], "radius_mm": r}]``
        in mm relative to the grid's first voxel centre.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8 (X, Y, Z), got {shape}.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}.")
    rng = np.random.default_rng(seed)
    X, Y, Z = shape
    sx, sy, sz = spacing
    # coordinates in mm relative to the field-of-view centre (x, y) and to the bottom slice (z)
    px = (np.arange(X) - (X - 1) / 2) * sx
    py = (np.arange(Y) - (Y - 1) / 2) * sy
    pz = np.arange(Z) * sz
    gx, gy, gz = np.meshgrid(px, py, pz, indexing="ij")
    height = Z * sz
    half_w, half_d = min(160.0, 0.45 * X * sx), min(115.0, 0.42 * Y * sy)  # body half-width / half-depth
    jitter = rng.uniform(0.95, 1.05, size=4)
    half_w, half_d = half_w * jitter[0], half_d * jitter[1]
    zr = gz / height  # 0 at the bottom slice, ~1 at the top

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (gx / half_w) ** 2 + (gy / half_d) ** 2 <= 1.0
    hu[body] = -100.0  # fat
    inner = (gx / (half_w - 12.0)) ** 2 + (gy / (half_d - 12.0)) ** 2 <= 1.0
    hu[inner] = 40.0  # soft tissue

    # lungs: two ellipsoids, narrowing towards the apex; texture +-20 HU
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx, cy = side * 0.42 * half_w, -0.05 * half_d
        taper = np.clip(1.15 - 0.55 * zr, 0.2, 1.0)
        rx, ry = 0.34 * half_w * taper * jitter[2], 0.62 * half_d * taper * jitter[3]
        lungs |= (((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2 <= 1.0) & (zr > 0.08) & (zr < 0.9)
    hu[lungs] = -850.0 + rng.normal(0.0, 20.0, size=int(lungs.sum()))

    # heart and mediastinum: anterior, slightly to the left, in the lower two thirds
    heart = ((gx - 0.12 * half_w) / (0.3 * half_w)) ** 2 + ((gy + 0.25 * half_d) / (0.45 * half_d)) ** 2 + (
        (zr - 0.3) / 0.3
    ) ** 2 <= 1.0
    myocardium = heart & ~(
        ((gx - 0.12 * half_w) / (0.22 * half_w)) ** 2
        + ((gy + 0.25 * half_d) / (0.35 * half_d)) ** 2
        + ((zr - 0.3) / 0.24) ** 2
        <= 1.0
    )
    mediastinum = (np.abs(gx) < 0.12 * half_w) & (np.abs(gy + 0.1 * half_d) < 0.5 * half_d) & (zr > 0.3)
    hu[heart | mediastinum] = 40.0
    hu[myocardium] = 55.0

    # airways: trachea from the top down to the carina, two main bronchi into the lungs
    carina = np.array([0.0, 0.05 * half_d, 0.62 * height])
    top = np.array([0.0, -0.05 * half_d, height + 10.0])
    r_airway = max(8.0, 0.6 * max(sx, sy))
    airway = _tube(gx, gy, gz, top, carina, r_airway)
    for side in (-1.0, 1.0):
        airway |= _tube(gx, gy, gz, carina, np.array([side * 0.4 * half_w, 0.0, 0.45 * height]), 0.7 * r_airway)
    hu[airway & body] = -1000.0

    # vessels: branches from each hilum into its lung (soft tissue density)
    r_vessel = max(2.5, 0.45 * max(sx, sy))
    for side in (-1.0, 1.0):
        hilum = np.array([side * 0.22 * half_w, -0.05 * half_d, 0.5 * height])
        for _ in range(6):
            end = np.array(
                [
                    side * rng.uniform(0.45, 0.7) * half_w,
                    rng.uniform(-0.45, 0.35) * half_d,
                    rng.uniform(0.15, 0.85) * height,
                ]
            )
            mid = hilum + 0.5 * (end - hilum)
            hu[_tube(gx, gy, gz, hilum, end, r_vessel) & (lungs | heart)] = 40.0
            twig = mid + np.array(
                [side * 0.15 * half_w, rng.uniform(-0.2, 0.2) * half_d, rng.uniform(-0.1, 0.1) * height]
            )
            hu[_tube(gx, gy, gz, mid, twig, 0.7 * r_vessel) & lungs] = 40.0

    # spine: vertebral body (cancellous 700 HU, cortical shell 1200 HU) and spinal canal, posterior midline
    vy, vr = 0.62 * half_d, max(18.0, 1.5 * max(sx, sy))
    radial = np.sqrt(gx**2 + (gy - vy) ** 2)
    hu[radial <= vr] = 1200.0
    hu[radial <= vr - max(3.0, 0.6 * max(sx, sy))] = 700.0
    hu[np.sqrt(gx**2 + (gy - (vy + vr + 6.0)) ** 2) <= 7.0] = 20.0
    # ribs: arcs just inside the soft tissue, one every ~25 mm in z, lateral and posterior only
    rib_width = max(8.0, 1.2 * max(sx, sy))
    shell = ((gx / (half_w - 14.0)) ** 2 + (gy / (half_d - 14.0)) ** 2 <= 1.0) & (
        (gx / (half_w - 14.0 - rib_width)) ** 2 + (gy / (half_d - 14.0 - rib_width)) ** 2 > 1.0
    )
    rib_band = np.abs(((gz + 0.3 * gy) % 25.0) - 12.5) < max(4.0, 0.6 * sz)
    ribs = shell & rib_band & (gy > -0.5 * half_d) & (zr > 0.1) & (zr < 0.9)
    hu[ribs] = 1000.0

    # nodules: solid spheres fully inside a lung
    nodules: list[dict[str, Any]] = []
    lo, hi = int(num_nodules[0]), int(num_nodules[1])
    candidates = np.argwhere(lungs & (hu < -700))
    for _ in range(int(rng.integers(lo, hi + 1)) if candidates.size else 0):
        radius = float(rng.uniform(*nodule_radius_mm))
        idx = candidates[int(rng.integers(len(candidates)))]
        centre = np.array([px[idx[0]], py[idx[1]], pz[idx[2]]])
        ball = (gx - centre[0]) ** 2 + (gy - centre[1]) ** 2 + (gz - centre[2]) ** 2 <= radius**2
        hu[ball & lungs] = rng.uniform(-20.0, 60.0)
        first = np.array([px[0], py[0], pz[0]])
        nodules.append({"center_mm": [float(v) for v in centre - first], "radius_mm": round(radius, 3)})

    hu += rng.normal(0.0, 8.0, size=shape).astype(np.float32)
    return np.clip(hu, -1024.0, 3000.0).astype(np.float32), nodules


# --------------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------------


def write_series(
    hu: np.ndarray,
    folder: str | os.PathLike,
    origin: Sequence[float],
    spacing: Sequence[float],
    patient_id: str,
    study_uid: str,
    series_uid: str,
    positions: Sequence[Sequence[float]] | None = None,
    modality: str = "CT",
    slice_overrides: dict[int, dict[str, Any]] | None = None,
) -> list[Path]:
    """Write ``hu`` ``(X, Y, Z)`` as one axial DICOM file per slice, numbered from the top slice (``1-001.dcm``).

    Args:
        hu: volume in HU, ``(columns, rows, slices)``; slice ``k`` is at ``positions[k]``.
        folder: the series folder (created).
        origin: LPS position (mm) of voxel ``(0, 0, 0)``'s centre.
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm.
        patient_id: PatientID (and PatientName) of the case.
        study_uid: StudyInstanceUID; series_uid: SeriesInstanceUID.
        positions: ImagePositionPatient per slice; None: ``origin + k * slice spacing * (0, 0, 1)``.
        modality: ``"CT"``, or ``"MR"`` to write a non-CT series (MR Image Storage).
        slice_overrides: ``{k: {keyword: value}}`` set on slice ``k`` after the rest (``Columns``, ``RescaleSlope``...);
            a ``"_columns"`` entry keeps only that many columns of the slice's pixels.

    Returns:
        The written files, in file-name order (top slice first).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D array (columns, rows, slices), got shape {hu.shape}.")
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X, Y, Z = hu.shape
    sx, sy, sz = (float(s) for s in spacing)
    if positions is None:
        positions = [[float(origin[0]), float(origin[1]), float(origin[2]) + k * sz] for k in range(Z)]
    stored = np.clip(np.rint(hu - _INTERCEPT), -32768, 32767).astype(np.int16)
    frame_uid = generate_uid()
    sop_class = _CT_STORAGE if modality == "CT" else _MR_STORAGE
    overrides = slice_overrides or {}
    files = []
    for number, k in enumerate(range(Z - 1, -1, -1), start=1):  # top slice first, as LIDC numbers them
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"1-{number:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Modality = modality
        ds.Manufacturer = "wdm3d synthetic phantom"
        ds.SeriesDescription = SYNTHETIC_DESCRIPTION
        ds.StudyDescription = SYNTHETIC_DESCRIPTION
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(float(positions[k][2]), 4)
        ds.PixelSpacing = [sy, sx]  # row spacing (between rows, along y), column spacing (along x)
        ds.SliceThickness = sz
        ds.SpacingBetweenSlices = sz
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = 1
        ds.RescaleIntercept = _INTERCEPT
        ds.RescaleType = "HU"
        pixels = stored[:, :, k].T  # (rows, columns)
        extra = dict(overrides.get(k, {}))
        cols = extra.pop("_columns", None)
        if cols is not None:
            pixels = pixels[:, : int(cols)]
        ds.Rows, ds.Columns = pixels.shape
        with warnings.catch_warnings():  # a deliberately invalid value (the "nan" defect) warns in pydicom
            warnings.simplefilter("ignore")
            for key, value in extra.items():
                setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        files.append(path)
    return files


def make_phantom_raw(
    dst: str | os.PathLike,
    num_cases: int = 4,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 40),
    spacing: Sequence[float] = (5.0, 5.0, 5.0),
    defects: dict[int, Sequence[str]] | None = None,
    marker: bool = False,
    extra_series: dict[int, str] | None = None,
    shapes: dict[int, Sequence[int]] | None = None,
    first_index: int = 0,
) -> list[PhantomCase]:
    """Write ``num_cases`` phantom patients below ``dst`` in the LIDC layout; case ``i`` depends on ``(seed, i)`` only.

    Args:
        dst: the raw folder (created; existing patient folders of the same ids are added to, so use a fresh one).
        num_cases: number of patients.
        seed: base seed.
        shape: ``(columns, rows, slices)`` per case.
        spacing: ``(column, row, slice)`` spacing in mm.
        defects: ``{case index: ["missing_slice", ...]}``, see :data:`DEFECTS`.
        marker: add a bright 3000 HU cube (3 voxels a side, brighter than any anatomy) in the anterior chest, a
            quarter of the field of view from its front edge; its centre's LPS position is returned as ``marker_lps``.
        extra_series: ``{case index: "MR" | "CT"}`` writes a second series in the same study (a 24-slice MR series, or
            a CT series with fewer slices and thicker spacing) to exercise the series choice.
        shapes: ``{case index: (X, Y, Z)}`` overrides ``shape`` for single cases (scans of different sizes).
        first_index: index of the first case (patient numbers continue from there).

    Returns:
        One :class:`PhantomCase` per patient.
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}.")
    defects = {int(k): tuple(v) for k, v in (defects or {}).items()}
    unknown = sorted({d for v in defects.values() for d in v} - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown defects {unknown}; choose from {sorted(DEFECTS)}.")
    root = Path(dst)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(first_index, first_index + num_cases):
        case_id = phantom_case_id(i)
        todo = defects.get(i, ())
        if "empty" in todo:
            (root / case_id).mkdir(parents=True, exist_ok=True)
            out.append(PhantomCase(case_id, None, defects=todo))
            continue
        case_shape = tuple(int(s) for s in (shapes or {}).get(i, shape))
        sx, sy, sz = (float(s) for s in spacing)
        hu, nodules = phantom_hu(case_shape, spacing, seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        rng = np.random.default_rng([seed, i, 1])
        X, Y, Z = case_shape
        origin = np.array([-(X - 1) / 2 * sx, -(Y - 1) / 2 * sy, -200.0]) + rng.uniform(-20, 20, size=3).round(2)
        marker_lps = None
        if marker:
            m = np.array([X // 2 + 2, Y // 4, Z // 2])  # anterior, just left of the midline
            hu[m[0] - 1 : m[0] + 2, m[1] - 1 : m[1] + 2, m[2] - 1 : m[2] + 2] = 3000.0
            marker_lps = [float(v) for v in origin + m * np.array([sx, sy, sz])]
        positions = [list(origin + np.array([0.0, 0.0, k * sz])) for k in range(Z)]
        if "uneven_spacing" in todo:
            steps = [0.0] + [sz * (0.8 if k % 2 else 1.2) for k in range(1, Z)]
            zs = np.cumsum(steps)
            positions = [[origin[0], origin[1], origin[2] + z] for z in zs]
        if "gantry_tilt" in todo:
            shift = sz * np.tan(np.deg2rad(15.0))
            positions = [[p[0], p[1] + k * shift, p[2]] for k, p in enumerate(positions)]
        overrides: dict[int, dict[str, Any]] = {}
        if "mixed_sizes" in todo:
            overrides[Z // 3] = {"_columns": X - 4}
        if "nan" in todo:
            overrides[Z // 2] = {"RescaleSlope": "NaN"}
        study, series = generate_uid(), generate_uid()
        series_dir = root / case_id / study / series
        files = write_series(
            hu,
            series_dir,
            origin,
            spacing,
            case_id,
            study,
            series,
            positions=positions,
            modality="MR" if "non_ct" in todo else "CT",
            slice_overrides=overrides,
        )
        if "missing_slice" in todo:
            gone = files.pop(len(files) // 2)
            gone.unlink()
        if "truncated" in todo:
            victim = files[len(files) // 2]
            data = victim.read_bytes()
            victim.write_bytes(data[: len(data) // 2])
        kind = (extra_series or {}).get(i)
        if kind is not None:
            n = min(24, Z)
            extra_hu = hu[:, :, :n] if kind == "MR" else hu[:, :, ::2]
            extra_spacing = (sx, sy, sz) if kind == "MR" else (sx, sy, 2 * sz)
            write_series(
                extra_hu,
                root / case_id / study / generate_uid(),
                origin,
                extra_spacing,
                case_id,
                study,
                generate_uid(),
                modality=kind,
            )
        case_nodules = [
            {"center_lps": [float(v) for v in origin + np.array(n["center_mm"])], "radius_mm": n["radius_mm"]}
            for n in nodules
        ]
        out.append(PhantomCase(case_id, series_dir, files, todo, case_nodules, marker_lps, case_shape, (sx, sy, sz)))
    return out


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.ct_phantom",
        description="Write synthetic chest-CT phantom DICOM series in the LIDC-IDRI folder layout (not patient data).\n"
        "Example: python -m data_prep.ct_phantom --dst lidc_raw && python -m data_prep.lidc --src lidc_raw "
        "--dst lidc_prepared --spacing 4 --spatial-size 64 64 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dst", required=True, help="raw output folder (LIDC layout)")
    parser.add_argument("--num-cases", type=int, default=4, help="number of patients (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--size",
        nargs=3,
        type=int,
        default=(64, 64, 40),
        metavar=("X", "Y", "Z"),
        help="columns rows slices (default: 64 64 40)",
    )
    parser.add_argument(
        "--spacing",
        nargs=3,
        type=float,
        default=(5.0, 5.0, 5.0),
        metavar=("X", "Y", "Z"),
        help="voxel size in mm (default: 5 5 5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0, or 2 for bad arguments.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        cases = make_phantom_raw(args.dst, args.num_cases, args.seed, args.size, args.spacing)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {len(cases)} synthetic chest-CT phantom series into {Path(args.dst).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
