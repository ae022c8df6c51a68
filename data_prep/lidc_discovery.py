"""LIDC-IDRI on disk: patients, their DICOM series from headers only, and the choice of one CT series per patient.

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
(smallest slice spacing; ties: most slices). The first candidate that passes every check of
:func:`data_prep.lidc_dicom.read_ct_series` is used; candidates rejected on the way are listed in the report with
their reason.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .common import is_within
from .lidc_dicom import not_dicom, read_header

__all__ = ["SERIES_RULES", "DicomSeries", "LidcCase", "find_cases", "rank_series"]

# the lidc tool's one logger, whichever of its modules warns: its warnings are read and filtered under one name
logger = logging.getLogger("data_prep.lidc")

#: Series-choice rules: name -> what it prefers.
SERIES_RULES: dict[str, str] = {
    "most_slices": "the CT series with the most slices (ties: thinnest slice spacing, then series UID)",
    "thinnest": "the CT series with the smallest slice spacing (ties: most slices, then series UID)",
}
_PATIENT_DIR = re.compile(r"^LIDC-[A-Za-z]+-\d+$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one path component, no "..", no separators


def _case_id(patient_id: str | None, folder: Path) -> str:
    """The case id (output folder and file names): the DICOM PatientID when it is a safe file name, else the
    patient's folder name. A PatientID is free text: "../x" or "a/b" would write outside the output folder.

    Args:
        patient_id: the PatientID from the header ("" when absent).
        folder: the patient's folder (see :func:`_patient_folder`).
    """
    if patient_id and _SAFE_ID.match(patient_id) and ".." not in patient_id:
        return patient_id
    if patient_id:
        logger.warning(
            "PatientID %r under %s is not a safe file name; the case is named after its folder %r.",
            patient_id,
            folder,
            folder.name,
        )
    return folder.name


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


def _patient_folder(path: Path, root: Path) -> Path:
    """The nearest ancestor named like a patient (``LIDC-IDRI-0001``), else the first folder below ``root``.

    Args:
        path: a file below ``root``.
        root: the source folder.
    """
    for parent in path.parents:
        if parent == root:
            break
        if _PATIENT_DIR.match(parent.name):
            return parent
    rel = path.relative_to(root)
    return root / rel.parts[0] if len(rel.parts) > 1 else root


def _median_step(ipps: list[list[float]], iop: list[float] | None) -> float:
    """The median step between header slice positions along the slice normal (mm); inf when it cannot be known.

    Args:
        ipps: the ImagePositionPatient of each slice.
        iop: the series' ImageOrientationPatient, or None.
    """
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
        why = not_dicom(p)
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
                for h in ex.map(read_header, paths, chunksize=64):
                    headers.append(h)
                    bar.update()
        else:
            headers = []
            for p in paths:
                headers.append(read_header(p))
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
        if d not in used_dirs and d.name not in cases and not any(is_within(u, d) for u in used_dirs):
            cases[d.name] = LidcCase(d.name, folder=str(d))  # an empty patient folder
    return [cases[k] for k in sorted(cases)]


def rank_series(case: LidcCase, rule: str) -> tuple[list[DicomSeries], list[DicomSeries]]:
    """``(CT candidates in rule order, other series)``: localizers and non-CT series are never candidates.

    Args:
        case: the patient as found by :func:`find_cases`.
        rule: one of :data:`SERIES_RULES`.
    """
    ct = [s for s in case.series.values() if s.modality == "CT" and not s.localizer]
    other = [s for s in case.series.values() if s not in ct]
    if rule == "most_slices":
        ct.sort(key=lambda s: (-len(s.files), s.slice_spacing, s.uid))
    else:
        ct.sort(key=lambda s: (s.slice_spacing, -len(s.files), s.uid))
    return ct, other
