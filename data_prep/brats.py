"""BraTS preparation: raw NIfTI downloads in, preprocessed NIfTI volumes and a MONAI datalist out.

    python -m data_prep.brats --src RAW --dst OUT [--preset wdm] [--pool 2] [--modalities t1n t2w] ...

Case discovery (any depth below ``--src``; hidden files are ignored):

- BraTS 2021 and earlier: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``
  (also ``BraTS20_Training_001_t1.nii.gz`` and the like);
- BraTS 2023 and later: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, any sub-challenge
  prefix (``BraTS-MEN-``, ``BraTS-PED-``, ``BraTS-SSA-``, ``BraTS-MET-``, ...). The datalist names the label values
  (``labels``) only for glioma data (GLI, 2021); other sub-challenges use the same values for other regions, so
  their ``labels`` stay empty and ``label_convention`` says where they are defined (``subchallenges`` lists them).

``.nii`` and ``.nii.gz`` are both accepted. Modalities are renamed to the 2023 names: ``t1 -> t1n``, ``t1ce -> t1c``,
``t2 -> t2w``, ``flair -> t2f``; the label map keeps the key ``seg``.

Preprocessing, one volume at a time (presets in :data:`PRESETS`, every step can be overridden):

1. images only: clip to the ``percentiles`` (0.1 / 99.9 for WDM) computed over the *whole* volume, background
   included, then min-max to [0, 1] (:func:`normalize_intensity`);
2. centre zero-pad, or centre-crop where the volume is larger, to ``spatial_size`` (:func:`pad_or_crop`);
3. average-pool by the integer factor ``pool`` (:func:`pool_volume`); the label map is pooled by ``seg_pool``
   (``"mode"``: the most frequent label of each block, ties to the larger label; ``"max"``; ``"nearest"``), so it
   never gets fractional labels.

The label map is never intensity-normalised and is padded with 0. Each step updates the affine so that it still
says where every voxel is in the world: padding by ``p`` voxels moves the first voxel by ``-p`` voxels along that
axis, cropping ``c`` voxels moves it by ``+c``, and pooling by ``f`` multiplies the voxel size by ``f`` and moves the
first voxel centre by ``(f - 1) / 2`` input voxels. Orientation is kept as in the source (no reorientation).

Outputs: ``OUT/<case>/<case>-<mod>.nii.gz`` (float32 images in [0, 1], uint8 label map), each written to a temporary
file in the same folder and moved into place with ``os.replace``, so a file that exists is complete. The source
folder is only read. A case that is missing a requested modality, an empty case folder, and a case with an
unreadable or inconsistent file (a dangling or self-referencing symlink included) are *failed* (file name and reason
recorded) and the others go on; a case with two files for one modality is *skipped*. ``OUT/prepare_summary.json``
(JSON) and ``OUT/prepare_report.csv`` list every case as done / skipped (why) / failed (why); the command exits with 1
when any case failed.

The output side is checked first: an ``--dst`` that cannot be created or written is one error line naming the path and
the errno (``Permission denied (EACCES)``), exit status 2, before any work and with nothing left behind. A write that
fails later names the output file and the errno, not the source being read, and removes the case's partial outputs.
A full disk (``No space left on device (ENOSPC)``, or a quota) stops the batch with exit status 2: the cases not
started are listed as skipped, no datalist is written, and a re-run after freeing space finishes the rest.

Re-runs: each finished case gets ``OUT/<case>/prepare_record.json`` (written after its volumes) with a fingerprint
of its input files (paths, sizes, modification times) and the per-case settings. A later run skips a case whose
record matches and whose outputs exist (``skipped``, reason ``"up to date"``; it stays in the datalist), and
prepares it again otherwise; ``--overwrite`` prepares everything again. ``--workers N`` prepares cases in N
processes; a tqdm bar shows progress.

Split and datalist: patients (the case id without the BraTS 2023 timepoint suffix, ``BraTS-GLI-00000`` for
``BraTS-GLI-00000-000``) are shuffled with ``seed`` and divided into training / validation / test (0.8 / 0.1 / 0.1 by
default), so all timepoints of a patient land in one split. ``OUT/datalist.json`` holds::

    {"name": "BraTS (prepared by data_prep.brats)", "preset": "wdm", "spatial_size": [128, 128, 128],
     "spacing": [2.0, 2.0, 2.0], "intensity_range": [0.0, 1.0], "modalities": ["t1n", "t2w"], "label_key": "seg",
     "labels": {"0": "background", ...}, "percentiles": [0.1, 99.9], "pool": 2, "split": [0.8, 0.1, 0.1], "seed": 0,
     "numTraining": 13, "numValidation": 2, "numTest": 1,
     "training": [{"case": "BraTS-GLI-00000-000", "patient": "BraTS-GLI-00000",
                   "t1n": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz", "t2w": "...", "seg": "..."}, ...],
     "validation": [...], "test": [...]}

with paths relative to ``OUT``. ``monai.data.load_decathlon_datalist(path, data_list_key="training", base_dir=OUT)``
prefixes ``base_dir`` unconditionally only onto the keys ``image`` and ``label``; onto every other key it does so
only when the joined path exists. So every modality key (and ``seg``) resolves as long as the files are in place,
but two things surprise: a key whose file is missing silently stays relative, and ``case`` itself becomes the
absolute path of the case folder (``OUT/<case>`` exists). It also fails with an IndexError on an empty ``"test"``
list. :func:`load_datalist` wraps it: it checks that every file exists, keeps ``case`` and ``patient`` as ids and
returns ``[]`` for an empty split.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from wdm3d.io.nifti import atomic_write_text, nifti_geometry, save_nifti

from .common import (
    NOT_STARTED,
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
    "MODALITIES",
    "SEG",
    "MODALITY_ALIASES",
    "PRESETS",
    "SEG_POOL_MODES",
    "SPLIT_KEYS",
    "BRATS_LABELS",
    "BratsCase",
    "find_cases",
    "patient_id",
    "subchallenge",
    "normalize_modalities",
    "normalize_intensity",
    "pad_or_crop",
    "pool_volume",
    "preprocess_image",
    "preprocess_label",
    "split_patients",
    "input_fingerprint",
    "read_case_record",
    "write_case_record",
    "run_cases",
    "write_report",
    "prepare_brats",
    "load_datalist",
    "main",
]

logger = logging.getLogger(__name__)

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
#: Preprocessing presets (REFERENCE section 1): WDM pads 240x240x155 to 256^3 (``pool=2`` gives 128^3); cWDM
#: crops/pads to 224x224x160. Both clip at the 0.1 / 99.9 percentiles and scale to [0, 1].
PRESETS: dict[str, dict[str, Any]] = {
    "wdm": {"percentiles": (0.1, 99.9), "spatial_size": (256, 256, 256), "pool": 1},
    "cwdm": {"percentiles": (0.1, 99.9), "spatial_size": (224, 224, 160), "pool": 1},
}
#: How the label map is pooled (never averaged).
SEG_POOL_MODES: tuple[str, ...] = ("mode", "max", "nearest")
#: The splits of the datalist, in the order of ``split`` fractions.
SPLIT_KEYS: tuple[str, ...] = ("training", "validation", "test")
#: BraTS 2023 glioma label convention (BraTS 2021 used 4 for ET; it is mapped to 3 unless told otherwise).
BRATS_LABELS: dict[str, str] = {
    "0": "background",
    "1": "necrotic tumour core (NCR)",
    "2": "peritumoral oedema (ED)",
    "3": "enhancing tumour (ET)",
}

def subchallenge(case_id: str) -> str:
    """``BraTS-PED-00001-000 -> "PED"``; BraTS 2021 ids (``BraTS2021_00000``) are the glioma challenge, ``"GLI"``."""
    m = re.match(r"^BraTS-([A-Za-z]+)-", case_id)
    return m.group(1).upper() if m else "GLI"


def _labels(challenges: Sequence[str], harmonize_labels: bool) -> tuple[dict[str, str], str]:
    """The datalist's label table and convention: the glioma table for GLI data; for other sub-challenges (whose
    values name other regions: e.g. the paediatric set has a label 4) no guessed names, only where to look."""
    if list(challenges) in ([], ["GLI"]):
        table = BRATS_LABELS if harmonize_labels else BRATS_LABELS | {"4": "enhancing tumour (ET), BraTS 2021 label"}
        return table, "BraTS glioma (2023 values)"
    return {}, (f"as defined by BraTS {'/'.join(challenges)}, not the glioma table; see that sub-challenge's "
                "documentation (data_prep keeps the values as they are)")


_SCHEME_2021 = re.compile(r"^(?P<case>BraTS\d*_[A-Za-z0-9_]+?)_(?P<mod>t1ce|t1|t2|flair|seg)\.nii(?:\.gz)?$")
_SCHEME_2023 = re.compile(r"^(?P<case>BraTS-[A-Za-z]+-\d+-\d+)-(?P<mod>t1n|t1c|t2w|t2f|seg)\.nii(?:\.gz)?$")
_CASE_DIR = re.compile(r"^(BraTS-[A-Za-z]+-\d+-\d+|BraTS\d*_[A-Za-z0-9_]+)$")
_TIMEPOINT = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$")


# --------------------------------------------------------------------------------------------------------------------
# case discovery
# --------------------------------------------------------------------------------------------------------------------


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
        if dirpath != str(root) and _CASE_DIR.match(folder) and not any(not f.startswith(".") for f in filenames) \
                and not dirnames:
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


# --------------------------------------------------------------------------------------------------------------------
# preprocessing maths (pure functions on arrays + affines)
# --------------------------------------------------------------------------------------------------------------------


def _check_array3d(x: np.ndarray, name: str) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 3D numpy array (X, Y, Z), got {type(x).__name__} with shape {shape}.")


def _check_affine(affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 voxel-to-world matrix, got shape {a.shape}.")
    return a


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ValueError(
            f"percentiles must be two numbers (low, high) such as (0.1, 99.9), got {percentiles!r}."
        ) from None
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= low < high <= 100, got ({lo}, {hi}); (0, 100) disables clipping."
        )
    return lo, hi


def _check_spatial_size(spatial_size: Sequence[int]) -> tuple[int, int, int]:
    try:
        size = tuple(int(s) for s in spatial_size)
    except (TypeError, ValueError):
        raise ValueError(f"spatial_size must be three integers (X, Y, Z), got {spatial_size!r}.") from None
    fractional = any(float(s) != float(o) for s, o in zip(size, spatial_size))
    if len(size) != 3 or any(s == 0 or s < -1 for s in size) or fractional:
        raise ValueError(
            f"spatial_size must be three positive integers (X, Y, Z), -1 keeping that axis as it is, "
            f"got {spatial_size!r}."
        )
    return size  # type: ignore[return-value]


def _check_pool(pool: int) -> int:
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1:
        raise ValueError(f"pool must be an integer >= 1 (1: no pooling, 2: 256^3 -> 128^3), got {pool!r}.")
    return int(pool)


def normalize_intensity(x: np.ndarray, percentiles: Sequence[float] = (0.1, 99.9)) -> np.ndarray:
    """Clip to percentiles of the whole volume (background included), then min-max to [0, 1] (WDM's preprocessing).

    Args:
        x: image, any shape, real-valued and finite.
        percentiles: ``(low, high)`` in [0, 100]; the clip bounds are ``np.percentile(x, low)`` and
            ``np.percentile(x, high)`` (linear interpolation). ``(0, 100)`` is a plain min-max.

    Returns:
        float32 array of the same shape in [0, 1]; all zeros when the clipped volume is constant.
    """
    lo_p, hi_p = _check_percentiles(percentiles)
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError("normalize_intensity got an empty array.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the image has {int(np.size(x) - np.isfinite(x).sum())} non-finite values (NaN/inf).")
    lo, hi = (float(v) for v in np.percentile(x, (lo_p, hi_p)))
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = (np.clip(x.astype(np.float64, copy=False), lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32)


def pad_or_crop(
    x: np.ndarray, affine: np.ndarray, spatial_size: Sequence[int], value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-pad (with ``value``) or centre-crop each axis of ``x`` to ``spatial_size``, and move the affine with it.

    Where ``n`` voxels become ``s``: padding puts ``(s - n) // 2`` voxels before and the rest after; cropping drops
    ``(n - s) // 2`` voxels before. The new first voxel is old voxel ``-pad_before`` (or ``+crop_before``), so the
    new affine is ``affine @ translate(offset)`` and every kept voxel keeps its world position.

    Args:
        x: ``(X, Y, Z)`` array.
        affine: its 4x4 voxel-to-world matrix.
        spatial_size: target ``(X, Y, Z)``; ``-1`` keeps that axis.
        value: the padding value (0: background after [0, 1] scaling, and the label map's background).

    Returns:
        ``(array of shape spatial_size, new 4x4 affine)``.
    """
    _check_array3d(x, "x")
    affine = _check_affine(affine)
    size = _check_spatial_size(spatial_size)
    offset = np.zeros(3)
    crop, pad = [], []
    for ax, (n, s) in enumerate(zip(x.shape, size)):
        s = n if s == -1 else s
        if s <= n:
            start = (n - s) // 2
            crop.append(slice(start, start + s))
            pad.append((0, 0))
            offset[ax] = start
        else:
            before = (s - n) // 2
            crop.append(slice(None))
            pad.append((before, s - n - before))
            offset[ax] = -before
    out = x[tuple(crop)]
    if any(p != (0, 0) for p in pad):
        out = np.pad(out, pad, mode="constant", constant_values=value)
    shift = np.eye(4)
    shift[:3, 3] = offset
    return np.ascontiguousarray(out), affine @ shift


def pool_volume(
    x: np.ndarray, affine: np.ndarray, factor: int, mode: str = "mean", pad_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pool non-overlapping ``factor^3`` blocks: ``(X, Y, Z) -> (X/f, Y/f, Z/f)``, and update the affine.

    Output voxel ``j`` covers input voxels ``f*j .. f*j + f - 1``, so its centre is input voxel ``f*j + (f - 1)/2``:
    the new affine is ``affine @ [[f, 0, 0, (f-1)/2], [0, f, 0, (f-1)/2], [0, 0, f, (f-1)/2], [0, 0, 0, 1]]``
    (voxel size times ``f``, first centre moved by half a block). An axis that is not a multiple of ``f`` is padded
    at its end with ``pad_value`` first (which does not move the affine).

    Args:
        x: ``(X, Y, Z)`` array.
        affine: its 4x4 voxel-to-world matrix.
        factor: integer block size ``f`` >= 1 (1 returns the input unchanged).
        mode: ``"mean"`` (images), or for label maps ``"mode"`` (most frequent label of the block, ties to the
            larger label, so small lesions are not erased by a tie with background), ``"max"``, or ``"nearest"``
            (the voxel at offset ``f // 2`` in each block, the one nearest the block centre).
        pad_value: value of the end padding.

    Returns:
        ``(pooled array, new 4x4 affine)``; ``"mean"`` gives float32, the label modes keep the input dtype.
    """
    _check_array3d(x, "x")
    affine = _check_affine(affine)
    f = _check_pool(factor)
    if mode not in ("mean",) + SEG_POOL_MODES:
        raise ValueError(f"mode must be 'mean' (images) or one of {SEG_POOL_MODES} (label maps), got {mode!r}.")
    if f == 1:
        return x, affine
    extra = [(0, (-n) % f) for n in x.shape]
    if any(e for _, e in extra):
        x = np.pad(x, extra, mode="constant", constant_values=pad_value)
    X, Y, Z = (n // f for n in x.shape)
    if mode == "nearest":
        o = f // 2
        out = x[o::f, o::f, o::f]
    else:
        blocks = x.reshape(X, f, Y, f, Z, f)
        if mode == "mean":
            out = blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
        elif mode == "max":
            out = blocks.max(axis=(1, 3, 5))
        else:
            blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(X, Y, Z, f**3)
            out = np.zeros((X, Y, Z), dtype=x.dtype)
            best = np.full((X, Y, Z), -1, dtype=np.int32)
            for label in np.unique(x)[::-1]:  # descending, and strict '>' below: ties go to the larger label
                count = np.count_nonzero(blocks == label, axis=-1)
                better = count > best
                out[better] = label
                best[better] = count[better]
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    return np.ascontiguousarray(out), affine @ scale


def preprocess_image(
    x: np.ndarray,
    affine: np.ndarray,
    percentiles: Sequence[float] = (0.1, 99.9),
    spatial_size: Sequence[int] | None = (256, 256, 256),
    pool: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The full image chain: :func:`normalize_intensity`, :func:`pad_or_crop` (with 0), :func:`pool_volume` (mean).

    Args:
        x: ``(X, Y, Z)`` image in scanner units.
        affine: its 4x4 voxel-to-world matrix.
        percentiles: clip percentiles, see :func:`normalize_intensity`.
        spatial_size: size after padding/cropping, before pooling; None keeps the input size.
        pool: average-pooling factor (256^3 with ``pool=2`` gives 128^3).

    Returns:
        ``(float32 array in [0, 1] of shape spatial_size / pool, affine)``.
    """
    _check_array3d(x, "x")
    out = normalize_intensity(x, percentiles)
    if spatial_size is not None:
        out, affine = pad_or_crop(out, affine, spatial_size, value=0.0)
    return pool_volume(out, affine, pool, mode="mean")


def preprocess_label(
    seg: np.ndarray,
    affine: np.ndarray,
    spatial_size: Sequence[int] | None = (256, 256, 256),
    pool: int = 1,
    seg_pool: str = "mode",
    label_map: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The label-map chain: check integer labels, optional relabelling, pad with 0 / crop, pool without averaging.

    Args:
        seg: ``(X, Y, Z)`` label map with integer values in 0..255 (stored as any dtype).
        affine: its 4x4 voxel-to-world matrix.
        spatial_size: as in :func:`preprocess_image`.
        pool: pooling factor.
        seg_pool: ``"mode"``, ``"max"`` or ``"nearest"`` (see :func:`pool_volume`).
        label_map: optional ``{old: new}`` relabelling (``{4: 3}`` turns BraTS 2021 ET into the 2023 label).

    Returns:
        ``(uint8 array of shape spatial_size / pool, affine)``.
    """
    _check_array3d(seg, "seg")
    if seg_pool not in SEG_POOL_MODES:
        raise ValueError(f"seg_pool must be one of {SEG_POOL_MODES}, got {seg_pool!r}.")
    values = np.asarray(seg)
    if not np.all(np.isfinite(values)):
        raise ValueError("the label map has non-finite values (NaN/inf).")
    rounded = np.rint(values)
    if not np.array_equal(rounded, values) or rounded.min() < 0 or rounded.max() > 255:
        raise ValueError(
            f"the label map must hold integer labels in 0..255, got values in [{values.min()}, {values.max()}]"
            + ("" if np.array_equal(rounded, values) else " with fractional values")
            + "; is this file an image rather than a segmentation?"
        )
    out = rounded.astype(np.uint8)
    if label_map:
        lut = np.arange(256, dtype=np.uint8)
        for old, new in label_map.items():
            lut[int(old)] = int(new)
        out = lut[out]
    if spatial_size is not None:
        out, affine = pad_or_crop(out, affine, spatial_size, value=0)
    return pool_volume(out, affine, pool, mode=seg_pool, pad_value=0)


# --------------------------------------------------------------------------------------------------------------------
# patient-level split
# --------------------------------------------------------------------------------------------------------------------


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise ValueError(f"split must be three fractions (training, validation, test), got {split!r}.") from None
    if len(fr) != 3 or any(not np.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-3:
        raise ValueError(
            f"split must be three non-negative fractions (training, validation, test) summing to 1, got {split!r} "
            "(e.g. 0.8 0.1 0.1, or 1 0 0 for everything in training)."
        )
    return fr  # type: ignore[return-value]


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder counts, then at least one per non-zero fraction where ``n`` allows (training first)."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (-(raw[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    for k, f in enumerate(fractions):
        if f > 0 and counts[k] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[k] += 1
    return counts


def split_patients(
    patient_ids: Iterable[str], split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[str]]:
    """Seeded patient-level split into :data:`SPLIT_KEYS`.

    The sorted unique ids are shuffled with ``numpy.random.default_rng(seed)`` and cut into consecutive parts of
    sizes ``round(n * fraction)`` (largest remainder). With few patients every non-zero fraction still gets one
    patient where possible, training first, then validation, then test (2 patients at 0.8/0.1/0.1 give 1/1/0).

    Args:
        patient_ids: patient ids (duplicates are ignored).
        split: fractions ``(training, validation, test)``, non-negative, summing to 1.
        seed: shuffling seed; the same ids and seed always give the same split.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each sorted.
    """
    fractions = _check_split(split)
    ids = sorted(set(patient_ids))
    rng = np.random.default_rng(int(seed))
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    counts = _split_counts(len(ids), fractions)
    out, start = {}, 0
    for key, c in zip(SPLIT_KEYS, counts):
        out[key] = sorted(shuffled[start : start + c])
        start += c
    return out


# --------------------------------------------------------------------------------------------------------------------
# file I/O
# --------------------------------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]:
    """Read a NIfTI volume fully (so truncated files fail here): ``(data as stored, affine, (qform, sform) codes,
    qform matrix)``; the qform is kept apart because it may differ from the sform (``affine``)."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    affine, codes, qform = nifti_geometry(img)
    return data, affine, codes, qform


def _write_nifti(data: np.ndarray, affine: np.ndarray, path: Path, codes: tuple[int, int] = (1, 1),
                 qform: np.ndarray | None = None) -> None:
    """Write ``data`` atomically, keeping its dtype and the given (qform, sform) codes (and qform matrix)."""
    save_nifti(data, affine, path, dtype=data.dtype, codes=codes, qform=qform)


def _write_json(obj: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _spacing(affine: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


# --------------------------------------------------------------------------------------------------------------------
# re-runs, reports and the parallel case loop (shared with data_prep.lidc)
# --------------------------------------------------------------------------------------------------------------------

#: Per-case record written last into each prepared case folder: its existence means the case is complete.
RECORD_NAME = "prepare_record.json"
#: The run summary (JSON, every case with its status) and the same per-case listing as CSV, in ``dst``.
SUMMARY_NAME = "prepare_summary.json"
REPORT_CSV_NAME = "prepare_report.csv"
#: Columns of the CSV report.
REPORT_COLUMNS: tuple[str, ...] = ("case", "patient", "status", "reason", "file", "outputs")
#: Reason recorded for a case skipped because its outputs are current.
UP_TO_DATE = "up to date"


def input_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """A fingerprint of input files from their absolute paths, sizes and modification times (no content read).

    Re-running a preparation compares it with the one recorded beside the outputs: any file added, removed, replaced
    or touched changes it, and the case is prepared again.

    Args:
        paths: the input files of one case.

    Raises:
        OSError: a file cannot be stat'ed (missing, a dangling symlink, a symlink loop: ``ELOOP``), with its path.
    """
    import hashlib

    h = hashlib.sha256()
    resolved = []
    for p in paths:
        try:
            resolved.append(str(Path(p).resolve()))
        except RuntimeError:  # Python < 3.13 reports a symlink loop so; make it the OSError of any unreadable file
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(p)) from None
    for path in sorted(resolved):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_case_record(out_dir: Path, fingerprint: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished case in ``out_dir`` if it matches ``fingerprint`` and ``settings`` and every output
    it lists still exists (paths relative to ``out_dir.parent``); None otherwise (the case must be prepared)."""
    path = out_dir / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if json.loads(json.dumps(settings)) != record.get("settings"):
        return None
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return None
    if not all((out_dir.parent / rel).is_file() for rel in outputs.values()):
        return None
    return record


def write_case_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``out_dir/prepare_record.json`` atomically (after the outputs, so it is the completion mark)."""
    _write_json(record, out_dir / RECORD_NAME)


def run_cases(
    fn: Any,
    jobs: Sequence[tuple[str, tuple]],
    workers: int,
    desc: str,
    progress: bool,
    crashed: Any,
    stop: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``fn(*args)`` for every ``(key, args)`` job, in ``workers`` processes, with a tqdm bar.

    ``fn`` must return a record and never raise for a bad case; a worker that crashes anyway is turned into a
    record by ``crashed(key, error)``, so one case never stops the batch. A worker process that dies (killed, e.g.
    by the out-of-memory killer) breaks the pool and with it every unfinished case: those are run again, each in a
    pool of its own, and only a case whose worker dies again is failed.

    Args:
        fn: the per-case function (module level, so worker processes can pickle it).
        jobs: ``(key, args)`` per case.
        workers: processes (1: in this process).
        desc: label of the progress bar.
        progress: show the progress bar.
        crashed: ``crashed(key, error) -> record`` for a case whose ``fn`` raised or whose worker died twice.
        stop: ``stop(record) -> True`` ends the batch after that case (e.g. a full disk, see
            :func:`data_prep.common.stops_batch`): no further case is started; cases already running finish.

    Returns:
        ``{key: record}`` for every case that ran; after a ``stop``, the cases never started are absent.
    """
    records: dict[str, dict[str, Any]] = {}
    stopped = False

    def finished(key: str) -> bool:
        nonlocal stopped
        stopped = stopped or (stop is not None and bool(stop(records[key])))
        return stopped

    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            for key, args in jobs:
                try:
                    records[key] = fn(*args)
                except Exception as err:  # noqa: BLE001 - reported like a failed case
                    records[key] = crashed(key, err)
                bar.update()
                if finished(key):
                    break
        else:
            broken = []
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool_exec:
                futures = {pool_exec.submit(fn, *args): key for key, args in jobs}
                for fut in as_completed(futures):
                    key = futures[fut]
                    if fut.cancelled():
                        continue
                    try:
                        records[key] = fut.result()
                    except BrokenProcessPool:
                        broken.append(key)  # this case, or another one in the pool, killed a worker
                        continue
                    except Exception as err:  # noqa: BLE001 - a crashed worker is reported like a failed case
                        records[key] = crashed(key, err)
                    bar.update()
                    if finished(key):
                        for other in futures:
                            other.cancel()  # only cases not yet handed to a worker can be cancelled
            args_of = dict(jobs)
            for key in broken:
                if stopped:
                    break
                with ProcessPoolExecutor(max_workers=1) as alone:
                    try:
                        records[key] = alone.submit(fn, *args_of[key]).result()
                    except BrokenProcessPool:
                        records[key] = crashed(key, RuntimeError(
                            "its worker process died (killed, e.g. by the out-of-memory killer; try fewer workers)"))
                    except Exception as err:  # noqa: BLE001
                        records[key] = crashed(key, err)
                bar.update()
                finished(key)
    finally:
        bar.close()
    return records


def write_report(rows: Sequence[dict[str, Any]], dst: Path) -> Path:
    """Write ``dst/prepare_report.csv``: one row per case with :data:`REPORT_COLUMNS` (outputs joined by ``;``)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        outputs = r.get("outputs") or {}
        writer.writerow({
            "case": r.get("case", ""), "patient": r.get("patient", ""), "status": r.get("status", ""),
            "reason": r.get("reason", ""), "file": r.get("file", ""),
            "outputs": ";".join(f"{k}={v}" for k, v in outputs.items()),
        })
    return atomic_write_text(dst / REPORT_CSV_NAME, buf.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------------------------


def _process_case(
    case: BratsCase, modalities: list[str], dst: str, settings: dict[str, Any], fingerprint: str = ""
) -> dict[str, Any]:
    """Prepare one case; never raises for a bad case: returns a record with status done / skipped / failed.

    A done case gets ``OUT/<case>/prepare_record.json`` (input ``fingerprint``, settings, outputs), written last. A
    failed write (full disk, permissions) names the output path and the errno (:func:`data_prep.common.write_failure`),
    not the source being read; the case's outputs written so far are removed.

    Args:
        case: the case as found by :func:`find_cases`.
        modalities: the modalities to prepare (normalised names).
        dst: the output folder.
        settings: the per-case settings (preset values, ``seg_pool``, ``harmonize_labels``).
        fingerprint: :func:`input_fingerprint` of the case's files, stored in its record.
    """
    record: dict[str, Any] = {"case": case.case_id, "patient": case.patient_id}
    dups = {m: p for m, p in case.duplicates.items() if m in modalities}
    if dups:
        listing = "; ".join(f"{m}: {', '.join(str(x) for x in paths)}" for m, paths in dups.items())
        return record | {"status": "skipped", "reason": f"more than one file for the same modality ({listing})"}
    if not case.files:
        return record | {"status": "failed", "file": str(case.case_id), "reason": "empty case folder: no BraTS files"}
    missing = [m for m in modalities if m not in case.files]
    if missing:
        folder = sorted({str(p.parent) for p in case.files.values()})[0]
        return record | {"status": "failed", "file": folder, "reason": f"missing modalities {missing}"}

    # read and check every file before anything is written, so a corrupt file leaves no half-written case
    volumes: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]] = {}
    for mod in modalities:
        path = case.files[mod]
        try:
            data, affine, codes, qform = _read(path)
            volumes[mod] = (data if mod == SEG else data.astype(np.float32, copy=False), affine, codes, qform)
        except Exception as err:  # noqa: BLE001 - any reader error is reported per file
            return record | {"status": "failed", "file": str(path), "reason": f"{type(err).__name__}: {err}"}
    ref_mod = modalities[0]
    ref_shape, ref_affine = volumes[ref_mod][0].shape, volumes[ref_mod][1]
    for mod in modalities[1:]:
        data, affine, _, _ = volumes[mod]
        if data.shape != ref_shape or not np.allclose(affine, ref_affine, atol=1e-3):
            return record | {
                "status": "failed",
                "file": str(case.files[mod]),
                "reason": (
                    f"not on the same voxel grid as {ref_mod}: shape {data.shape} vs {ref_shape}, affine "
                    f"{np.round(affine, 3).tolist()} vs {np.round(ref_affine, 3).tolist()}; the modalities of a case "
                    "must be co-registered"
                ),
            }

    out_dir = Path(dst) / case.case_id
    label_map = {4: 3} if (case.scheme == "2021" and settings["harmonize_labels"]) else None
    written: list[Path] = []
    outputs: dict[str, str] = {}
    current = ""
    writing: Path | None = None  # the output being written: an OSError while it is set is the destination's fault
    try:
        writing = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        writing = out_dir / RECORD_NAME
        writing.unlink(missing_ok=True)  # the case is incomplete until the record is written again
        writing = None
        for mod in modalities:
            current = str(case.files[mod])
            data, affine, codes, qform = volumes.pop(mod)
            if mod == SEG:
                out, out_affine = preprocess_label(
                    data, affine, settings["spatial_size"], settings["pool"], settings["seg_pool"], label_map
                )
            else:
                out, out_affine = preprocess_image(
                    data, affine, settings["percentiles"], settings["spatial_size"],
                    settings["pool"],
                )
            del data
            path = out_dir / f"{case.case_id}-{mod}.nii.gz"
            # every step moves the affine by a right factor (affine @ M), so the qform moves by the same M
            qform_out = qform @ np.linalg.solve(affine, out_affine)
            writing = path
            _write_nifti(out, out_affine, path, codes, qform_out)
            writing = None
            written.append(path)
            outputs[mod] = f"{case.case_id}/{path.name}"
        result = {"status": "done", "outputs": outputs, "shape": list(out.shape), "spacing": _spacing(out_affine)}
        writing = out_dir / RECORD_NAME
        write_case_record(out_dir, record | result | {"fingerprint": fingerprint, "settings": settings})
    except Exception as err:  # noqa: BLE001 - report, remove this case's partial outputs, go on with the others
        _remove_partial(out_dir, written)
        if writing is not None and isinstance(err, OSError):
            return write_failure(record, writing, err)
        return record | {"status": "failed", "file": current, "reason": f"{type(err).__name__}: {err}"}
    return record | result


def _remove_partial(out_dir: Path, written: Sequence[Path]) -> None:
    """Remove a failed case's outputs and its folder if that is then empty; best effort, as the failure being
    reported (e.g. a permission error) may also prevent the clean-up."""
    for path in written:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            logger.warning("could not remove the partial output %s: %s", path, os_error_text(err))
    try:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------------------------
# the whole dataset
# --------------------------------------------------------------------------------------------------------------------


def _same_or_none(values: list[list[float]], tol: float = 1e-3) -> list[float] | None:
    if not values:
        return None
    first = np.asarray(values[0], dtype=np.float64)
    if all(np.allclose(np.asarray(v, dtype=np.float64), first, atol=tol) for v in values):
        return [float(v) for v in values[0]]
    return None


def _stopped_by_full_disk(
    full: dict[str, Any], summary: dict[str, Any], rows: Sequence[dict[str, Any]], dst: Path, noun: str,
    waiting: int,
) -> OutputError:
    """Write the report and summary of a batch stopped by a full disk (if they still fit) and return the error to
    raise. No datalist is written: the batch is incomplete, and the next run writes it.

    Args:
        full: the record of the case whose write ran out of space (:func:`data_prep.common.write_failure`).
        summary: the run summary so far.
        rows: every case's record, for the CSV report.
        dst: the output folder.
        noun: what a case is called in the message (``"cases"``, ``"patients"``).
        waiting: how many cases were not started.
    """
    done = summary["counts"]["done"]
    try:
        write_report(rows, dst)
        _write_json(summary, dst / SUMMARY_NAME)
        also = f"; see {dst / SUMMARY_NAME}"
    except OSError as err:
        also = f"; the report could not be written either ({os_error_text(err)})"
    return OutputError(
        f"{full['reason']}; the batch stopped there ({done} {noun} done, {waiting} not started): free space and run "
        f"again, finished {noun} are kept and skipped as up to date{also}",
        getattr(errno, full.get("errno") or "", None),
    )


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def prepare_brats(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    preset: str = "wdm",
    percentiles: Sequence[float] | None = None,
    spatial_size: Sequence[int] | None = None,
    pool: int | None = None,
    seg_pool: str = "mode",
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    harmonize_labels: bool = True,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare every BraTS case below ``src`` into ``dst``: NIfTI volumes, ``datalist.json``, ``prepare_summary.json``
    and ``prepare_report.csv``.

    Args:
        src: folder with the extracted BraTS download(s) (either naming scheme, any depth). Only read.
        dst: output folder (created); must not be inside ``src`` nor contain it.
        modalities: which of ``t1n, t1c, t2w, t2f, seg`` to prepare (2021 names accepted); None: every modality
            found in any case. A case that lacks one of them is skipped and reported.
        preset: ``"wdm"`` (clip 0.1/99.9 percentiles, [0, 1], pad to 256^3) or ``"cwdm"`` (224x224x160), see
            :data:`PRESETS`; the next three arguments override single steps of it.
        percentiles: clip percentiles ``(low, high)``; None: the preset's. ``(0, 100)`` means no clipping.
        spatial_size: size ``(X, Y, Z)`` after centre padding/cropping and before pooling; ``-1`` keeps an axis;
            None: the preset's.
        pool: average-pooling factor (2: 256^3 -> 128^3); None: the preset's (1).
        seg_pool: how the label map is pooled: ``"mode"`` (default), ``"max"`` or ``"nearest"``.
        split: fractions ``(training, validation, test)`` of *patients*, summing to 1.
        seed: seed of the patient shuffle.
        harmonize_labels: map BraTS 2021 label 4 (ET) to 3, the BraTS 2023 label, so all cases share one convention.
        workers: processes preparing cases in parallel (1: in this process).
        progress: show a tqdm bar and print where the output went.
        overwrite: prepare every case again; by default a case whose ``prepare_record.json`` matches the current
            input fingerprint (paths, sizes, modification times) and per-case settings, and whose outputs all exist,
            is skipped with the reason ``"up to date"`` (and still listed in the datalist).

    Returns:
        The summary (also written to ``dst/prepare_summary.json``): ``settings``, ``counts`` (found / done / skipped /
        failed), ``done`` (case ids), ``skipped`` (``{"case", "reason"}``), ``failed`` (``{"case", "file", "reason"}``),
        ``cases`` (every case: ``case``, ``patient``, ``status``, ``reason``, ``file``, ``outputs``), ``splits`` (cases
        per split), ``datalist`` (its path), ``report_csv`` and ``seconds``. A missing modality, an empty case folder
        and an unreadable or inconsistent file are failures; duplicated files and up-to-date cases are skips.

    Raises:
        FileNotFoundError: ``src`` is not a folder, or holds no BraTS-named files.
        ValueError: an argument is invalid, or ``dst`` overlaps ``src``.
        OutputError: ``dst`` cannot be written (checked before any work), a report cannot be written, or the disk
            filled up (ENOSPC / EDQUOT): the batch then stops after that case, the summary lists the cases not started,
            and no datalist is written. The message names the path and the errno.
        RuntimeError: cases were found but none could be prepared (the summary is still written).
    """
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    cfg = dict(PRESETS[preset])
    if percentiles is not None:
        cfg["percentiles"] = percentiles
    if spatial_size is not None:
        cfg["spatial_size"] = spatial_size
    if pool is not None:
        cfg["pool"] = pool
    cfg["percentiles"] = _check_percentiles(cfg["percentiles"])
    cfg["spatial_size"] = _check_spatial_size(cfg["spatial_size"])
    cfg["pool"] = _check_pool(cfg["pool"])
    bad = [s for s in cfg["spatial_size"] if s != -1 and s % cfg["pool"]]
    if bad:
        raise ValueError(
            f"spatial_size {list(cfg['spatial_size'])} is not divisible by pool={cfg['pool']}; choose a size that "
            "is a multiple of the pooling factor (e.g. 256 with pool 2)."
        )
    if seg_pool not in SEG_POOL_MODES:
        raise ValueError(f"seg_pool must be one of {SEG_POOL_MODES}, got {seg_pool!r}.")
    fractions = _check_split(split)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    wanted = normalize_modalities(modalities) if modalities is not None else None

    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if not src_path.is_dir():
        raise FileNotFoundError(f"BraTS source folder {str(src)!r} does not exist or is not a folder.")
    if _is_within(dst_path, src_path) or _is_within(src_path, dst_path):
        raise ValueError(
            f"dst {str(dst_path)!r} and src {str(src_path)!r} overlap; write the prepared data to a folder outside "
            "the raw download (the source is never modified)."
        )
    check_output_dir(dst_path)  # before any work: an unwritable dst is one clear error, not a failure per case
    cases = find_cases(src_path)
    if not cases:
        raise FileNotFoundError(
            f"No BraTS files found below {str(src_path)!r}. Expected names like "
            "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz (2023+) or "
            "BraTS2021_00000/BraTS2021_00000_t1.nii.gz (2021 and earlier)."
        )
    if wanted is None:
        present = {m for c in cases for m in c.files}
        wanted = [m for m in MODALITIES + (SEG,) if m in present]
    settings = {
        "preset": preset,
        "modalities": wanted,
        "percentiles": list(cfg["percentiles"]),
        "spatial_size": list(cfg["spatial_size"]),
        "pool": cfg["pool"],
        "seg_pool": seg_pool,
        "harmonize_labels": bool(harmonize_labels),
        "split": list(fractions),
        "seed": int(seed),
    }
    make_output_dir(dst_path)
    case_settings = {k: v for k, v in settings.items() if k not in ("split", "seed")}  # what a case's output depends on

    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for case in cases:
        try:
            fingerprint = input_fingerprint(case.files.values()) if case.files else ""
        except Exception as err:  # noqa: BLE001 - e.g. a dangling or looping symlink: this case fails, others go on
            records[case.case_id] = {
                "case": case.case_id, "patient": case.patient_id, "status": "failed",
                "file": str(getattr(err, "filename", None) or ""),
                "reason": f"cannot read the file: {os_error_text(err)}",
            }
            continue
        previous = None if overwrite or not fingerprint else read_case_record(
            dst_path / case.case_id, fingerprint, case_settings)
        if previous is not None:
            records[case.case_id] = {
                "case": case.case_id, "patient": case.patient_id, "status": "skipped", "reason": UP_TO_DATE,
                "outputs": previous["outputs"], "shape": previous["shape"], "spacing": previous["spacing"],
            }
        else:
            jobs.append((case.case_id, (case, wanted, str(dst_path), case_settings, fingerprint)))
    patients = {c.case_id: c.patient_id for c in cases}
    # A full disk stops the batch (exit status 2) instead of following the per-case rule "report and go on": every
    # further case would read and preprocess its volumes only to fail on the same full disk, and the report would
    # bury the one cause under identical failures. Cases done so far are kept and a re-run after freeing space skips
    # them as up to date, so stopping loses nothing.
    records |= run_cases(
        _process_case, jobs, workers, "BraTS cases", progress,
        lambda key, err: {"case": key, "patient": patients[key], "status": "failed", "file": "",
                          "reason": f"worker error {type(err).__name__}: {err}"},
        stop=stops_batch,
    )
    full = next((records[key] for key, _ in jobs if key in records and stops_batch(records[key])), None)
    waiting = [key for key, _ in jobs if key not in records] if full is not None else []
    for key in waiting:
        records[key] = not_started({"case": key, "patient": patients[key]}, full)

    ordered = [records[c.case_id] for c in cases]
    current = [r for r in ordered if r["status"] == "done" or r.get("reason") == UP_TO_DATE]
    done = [r for r in ordered if r["status"] == "done"]
    skipped = [{"case": r["case"], "reason": r["reason"]} for r in ordered if r["status"] == "skipped"]
    failed = [{"case": r["case"], "file": r["file"], "reason": r["reason"]} for r in ordered if r["status"] == "failed"]
    for entry in skipped:
        if entry["reason"] != UP_TO_DATE and not entry["reason"].startswith(NOT_STARTED):  # those: one error line
            logger.warning("skipped %s: %s", entry["case"], entry["reason"])
    for entry in failed:
        logger.warning("failed %s (%s): %s", entry["case"], entry["file"], entry["reason"])

    datalist_path = dst_path / "datalist.json"
    summary: dict[str, Any] = {
        "src": str(src_path),
        "dst": str(dst_path),
        "datalist": str(datalist_path) if current and full is None else None,
        "report_csv": str(dst_path / REPORT_CSV_NAME),
        "settings": settings,
        "counts": {"found": len(cases), "done": len(done), "skipped": len(skipped), "failed": len(failed)},
        "done": [r["case"] for r in done],
        "skipped": skipped,
        "failed": failed,
        "cases": [{k: r.get(k, "") for k in REPORT_COLUMNS} for r in ordered],
    }
    if full is not None:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        raise _stopped_by_full_disk(full, summary, ordered, dst_path, "cases", len(waiting))
    with writing_output(dst_path / REPORT_CSV_NAME):
        write_report(ordered, dst_path)
    if not current:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        with writing_output(dst_path / SUMMARY_NAME):
            _write_json(summary, dst_path / SUMMARY_NAME)
        raise RuntimeError(
            f"None of the {len(cases)} BraTS cases below {str(src_path)!r} could be prepared "
            f"({len(skipped)} skipped, {len(failed)} failed); see {dst_path / 'prepare_summary.json'}."
        )

    splits = split_patients((r["patient"] for r in current), fractions, seed)
    split_of = {p: key for key, ids in splits.items() for p in ids}
    entries: dict[str, list[dict[str, str]]] = {key: [] for key in SPLIT_KEYS}
    for r in current:
        entries[split_of[r["patient"]]].append({"case": r["case"], "patient": r["patient"], **r["outputs"]})
    images = [m for m in wanted if m != SEG]
    has_seg = SEG in wanted
    challenges = sorted({subchallenge(r["case"]) for r in current})
    labels, convention = _labels(challenges, harmonize_labels) if has_seg else ({}, None)
    if has_seg and len(challenges) > 1:
        logger.warning("the datalist mixes BraTS sub-challenges %s, whose label maps use the same values for "
                       "different regions; the datalist's 'labels' cannot describe them.", challenges)
    shape = _same_or_none([r["shape"] for r in current], tol=0)  # None when cases differ (a -1 in spatial_size)
    datalist: dict[str, Any] = {
        "name": "BraTS (prepared by data_prep.brats)",
        "description": "Preprocessed BraTS volumes; paths are relative to this file's folder.",
        "tensorImageSize": "3D",
        "preset": preset,
        "spatial_size": [int(v) for v in shape] if shape is not None else None,
        "spacing": _same_or_none([r["spacing"] for r in current]),
        "intensity_range": [0.0, 1.0],
        "modalities": images,
        "label_key": SEG if has_seg else None,
        "labels": labels,
        "label_convention": convention,
        "subchallenges": challenges,
        "percentiles": settings["percentiles"],
        "pool": settings["pool"],
        "split": settings["split"],
        "seed": settings["seed"],
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
        up_to_date = sum(1 for r in ordered if r.get("reason") == UP_TO_DATE)
        print(
            f"Prepared {len(done)} of {len(cases)} BraTS cases ({len(skipped)} skipped, {up_to_date} of them up to "
            f"date; {len(failed)} failed) into {dst_path}\n  datalist: {datalist_path} (training "
            f"{summary['splits']['training']}, validation {summary['splits']['validation']}, test "
            f"{summary['splits']['test']})\n  summary:  {dst_path / SUMMARY_NAME}\n  report:   {summary['report_csv']}"
        )
    return summary


def load_datalist(
    datalist: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Load one split of a ``datalist.json`` written by :func:`prepare_brats`, with absolute paths.

    MONAI's ``load_decathlon_datalist`` does the path joining; this wrapper restores ``case`` and ``patient`` (MONAI
    turns ``case`` into the case *folder* because that path exists), returns ``[]`` for an empty split (MONAI raises
    an IndexError on an empty ``"test"``) and checks that every file exists (MONAI silently leaves a missing file's
    path relative).

    Args:
        datalist: path of ``datalist.json``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: folder the relative paths are relative to; None: the datalist's folder.

    Returns:
        ``[{"case": id, "patient": id, "t1n": "/abs/path.nii.gz", ..., "seg": "/abs/path.nii.gz"}, ...]``.
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {str(path)!r} does not exist; create it with python -m data_prep.brats.")
    with open(path) as fh:
        raw = json.load(fh)
    if split not in raw:
        raise ValueError(f"split {split!r} is not in {str(path)!r}; it has {[k for k in SPLIT_KEYS if k in raw]}.")
    if not raw[split]:
        return []
    base = Path(base_dir) if base_dir is not None else path.parent
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base)
    id_keys = ("case", "patient")
    for item, orig in zip(items, raw[split]):
        for key in id_keys:
            if key in orig:
                item[key] = orig[key]
        for key, value in item.items():
            if key in id_keys or not isinstance(value, str):
                continue
            if not os.path.isabs(value) or not os.path.exists(value):
                raise FileNotFoundError(
                    f"{key} of case {orig.get('case')!r} in {str(path)!r} does not exist below {str(base)!r}: "
                    f"{value!r}. Pass base_dir= the folder that holds the case folders."
                )
    return items


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.brats",
        description="Prepare raw BraTS NIfTI (2021 or 2023+ naming) into [0, 1] NIfTI volumes and a MONAI datalist.\n"
        "Example: python -m data_prep.brats --src BraTS2023-GLI --dst brats_128 --modalities t1n --pool 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="folder with the extracted BraTS download (only read)")
    parser.add_argument("--dst", required=True, help="output folder, outside --src")
    parser.add_argument("--modalities", nargs="+", default=None, metavar="MOD",
                        help="subset of t1n t1c t2w t2f seg, 2021 names accepted (default: every modality found)")
    parser.add_argument("--preset", default="wdm", choices=sorted(PRESETS),
                        help="wdm: clip 0.1/99.9 percentiles, [0, 1], pad to 256^3; cwdm: 224x224x160 (default: wdm)")
    parser.add_argument("--percentiles", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"),
                        help="clip percentiles (default: the preset's, 0.1 99.9; 0 100 disables clipping)")
    parser.add_argument("--spatial-size", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                        help="size after centre pad/crop, before pooling; -1 keeps an axis (default: the preset's)")
    parser.add_argument("--pool", type=int, default=None,
                        help="average-pooling factor, 2 turns 256^3 into 128^3 (default: the preset's, 1)")
    parser.add_argument("--seg-pool", default="mode", choices=SEG_POOL_MODES,
                        help="how the label map is pooled (default: mode)")
    parser.add_argument("--no-harmonize-labels", action="store_true", help="keep BraTS 2021 label 4 instead of 3")
    add_batch_arguments(parser)
    return parser


def add_batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every preparation tool shares: ``--split``, ``--seed``, ``--workers``, ``--overwrite``, ``--quiet``."""
    parser.add_argument("--split", nargs=3, type=float, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                        help="fractions of patients per split (default: 0.8 0.1 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="prepare every case again (default: cases whose outputs are up to date are skipped)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0 when no case failed, 1 when any case failed (the others
    are still prepared and listed) or none could be prepared, 2 for bad arguments, a missing source, or an output that
    cannot be written (an unwritable ``--dst``, a full disk).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_brats(
            args.src, args.dst, modalities=args.modalities, preset=args.preset, percentiles=args.percentiles,
            spatial_size=args.spatial_size, pool=args.pool, seg_pool=args.seg_pool, split=args.split, seed=args.seed,
            harmonize_labels=not args.no_harmonize_labels, workers=args.workers, progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, ValueError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = summary["counts"]
    if args.quiet:
        print(f"Prepared {counts['done']} cases ({counts['skipped']} skipped, {counts['failed']} failed) into "
              f"{summary['dst']} (datalist: {summary['datalist']})")
    if counts["failed"]:
        print(f"error: {counts['failed']} case(s) failed; see {summary['report_csv']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
