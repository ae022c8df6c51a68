"""One writer per checkpoint folder: an ``flock`` on ``directory/.lock`` held by the run that writes there.

A second run in the same folder (a requeued job while the first still runs, a resubmission) would interleave its
checkpoints with the first's and prune them. An ``flock`` is released by the kernel when its process dies, so a crash
leaves no stale lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ...artifacts import LOCK_FILE

try:
    import fcntl
except ImportError:  # not POSIX (Windows): there is no flock, runs go unguarded
    fcntl = None

__all__ = ["lock_folder", "unlock_folder"]

logger = logging.getLogger(__name__)


def lock_folder(directory: Path) -> int | None:
    """Take the folder's lock and write who holds it (pid, host, start time) into the lock file.

    Args:
        directory: the checkpoint folder (created if missing).

    Returns:
        the lock file's descriptor, to pass to :func:`unlock_folder`; None where there is no ``flock`` (not POSIX,
        or a filesystem without it, with a warning): the run then goes on unguarded.

    Raises:
        RuntimeError: another process holds the lock; the message names it and what to do.
    """
    if fcntl is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"Another training run is writing checkpoints to {directory} (lock {path}: {holder}). Two runs in "
            "one folder would overwrite and prune each other's checkpoints: stop that run, or give this one "
            "another output_dir."
        ) from None
    except OSError as err:  # a filesystem without flock (some network mounts): go on unguarded
        os.close(fd)
        logger.warning("Cannot lock %s (%s): a second run in this folder would not be detected.", path, err)
        return None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        ).encode(),
    )
    return fd


def unlock_folder(fd: int) -> None:
    """Release the lock :func:`lock_folder` took (the lock file itself stays).

    Args:
        fd: the descriptor :func:`lock_folder` returned.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
