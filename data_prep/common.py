"""Helpers shared by the preparation tools (``data_prep.brats``, ``data_prep.lidc``) for writing their outputs.

They turn the operating system's write errors into messages about the *destination*: the path that could not be
written and the errno (``No space left on device (ENOSPC)``), never the source file that was being read at the time.
Every file is written atomically (:func:`write_nifti`, :func:`write_json`), so an output that exists is complete.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from wdm3d.io.nifti import atomic_write_text, save_nifti

__all__ = [
    "DISK_FULL_ERRNOS",
    "NOT_STARTED",
    "OutputError",
    "check_output_dir",
    "check_src_dst",
    "is_within",
    "make_output_dir",
    "not_started",
    "os_error_text",
    "stops_batch",
    "write_failure",
    "write_json",
    "write_nifti",
    "writing_output",
]

#: Start of the reason of a case that a stopped batch never started (see :func:`not_started`).
NOT_STARTED = "not started"
#: Errnos that mean the destination has no room left: every further case would fail the same way.
DISK_FULL_ERRNOS: frozenset[int] = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e)


class OutputError(OSError):
    """The output folder or an output file cannot be written (permissions, a full disk, not a folder).

    The message names the path and the reason; the command-line tools print it on one line and exit with 2.

    Args:
        message: what could not be written and why (``str(err)`` is exactly this, without an ``[Errno N]`` prefix).
        code: the errno of the underlying error, if any (kept as ``err.errno``).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def os_error_text(err: BaseException) -> str:
    """``"No space left on device (ENOSPC)"`` for an OSError with an errno, else ``"TypeName: message"``.

    Args:
        err: the exception raised by a write.
    """
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and isinstance(code, int):
        # the errno's own text, not err.strerror: a writer may re-raise with a sentence of its own there, and the
        # caller already names the path
        name = errno.errorcode.get(code)
        text = os.strerror(code)
        return f"{text} ({name})" if name else text
    return f"{type(err).__name__}: {err}"


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def check_output_dir(path: str | os.PathLike) -> None:
    """Check that files can be created in the output folder ``path``, and leave nothing behind.

    The folder (and missing parents) is created, a probe file is written into it and removed, and the folders this
    check created are removed again, so a run that stops before writing anything (e.g. nothing found in the source)
    does not leave an empty output folder either.

    Args:
        path: the output folder (it may not exist yet).

    Raises:
        OutputError: ``path`` is not a folder, cannot be created, or does not accept new files; the message names the
            path and the errno (e.g. ``Permission denied (EACCES)``).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"cannot write to the output folder {str(folder)!r}: it is a file, not a folder; choose another --dst",
            errno.ENOTDIR,
        )
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(
            f"cannot write to the output folder {str(folder)!r}: {os_error_text(err)}; choose "
            "another --dst or fix its permissions / free space",
            err.errno,
        ) from err
    finally:
        for p in created:  # deepest first; only the empty folders this check made
            try:
                p.rmdir()
            except OSError:
                break


def check_src_dst(src: str | os.PathLike, dst: str | os.PathLike, source: str) -> tuple[Path, Path]:
    """The resolved source and output folders, checked before any work: the source is a folder, neither contains
    the other (the source is never modified), and files can be created in the output folder (:func:`check_output_dir`),
    so an unwritable ``dst`` is one clear error at once rather than a failure per case.

    Args:
        src: the raw download (only read).
        dst: the output folder.
        source: what the source is called in the error (``"BraTS"``, ``"LIDC"``).

    Raises:
        FileNotFoundError: ``src`` is not a folder.
        ValueError: ``src`` and ``dst`` overlap.
        OutputError: ``dst`` cannot be written.
    """
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    if not src_path.is_dir():
        raise FileNotFoundError(f"{source} source folder {str(src)!r} does not exist or is not a folder.")
    if is_within(dst_path, src_path) or is_within(src_path, dst_path):
        raise ValueError(
            f"dst {str(dst_path)!r} and src {str(src_path)!r} overlap; write the prepared data to a folder outside "
            "the raw download (the source is never modified)."
        )
    check_output_dir(dst_path)
    return src_path, dst_path


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (with parents), reporting a failure as an :class:`OutputError`.

    Args:
        path: the output folder.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder {str(folder)!r}: {os_error_text(err)}", err.errno) from err
    return folder


@contextmanager
def writing_output(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised inside the block into an :class:`OutputError` that names ``path`` and the errno.

    Args:
        path: the output file or folder the block writes.
    """
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write the output {str(path)!r}: {os_error_text(err)}", err.errno) from err


def write_failure(record: dict[str, Any], path: str | os.PathLike, err: OSError) -> dict[str, Any]:
    """A failed-case record for a write error: ``file`` is the destination written, ``reason`` names it and the errno.

    The record also carries ``errno`` (e.g. ``"ENOSPC"``), which :func:`stops_batch` reads.

    Args:
        record: the case's record so far (``case``, ``patient``).
        path: the output path that could not be written.
        err: the error the write raised.
    """
    return record | {
        "status": "failed",
        "file": str(path),
        "reason": f"cannot write the output {str(path)!r}: {os_error_text(err)}",
        "errno": errno.errorcode.get(err.errno, "") if isinstance(err.errno, int) else "",
    }


def stops_batch(record: dict[str, Any]) -> bool:
    """True when a case failed because the destination is full (its ``errno`` is ENOSPC or EDQUOT).

    Args:
        record: a case record returned by a tool's ``_process_case``.
    """
    return record.get("status") == "failed" and record.get("errno") in {errno.errorcode[e] for e in DISK_FULL_ERRNOS}


def not_started(record: dict[str, Any], stopped_by: dict[str, Any]) -> dict[str, Any]:
    """The record of a case that was never started because ``stopped_by`` (a :func:`stops_batch` record) ended the
    batch: status ``skipped``, reason saying so; it is prepared by the next run.

    Args:
        record: the case's record so far (``case``, ``patient``).
        stopped_by: the record of the case whose write failed for lack of space.
    """
    why = stopped_by.get("errno") or "disk full"
    return record | {
        "status": "skipped",
        "file": "",
        "reason": f"{NOT_STARTED}: the batch stopped when the disk filled up ({why} writing {stopped_by['file']})",
    }


def write_nifti(
    data: np.ndarray, affine: np.ndarray, path: Path, codes: tuple[int, int] = (1, 1), qform: np.ndarray | None = None
) -> None:
    """Write ``data`` atomically, keeping its dtype and the given (qform, sform) codes (and qform matrix).

    Args:
        data: the volume.
        affine: its voxel-to-world matrix (the sform).
        path: the ``.nii.gz`` to write.
        codes: the (qform, sform) codes.
        qform: the qform matrix; None: the same as ``affine``.
    """
    save_nifti(data, affine, path, dtype=data.dtype, codes=codes, qform=qform)


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON with a final newline, atomically.

    Args:
        obj: a JSON-serialisable object.
        path: the file to write.
    """
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def is_within(path: Path, parent: Path) -> bool:
    """True when ``path`` is ``parent`` or below it (lexically: resolve both first).

    Args:
        path: the path to test.
        parent: the folder it may be in.
    """
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False
