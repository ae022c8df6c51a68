"""Checkpoint files: find the newest, resolve a file-or-folder argument, load (always ``weights_only=True``) with
errors that name the file, save atomically, and read the layout version.

A training folder keeps a save log (:data:`SAVE_LOG`) so that "newest" does not depend on modification times, which
copies (``cp -r``, most object stores) do not keep.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write, atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "SAVE_LOG",
    "LOCK_FILE",
    "CheckpointLoadError",
    "checkpoint_format",
    "checkpoints_by_age",
    "intact_checkpoint_before",
    "latest_checkpoint",
    "load_checkpoint",
    "record_save",
    "resolve_checkpoint",
    "save_checkpoint_file",
    "named_error",
    "sort_by_age",
]

logger = logging.getLogger(__name__)

_NUM = re.compile(r"(epoch|iteration)=(\d+)")

#: version of the checkpoint layout, stored as ``checkpoint["run_config"]["wdm3d_format"]`` (absent: written
#: before versioning, treated as 0).
FORMAT_VERSION = 1


def _progress(path: Path) -> tuple[int, int, float]:
    # rank files by the progress their name records (epoch=, iteration=), then by modification time
    found = dict((k, int(v)) for k, v in _NUM.findall(path.name))
    return found.get("epoch", -1), found.get("iteration", -1), path.stat().st_mtime


def named_error(err: Exception, context: str) -> Exception:
    """``err`` with ``context`` (which file, which entry) in front of its message, of the same type where possible."""
    message = f"{context}: {err}"
    try:
        return type(err)(message)
    except Exception:
        return RuntimeError(f"{context}: {type(err).__name__}: {err}")


#: the save log a :class:`TrainingCheckpoints` folder keeps: the checkpoints it wrote, oldest first. It makes "newest"
#: independent of modification times, which a copy (``cp -r``, most object stores) does not keep.
SAVE_LOG = "checkpoints.json"
#: the lock a running :class:`TrainingCheckpoints` holds in its folder (an ``flock``; the file itself stays)
LOCK_FILE = ".lock"


def _save_log(directory: Path) -> list[dict]:
    # the save log's entries ({"file", "epoch", "iteration"}), oldest first; [] when there is none or it is unreadable
    path = directory / SAVE_LOG
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())["saved"]
        if not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in saved):
            raise ValueError("an entry has no file name")
        return list(saved)
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning(
            "Checkpoint save log %s is unreadable (%s): ignored, the newest checkpoint is chosen by modification time.",
            path,
            err,
        )
        return []


def record_save(directory: Path, name: str, epoch: int, iteration: int) -> None:
    """Append ``name`` to ``directory``'s save log (atomically), dropping entries whose file is gone."""
    saved = [e for e in _save_log(directory) if e["file"] != name and (directory / e["file"]).is_file()]
    saved.append({"file": name, "epoch": int(epoch), "iteration": int(iteration)})
    atomic_write_text(directory / SAVE_LOG, json.dumps({"saved": saved}, indent=1))


def sort_by_age(directory: Path, files: list[Path]) -> list[Path]:
    # ``files`` oldest first: those the save log lists in its order, after the others (by modification time); a file
    # the log does not list but that is newer than the log itself (dropped in after the last save) counts as newest
    mtime = {p: p.stat().st_mtime for p in files}
    order = {e["file"]: i for i, e in enumerate(_save_log(directory))}
    unlisted = sorted((p for p in files if p.name not in order), key=lambda p: (mtime[p], _progress(p)[:2]))
    if not order:
        return unlisted
    log_time = (directory / SAVE_LOG).stat().st_mtime
    listed = sorted((p for p in files if p.name in order), key=lambda p: order[p.name])
    return [p for p in unlisted if mtime[p] <= log_time] + listed + [p for p in unlisted if mtime[p] > log_time]


def checkpoints_by_age(directory: Path, pattern: str = "*.pt") -> list[Path]:
    """Every visible checkpoint of ``directory`` matching ``pattern``, oldest first (the save log's order)."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    return sort_by_age(directory, files) if files else []


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pt") -> Path | None:
    """The newest checkpoint in ``directory`` (None if there is none or the folder does not exist).

    "Newest" is the file saved last: the last one the folder's save log (``checkpoints.json``, written by
    :class:`TrainingCheckpoints`) lists, unless a file it does not list is newer than the log; without a log, the
    file modified last. Names are only a tie-break, as epoch- and iteration-numbered files are not comparable.
    """
    ordered = checkpoints_by_age(Path(directory), pattern)
    return ordered[-1] if ordered else None


def resolve_checkpoint(checkpoint: str | os.PathLike, what: str = "", hint: str = "") -> Path:
    """The checkpoint file that ``checkpoint`` names: the file itself, or the newest ``*.pt`` of a folder.

    Args:
        checkpoint: a checkpoint file, or a training folder (e.g. ``output/models``).
        what: what the checkpoint is, for messages (e.g. ``"autoencoder"``).
        hint: what to do when there is none (e.g. ``"train the autoencoder first or set the path."``).

    Raises:
        FileNotFoundError: naming the path, ``what`` and ``hint``.
    """
    path = Path(checkpoint)
    label = f"{what} checkpoint" if what else "checkpoint"
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"No {label} (*.pt) in {path}; {hint or 'set the path to a checkpoint file.'}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"The {label} {path} does not exist; {hint or 'check the path.'}")
    return path


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that ``torch.load(weights_only=True)`` cannot read.

    Attributes:
        path: the file.
        damaged: True when the file is truncated or corrupt (an interrupted copy, a full disk), False when it is
            readable but refused (pickled code or objects that ``weights_only`` does not allow).
    """

    def __init__(self, message: str, path: Path, damaged: bool) -> None:
        super().__init__(message)
        self.path, self.damaged = path, damaged


def intact_checkpoint_before(path: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``path``'s folder that was saved before ``path`` and loads, or None.

    "Before" follows the folder's save log (see :func:`latest_checkpoint`); each candidate, newest first, is loaded
    in full (``weights_only=True``) to tell that it is intact, so this is for error paths, not for a listing.
    """
    path = Path(path)
    ordered = checkpoints_by_age(path.parent)
    names = [p.name for p in ordered]
    earlier = ordered[: names.index(path.name)] if path.name in names else ordered
    for candidate in reversed(earlier):
        try:
            load_checkpoint(candidate, suggest_previous=False)
        except (CheckpointLoadError, ValueError):
            continue
        return candidate
    return None


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    suggest_previous: bool = True,
) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    A checkpoint that needs arbitrary unpickling (pickled code) is refused: only tensors and plain containers load.
    A checkpoint written by a newer wdm3d (``run_config.wdm3d_format`` > :data:`FORMAT_VERSION`) is refused too.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        suggest_previous: when the file is truncated or corrupt, look for the newest intact checkpoint saved before
            it in the same folder (:func:`intact_checkpoint_before`) and name it in the error, to be passed instead.

    Raises:
        CheckpointLoadError: a ``RuntimeError`` naming the file and what is wrong with it; the file is left as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError / EOFError / OSError depending on the damage
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise CheckpointLoadError(
                f"Could not load checkpoint {path} with weights_only=True ({detail}). The file holds pickled code or "
                "objects other than tensors and plain containers; wdm3d never unpickles code from checkpoints.",
                path,
                damaged=False,
            ) from err
        hint = ""
        if suggest_previous:
            previous = intact_checkpoint_before(path)
            hint = (
                f" The newest intact checkpoint saved before it is {previous}: use that one instead (for "
                f"inference: --checkpoint {previous})."
                if previous is not None
                else f" No intact checkpoint was saved before it in {path.parent}."
            )
        raise CheckpointLoadError(
            f"Could not load checkpoint {path} with weights_only=True ({detail}). The file is truncated or corrupt "
            f"(an interrupted save or copy, a full disk); it is left as it is for inspection.{hint}",
            path,
            damaged=True,
        ) from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"Checkpoint {path} must hold a dict of state dicts, got {type(ckpt).__name__}.")
    version = checkpoint_format(ckpt)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"Checkpoint {path} has format {version}, newer than this wdm3d reads ({FORMAT_VERSION}); upgrade wdm3d."
        )
    return dict(ckpt)


# what to do about a save that failed for want of space
_SPACE_HINTS = {
    errno.ENOSPC: "Free space on that filesystem (or keep fewer checkpoints: n_saved), then launch the run again: it "
    "resumes from the newest checkpoint.",
    errno.EDQUOT: "The disk quota is full: free space or raise the quota, then launch the run again: it resumes from "
    "the newest checkpoint.",
}


def save_checkpoint_file(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`wdm3d.io.atomic_write`: temporary file, fsync, rename).

    Args:
        checkpoint: what to save (state dicts of tensors and plain types).
        path: the checkpoint file.

    Raises:
        OSError: the write failed (a full disk, a quota): the errno is kept and the message names ``path``, the
            errno and what to do; nothing of the file is left (no temporary file) and an earlier ``path`` and every
            other checkpoint are as they were.
        RuntimeError: anything else that stopped ``torch.save``, with ``path`` in front of its message.
    """
    path = Path(path)

    def write(tmp: str) -> None:
        # a file object rather than a path: torch's own file writer reports a full disk without an errno, while a
        # failing Python write reaches atomic_write as the OSError it is (under torch's RuntimeError)
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)

    try:
        return atomic_write(path, write)
    except OSError as err:
        hint = _SPACE_HINTS.get(err.errno, "")
        raise OSError(
            err.errno,
            f"{err.strerror} The checkpoint was not saved; the earlier checkpoints in "
            f"{path.parent} are as they were. {hint}".rstrip(),
        ) from err
    except Exception as err:
        raise named_error(err, f"Could not save checkpoint {path}") from err


def checkpoint_format(ckpt: Mapping) -> int:
    """The layout version a loaded checkpoint records (0 for files written before versioning)."""
    run_config = ckpt.get("run_config")
    if isinstance(run_config, Mapping) and "wdm3d_format" in run_config:
        return int(run_config["wdm3d_format"])
    return 0
