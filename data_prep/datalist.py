"""The datalist that the preparation tools write: a seeded patient-level split, and loading one split back.

Patients (not cases: a BraTS 2023 patient may have several timepoints) are shuffled with ``seed`` and divided into
training / validation / test, so all cases of a patient land in one split (:func:`split_patients`). The datalist
(``OUT/datalist.json``) lists each case's outputs with paths relative to ``OUT``.

``monai.data.load_decathlon_datalist(path, data_list_key="training", base_dir=OUT)`` prefixes ``base_dir``
unconditionally only onto the keys ``image`` and ``label``; onto every other key it does so only when the joined path
exists. So every modality key (and ``seg``) resolves as long as the files are in place, but two things surprise: a
key whose file is missing silently stays relative, and ``case`` itself becomes the absolute path of the case folder
(``OUT/<case>`` exists). It also fails with an IndexError on an empty ``"test"`` list. :func:`load_datalist` wraps
it: it checks that every file exists, keeps ``case`` and ``patient`` as ids and returns ``[]`` for an empty split.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wdm3d.data import load_datalist as read_split

__all__ = [
    "DATALIST_NAME",
    "SPLIT_KEYS",
    "check_split",
    "split_patients",
    "split_entries",
    "same_or_none",
    "load_datalist",
]

#: The datalist's file name in the output folder.
DATALIST_NAME = "datalist.json"
#: The splits of the datalist, in the order of ``split`` fractions.
SPLIT_KEYS: tuple[str, ...] = ("training", "validation", "test")


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    """``split`` as three non-negative floats summing to 1 (within 1e-3); a ValueError with an example otherwise.

    Args:
        split: fractions ``(training, validation, test)``.
    """
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
    fractions = check_split(split)
    ids = sorted(set(patient_ids))
    rng = np.random.default_rng(int(seed))
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    counts = _split_counts(len(ids), fractions)
    out, start = {}, 0
    for key, c in zip(SPLIT_KEYS, counts):
        out[key] = sorted(shuffled[start : start + c])
        start += c
    return out


def split_entries(
    records: Sequence[dict[str, Any]], split: Sequence[float], seed: int
) -> dict[str, list[dict[str, str]]]:
    """The datalist's split lists: one entry (``case``, ``patient``, then the output paths) per prepared case, under
    the split :func:`split_patients` gives its patient, so all timepoints of a patient land in one split.

    Args:
        records: the prepared cases' records (``case``, ``patient``, ``outputs``: key -> path), in datalist order.
        split: fractions ``(training, validation, test)`` of patients.
        seed: seed of the patient shuffle.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each in the order of ``records``.
    """
    splits = split_patients((r["patient"] for r in records), split, seed)
    split_of = {p: key for key, ids in splits.items() for p in ids}
    entries: dict[str, list[dict[str, str]]] = {key: [] for key in SPLIT_KEYS}
    for r in records:
        entries[split_of[r["patient"]]].append({"case": r["case"], "patient": r["patient"], **r["outputs"]})
    return entries


def same_or_none(values: list[list[float]], tol: float = 1e-3) -> list[float] | None:
    """``values[0]`` when every value equals it within ``tol`` (a datalist-wide ``spacing`` or ``spatial_size``),
    else None (the cases differ, so the datalist cannot state one value).

    Args:
        values: one list of numbers per prepared case.
        tol: absolute tolerance (0: exact).
    """
    if not values:
        return None
    first = np.asarray(values[0], dtype=np.float64)
    if all(np.allclose(np.asarray(v, dtype=np.float64), first, atol=tol) for v in values):
        return [float(v) for v in values[0]]
    return None


def load_datalist(
    datalist: str | os.PathLike, split: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Load one split of a ``datalist.json`` written by :func:`data_prep.brats.prepare_brats` or
    :func:`data_prep.lidc.prepare_lidc`, with absolute paths: :func:`wdm3d.data.load_datalist` with every path key
    of each entry (the ids ``case`` and ``patient`` stay ids) and ``[]`` for an empty split.

    Args:
        datalist: path of ``datalist.json``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: folder the relative paths are relative to; None: the datalist's folder.

    Returns:
        ``[{"case": id, "patient": id, "t1n": "/abs/path.nii.gz", ..., "seg": "/abs/path.nii.gz"}, ...]``.

    Raises:
        FileNotFoundError: the datalist, or a file it lists, does not exist (the message says to pass ``base_dir``).
        KeyError: the datalist has no such split.
    """
    try:
        return read_split(datalist, split, keys=None, base_dir=base_dir, allow_empty=True)
    except FileNotFoundError as err:
        if not Path(datalist).is_file():
            raise
        raise FileNotFoundError(f"{err} Pass base_dir= the folder that holds the case folders.") from None
