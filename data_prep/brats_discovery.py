"""BraTS on disk: the two naming schemes, modality names, label conventions, and case discovery.

Case discovery (any depth below ``--src``; hidden files are ignored):

- BraTS 2021 and earlier: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``
  (also ``BraTS20_Training_001_t1.nii.gz`` and the like);
- BraTS 2023 and later: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, any sub-challenge
  prefix (``BraTS-MEN-``, ``BraTS-PED-``, ``BraTS-SSA-``, ``BraTS-MET-``, ...). The datalist names the label values
  (``labels``) only for glioma data (GLI, 2021); other sub-challenges use the same values for other regions, so
  their ``labels`` stay empty and ``label_convention`` says where they are defined (``subchallenges`` lists them).

``.nii`` and ``.nii.gz`` are both accepted. Modalities are renamed to the 2023 names: ``t1 -> t1n``, ``t1ce -> t1c``,
``t2 -> t2w``, ``flair -> t2f``; the label map keeps the key ``seg``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MODALITIES",
    "SEG",
    "MODALITY_ALIASES",
    "BRATS_LABELS",
    "BratsCase",
    "subchallenge",
    "label_table",
    "patient_id",
    "normalize_modalities",
    "find_cases",
]

#: Image modalities in the BraTS 2023 naming, in the order they are listed in the datalist.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
#: Key of the label map.
SEG: str = "seg"
#: Every accepted modality name (BraTS 2021 and 2023) -> the name used here.
MODALITY_ALIASES: dict[str, str] = {
    "t1": "t1n",
    "t1n": "t1n",
    "t1ce": "t1c",
    "t1c": "t1c",
    "t2": "t2w",
    "t2w": "t2w",
    "flair": "t2f",
    "t2f": "t2f",
    "seg": "seg",
}
#: BraTS 2023 glioma label convention (BraTS 2021 used 4 for ET; it is mapped to 3 unless told otherwise).
BRATS_LABELS: dict[str, str] = {
    "0": "background",
    "1": "necrotic tumour core (NCR)",
    "2": "peritumoral oedema (ED)",
    "3": "enhancing tumour (ET)",
}


def subchallenge(case_id: str) -> str:
    """``BraTS-PED-00001-000 -> "PED"``; BraTS 2021 ids (``BraTS2021_00000``) are the glioma challenge, ``"GLI"``.

    Args:
        case_id: a BraTS case id in either naming scheme.
    """
    m = re.match(r"^BraTS-([A-Za-z]+)-", case_id)
    return m.group(1).upper() if m else "GLI"


def label_table(challenges: Sequence[str], harmonize_labels: bool) -> tuple[dict[str, str], str]:
    """The datalist's label table and convention: the glioma table for GLI data; for other sub-challenges (whose
    values name other regions: e.g. the paediatric set has a label 4) no guessed names, only where to look.

    Args:
        challenges: the sorted sub-challenges of the prepared cases (:func:`subchallenge`).
        harmonize_labels: BraTS 2021 label 4 was mapped to 3 (else the table also names 4).
    """
    if list(challenges) in ([], ["GLI"]):
        table = BRATS_LABELS if harmonize_labels else BRATS_LABELS | {"4": "enhancing tumour (ET), BraTS 2021 label"}
        return table, "BraTS glioma (2023 values)"
    return {}, (
        f"as defined by BraTS {'/'.join(challenges)}, not the glioma table; see that sub-challenge's "
        "documentation (data_prep keeps the values as they are)"
    )


_SCHEME_2021 = re.compile(r"^(?P<case>BraTS\d*_[A-Za-z0-9_]+?)_(?P<mod>t1ce|t1|t2|flair|seg)\.nii(?:\.gz)?$")
_SCHEME_2023 = re.compile(r"^(?P<case>BraTS-[A-Za-z]+-\d+-\d+)-(?P<mod>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$")
_CASE_DIR = re.compile(r"^(BraTS-[A-Za-z]+-\d+-\d+|BraTS\d*_[A-Za-z0-9_]+)$")
_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")


@dataclass
class BratsCase:
    """One BraTS case (one patient, one timepoint) as found on disk.

    Attributes:
        case_id: ``BraTS-GLI-00000-000`` or ``BraTS2021_00000``.
        scheme: ``"2023"`` or ``"2021"`` (the naming scheme it was found in).
        files: modality (``t1n``, ``t1c``, ``t2w``, ``t2f``, ``seg``) -> path.
        duplicates: modality -> every path found for it, where more than one was (the case is then skipped).
    """

    case_id: str
    scheme: str
    files: dict[str, Path] = field(default_factory=dict)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def patient_id(self) -> str:
        """The case id without the BraTS 2023 timepoint suffix (see :func:`patient_id`)."""
        return patient_id(self.case_id)


def patient_id(case_id: str) -> str:
    """The patient a case belongs to: ``BraTS-GLI-00000-001 -> BraTS-GLI-00000``; 2021 ids are returned unchanged.

    Args:
        case_id: a BraTS case id in either naming scheme.
    """
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"case_id must be a non-empty string such as 'BraTS-GLI-00000-000', got {case_id!r}.")
    m = _TIMEPOINT.match(case_id)
    return m.group("patient") if m else case_id


def normalize_modalities(modalities: Iterable[str]) -> list[str]:
    """Map modality names of either BraTS scheme to ``t1n/t1c/t2w/t2f/seg``, in :data:`MODALITIES` order, seg last.

    Args:
        modalities: names such as ``["t1", "flair"]`` or ``["t1n", "t2w", "seg"]`` (case-insensitive).
    """
    if isinstance(modalities, str):
        modalities = [modalities]
    out = set()
    for name in modalities:
        key = str(name).strip().lower()
        if key not in MODALITY_ALIASES:
            raise ValueError(
                f"Unknown modality {name!r}: use {list(MODALITIES) + [SEG]} (BraTS 2023 names) or "
                "t1/t1ce/t2/flair (BraTS 2021 names)."
            )
        out.add(MODALITY_ALIASES[key])
    if not out:
        raise ValueError("modalities is empty: name at least one of t1n, t1c, t2w, t2f, seg, or pass None for all.")
    return [m for m in MODALITIES + (SEG,) if m in out]


def find_cases(src: str | os.PathLike) -> list[BratsCase]:
    """All BraTS cases below ``src`` (any depth), in both naming schemes, sorted by case id.

    Files are grouped by the case id in their *file name* (the folder name is not used). A modality found more than
    once for a case (``.nii`` beside ``.nii.gz``, or the same case extracted twice) is recorded in ``duplicates``.
    An empty folder named like a case (``BraTS-GLI-00000-000/`` with nothing in it) is returned as a case without
    files, so that it is reported instead of silently ignored.

    Args:
        src: the folder the BraTS archive(s) were extracted into.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS source folder {str(root)!r} does not exist or is not a folder.")
    found: dict[str, BratsCase] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath).name
        if (
            dirpath != str(root)
            and _CASE_DIR.match(folder)
            and not any(not f.startswith(".") for f in filenames)
            and not dirnames
        ):
            # an empty case folder (a failed or partial extraction): reported as a case with no files
            found.setdefault(folder, BratsCase(folder, "2023" if folder.startswith("BraTS-") else "2021"))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            m = _SCHEME_2023.match(name)
            scheme = "2023"
            if m is None:
                m = _SCHEME_2021.match(name)
                scheme = "2021"
            if m is None:
                continue
            case_id, mod = m.group("case"), MODALITY_ALIASES[m.group("mod")]
            case = found.setdefault(case_id, BratsCase(case_id, scheme))
            path = Path(dirpath) / name
            if mod in case.files:
                case.duplicates.setdefault(mod, [case.files[mod]]).append(path)
            else:
                case.files[mod] = path
    return [found[k] for k in sorted(found)]
