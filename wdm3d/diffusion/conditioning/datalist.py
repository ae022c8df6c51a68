"""Paired datalists: one entry per case (one key per modality) -> one training sample per target modality."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...data import read_datalist

__all__ = ["MODALITIES", "expand_paired_datalist"]

logger = logging.getLogger(__name__)

#: BraTS 2023 modality keys, the default modality vocabulary.
MODALITIES = ("t1n", "t1c", "t2w", "t2f")


def expand_paired_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    targets: Sequence[str] = MODALITIES,
    reference: str | None = None,
    self_pairs: bool = True,
    dataset: str | None = "brats",
    check_files: bool = True,
) -> list[dict[str, Any]]:
    """Expand a paired datalist (one entry per case, one key per modality) into one sample per target modality.

    One model serves every target: each sample names its target modality (the base context). Without a
    ``reference``, every listed modality a case has becomes a sample (the base is trained on all modalities); with
    one, a case contributes only if it has the reference, and each sample also carries the reference volume.

    Example: ``{"case": "c0", "t1n": "c0/t1n.nii.gz", "t2w": "c0/t2w.nii.gz"}`` with ``reference="t1n"`` gives
    ``{"case": "c0", "target": ".../c0/t2w.nii.gz", "modality": "t2w", "reference": ".../c0/t1n.nii.gz",
    "reference_modality": "t1n", "dataset": "brats"}`` and (with ``self_pairs``) the same for ``t1n`` itself.

    Args:
        datalist: the datalist JSON (paths relative to its folder, as ``data_prep`` writes them).
        split: ``"training"``, ``"validation"`` or ``"test"``.
        targets: the modalities to generate (entries lacking one are skipped for it).
        reference: the reference modality (e.g. ``"t1n"``), or None (no reference: base training).
        self_pairs: with a reference, also pair it with itself (reference -> same modality). The adapter then
            also learns to reproduce the appearance of its prompt (IP-Adapter's own training task), which
            reference-guided generation uses.
        dataset: the dataset condition written into every sample (None: leave it out, i.e. the null token).
        check_files: fail now, naming the file, if a listed volume does not exist.

    Returns:
        A list of sample dicts with absolute paths under ``target`` (and ``reference``).
    """

    path = Path(datalist)
    data = read_datalist(path)
    if isinstance(targets, str):
        targets = [targets]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ValueError("targets must name at least one modality.")
    if split not in data or not isinstance(data[split], list):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        raise KeyError(f"Datalist {path} has no split {split!r}; it has {lists}.")
    base = path.parent

    def resolve(i: int, entry: Mapping, key: str) -> str:
        value = entry[key]
        if not isinstance(value, str):
            raise ValueError(f"Datalist {path}: entry {i} of {split!r} has {key}={value!r}; expected one file path.")
        p = value if os.path.isabs(value) else str(base / value)
        if check_files and not os.path.isfile(p):
            raise FileNotFoundError(f"Datalist {path}: entry {i} of {split!r} lists {key}={p}, which does not exist.")
        return p

    samples: list[dict[str, Any]] = []
    skipped = 0
    for i, entry in enumerate(data[split]):
        if not isinstance(entry, dict):
            raise ValueError(f"Datalist {path}: entry {i} of {split!r} must be an object, got {entry!r}.")
        case = str(entry.get("case", i))
        if reference is not None and reference not in entry:
            skipped += 1
            continue
        ref_path = resolve(i, entry, reference) if reference is not None else None
        for modality in targets:
            if modality not in entry or (modality == reference and not self_pairs):
                continue
            sample: dict[str, Any] = {"case": case, "target": resolve(i, entry, modality), "modality": modality}
            if dataset is not None:
                sample["dataset"] = dataset
            if ref_path is not None:
                sample.update(reference=ref_path, reference_modality=reference)
            samples.append(sample)
    if skipped:
        logger.warning(
            "Datalist %s (%s): %d case(s) without the reference %r skipped.", path, split, skipped, reference
        )
    if not samples and reference is not None and not self_pairs and set(targets) == {reference}:
        raise ValueError(
            f"Datalist {path}: the only target modality is the reference {reference!r} and self_pairs is off, so "
            "there is no pair to train on. Add target modalities, or turn self_pairs on."
        )
    if not samples:
        found = sorted({k for e in data[split] if isinstance(e, dict) for k in e})
        need = f" with the reference {reference!r}" if reference is not None else ""
        raise ValueError(
            f"Datalist {path}: split {split!r} has no case{need} and a target modality in {targets}; its entries have "
            f"the keys {found}. Set targets / reference_modality to modalities the data has."
        )
    return samples
