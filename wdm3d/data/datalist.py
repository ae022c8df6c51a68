"""MONAI datalist JSON files, read with checks that name the file and the problem.

A datalist (as written by ``data_prep``) is a JSON object with lists of entries under split keys
(``"training"``, ``"validation"``, ``"test"``), each entry a dict of paths relative to the datalist's folder,
and optional top-level metadata (``"intensity_range"``, ``"spacing"``, ``"spatial_size"``, ...). MONAI's
``load_decathlon_datalist`` resolves only keys it is told about (and any other value that happens to exist as a
path); this module resolves exactly the keys asked for and fails early when a file is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_datalist", "load_datalist", "datalist_metadata", "intensity_range", "hu_range"]


def read_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a datalist JSON file, with an error that names the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Datalist {path} does not exist. Prepare a dataset with `python -m data_prep.brats --src RAW --dst OUT` "
            "(or `python -m data_prep.demo --dst OUT`) and point dataset_dir at OUT."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Datalist {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"Datalist {path} must hold a JSON object with split lists, got {type(data).__name__}.")
    return data


#: entry keys that name a case, never a file
ID_KEYS = ("case", "patient")


def _path_keys(entry: Any) -> list[str]:
    # every key of an entry whose value is a path or a list of paths (all but the ids)
    if not isinstance(entry, dict):
        return ["image"]
    return [
        k
        for k, v in entry.items()
        if k not in ID_KEYS
        and (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(p, str) for p in v)))
    ]


def load_datalist(
    path: str | os.PathLike,
    split: str = "training",
    keys: Sequence[str] | None = ("image",),
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    """The entries of one split with the paths under ``keys`` made absolute.

    Args:
        path: the datalist JSON file.
        split: which list to read (``"training"``, ``"validation"``, ``"test"``).
        keys: entry keys that hold file paths (e.g. ``["t1n"]``); every entry must have all of them. None: every
            string (or list of strings) of each entry except the ids ``case`` / ``patient``, as data_prep writes them.
        base_dir: folder the relative paths are relative to (default: the datalist's folder).
        check_files: raise if a listed file does not exist (naming it), instead of failing mid-training.
        allow_empty: return ``[]`` for an empty split (a dataset too small for a test split) instead of raising.

    Returns:
        A list of dicts (copies of the entries) whose ``keys`` values are absolute paths.
    """
    path = Path(path)
    data = read_datalist(path)
    if split not in data:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        raise KeyError(f"Datalist {path} has no split {split!r}; it has {lists}.")
    entries = data[split]
    if allow_empty and entries == []:
        return []
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"Datalist {path}: split {split!r} is empty or not a list; it needs at least one entry.")
    base = Path(base_dir) if base_dir is not None else path.parent
    out = []
    for i, entry in enumerate(entries):
        entry_keys = _path_keys(entry) if keys is None else list(keys)
        if isinstance(entry, str) and entry_keys == ["image"]:
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"Datalist {path}: entry {i} of {split!r} must be an object, got {entry!r}.")
        missing = [k for k in entry_keys if k not in entry]
        if missing:
            raise KeyError(
                f"Datalist {path}: entry {i} of {split!r} ({entry.get('case', '?')}) has no key(s) {missing}; "
                f"it has {sorted(entry)}. Choose an available modality (e.g. image_key) or re-run data_prep."
            )
        item = dict(entry)
        for k in entry_keys:
            value = item[k]
            values = value if isinstance(value, list) else [value]
            resolved = [str(p if os.path.isabs(p) else (base / p)) for p in values]
            if check_files:
                for p in resolved:
                    if not os.path.isfile(p):
                        raise FileNotFoundError(
                            f"Datalist {path}: entry {i} of {split!r} lists {k}={p}, which does not exist."
                        )
            item[k] = resolved if isinstance(value, list) else resolved[0]
        out.append(item)
    return out


def datalist_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level entries of a datalist that are not split lists (``intensity_range``, ``spacing``, ...)."""
    data = read_datalist(path)
    return {
        k: v
        for k, v in data.items()
        if not (isinstance(v, list) and v and all(isinstance(e, dict) for e in v))
        and k not in ("training", "validation", "test")
    }


def intensity_range(path: str | os.PathLike | None, default: Sequence[float] = (0.0, 1.0)) -> list[float]:
    """The ``intensity_range`` recorded in a datalist (what prepared volumes span), or ``default``.

    Bundles map this range to the diffusion's [-1, 1] for training and back for the written samples.
    """
    value = default
    if path is not None and Path(path).is_file():
        value = read_datalist(path).get("intensity_range", default)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and float(value[0]) < float(value[1])):
        raise ValueError(f"intensity_range must be [low, high] with low < high, got {value!r} (from {path}).")
    return [float(value[0]), float(value[1])]


def hu_range(path: str | os.PathLike | None) -> list[float] | None:
    """The HU window a CT datalist's [0, 1] intensities map to (its numeric ``hu_clip``), else None (MRI).

    Reconstruction and synthesis metrics use it to report MAE in HU.
    """
    if path is None or not Path(path).is_file():
        return None
    clip = read_datalist(path).get("hu_clip") or {}
    low, high = (clip.get("low"), clip.get("high")) if isinstance(clip, dict) else (None, None)
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high:
        return [float(low), float(high)]
    return None
