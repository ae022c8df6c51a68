"""Reading the volumes to evaluate: a folder of synthetic volumes (exactly one inference run's, checked against its
manifest), a folder of real ones, or a datalist split."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..data import load_datalist, read_datalist

__all__ = ["check_sample_folder", "load_volumes"]


# the volume names wdm3d inference writes (wdm3d.inference), which mark a folder as a run's output
_SAMPLE_NIFTI = re.compile(r"^sample_\d{4,}\.nii(?:\.gz)?$")


def check_sample_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder of synthetic volumes that is not exactly one complete wdm3d inference run.

    A folder that looks like an inference output (it has a ``manifest.json`` listing samples, or volumes named
    ``sample_NNNN.nii.gz``) must have a readable manifest that lists exactly the NIfTI volumes present: no manifest
    (an inference run was interrupted, or the manifest was removed), a listed volume that is missing,
    or a volume it does not list (another run's) would mix samples of different runs into one score. A plain folder
    of NIfTI volumes under other names and without a manifest (copied in by hand, from another tool) is accepted as it
    is; so is one whose ``manifest.json`` is some other JSON without a ``samples`` list, as long as no volume has a
    ``sample_NNNN`` name.

    Args:
        folder: the synthetic volumes' folder.

    Raises:
        ValueError: the folder mixes runs or its manifest is unreadable (the message names the folder and the problem).
        FileNotFoundError: the manifest lists volumes that are not in the folder.
    """
    folder = Path(folder)
    manifest = folder / "manifest.json"
    volumes = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii"))
    )
    named = [n for n in volumes if _SAMPLE_NIFTI.match(n)]
    fix = (
        "Run inference into the folder again (a run replaces the folder's samples only once it has finished), or "
        "copy the volumes to evaluate into a folder of their own."
    )
    if not manifest.exists():
        if named:
            raise ValueError(
                f"{folder} holds wdm3d samples ({len(named)} sample_NNNN volume(s), e.g. {named[0]}) but no "
                f"manifest.json: the inference run that wrote them did not finish, or the manifest was removed, so the "
                f"volumes may come from more than one run. {fix}"
            )
        return
    try:
        data = json.loads(manifest.read_text())
        samples = data.get("samples") if isinstance(data, dict) else None
        listed = None if samples is None else [str(s["nifti"]) for s in samples]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{manifest} is not a readable wdm3d manifest ({type(err).__name__}: {err}); cannot tell which "
            f"volumes in {folder} belong to one run. {fix}"
        ) from err
    if listed is None:
        if named:
            raise ValueError(
                f"{manifest} lists no samples, but {folder} holds {len(named)} sample_NNNN volume(s), e.g. "
                f"{named[0]}: cannot tell which belong to one run. {fix}"
            )
        return
    missing = [n for n in listed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest} lists {len(missing)} volume(s) that are not in {folder}, e.g. "
            f"{missing[0]}; the run that wrote it did not finish or files were moved. {fix}"
        )
    extra = [n for n in volumes if n not in set(listed)]
    if extra:
        raise ValueError(
            f"{folder} holds {len(extra)} NIfTI volume(s) that {manifest} does not list, e.g. {extra[0]}: "
            f"they are not of the run the manifest describes. {fix}"
        )


def _volume_files(folder: Path) -> list[Path]:
    """The NIfTI volumes of a folder; for a folder of wdm3d samples (a ``manifest.json`` listing them), exactly the
    volumes of that run, so that files of another run in the folder are not mixed in."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            listed = [s["nifti"] for s in json.loads(manifest.read_text())["samples"]]
        except (ValueError, KeyError, TypeError):
            listed = None  # not a wdm3d sample manifest: read the folder
        if listed is not None:
            missing = [name for name in listed if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{manifest} lists {len(missing)} volume(s) that are not in {folder}, e.g. "
                    f"{missing[0]}; the run that wrote it did not finish or files were moved."
                )
            if listed:
                return [folder / name for name in listed]
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and (p.name.endswith(".nii.gz") or p.name.endswith(".nii"))
    )
    if not files:
        raise FileNotFoundError(f"No NIfTI volumes (*.nii.gz, *.nii) in {folder}.")
    return files


def _datalist_files(path: Path, split: str, image_key: str | None) -> list[Path]:
    # the entries' NIfTI keys are read only to guess image_key; load_datalist reads (and checks) the files
    data = read_datalist(path)
    if image_key is None:
        entries = data.get(split) or []
        first = entries[0] if entries and isinstance(entries[0], dict) else {}
        candidates = [
            k for k, v in first.items() if isinstance(v, str) and (v.endswith(".nii.gz") or v.endswith(".nii"))
        ]
        if len(candidates) != 1:
            raise ValueError(
                f"Datalist {path}: say which image key to evaluate (--image-key / image_key); the entries of "
                f"{split!r} have the NIfTI keys {candidates}."
            )
        image_key = candidates[0]
    return [Path(e[image_key]) for e in load_datalist(path, split, [image_key])]


def load_volumes(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "training",
    image_key: str | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read NIfTI volumes that share one shape.

    Args:
        source: a folder of ``*.nii.gz`` / ``*.nii`` files (sorted by name), a datalist JSON (with ``split`` and
            ``image_key``; the key is guessed when the entries have exactly one NIfTI path), or a list of files.
        split: the datalist split.
        image_key: the datalist key holding the volume (e.g. ``t1n``).
        limit: read at most this many (the first ones).

    Returns:
        ``(volumes (N, D, H, W) float32, file names, affine of the first volume)``.

    Raises:
        ValueError: a volume is not 3D, or its shape differs from the first one's (the file is named).
    """
    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    else:
        src = Path(source)
        if src.is_dir():
            files = _volume_files(src)
        elif src.is_file() and src.suffix == ".json":
            files = _datalist_files(src, split, image_key)
        else:
            raise FileNotFoundError(f"{src} is neither a folder of NIfTI volumes nor a datalist JSON file.")
    if limit is not None:
        files = files[:limit]
    vols, shape, affine = [], None, None
    for f in files:
        img = nib.load(str(f))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"{f} holds a {data.ndim}D image of shape {data.shape}; evaluation needs 3D volumes.")
        if shape is None:
            shape, affine = data.shape, img.affine
        elif data.shape != shape:
            raise ValueError(
                f"{f} has shape {data.shape}, unlike {files[0]} ({shape}): all volumes must share one shape "
                "(resample or crop them first, e.g. with data_prep)."
            )
        vols.append(data)
    names = [f.name for f in files]
    if len(set(names)) < len(names):
        names = [str(f) for f in files]
    return np.stack(vols), names, np.asarray(affine)
