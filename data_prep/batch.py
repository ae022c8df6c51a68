"""The batch job both preparation tools run: re-run records and the parallel case loop.

Each finished case gets ``OUT/<case>/prepare_record.json`` (written after its outputs, so it marks the case complete)
with a fingerprint of its input files and the per-case settings; a later run skips a case whose record matches
(:func:`read_case_record`). Cases run in worker processes with a progress bar (:func:`run_cases`); a full disk stops
the batch (:func:`run_batch`). What the run reports is in :mod:`data_prep.report`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .common import OutputError, not_started, os_error_text, stops_batch, write_json

__all__ = [
    "RECORD_NAME",
    "UP_TO_DATE",
    "input_fingerprint",
    "read_case_record",
    "write_case_record",
    "run_cases",
    "run_batch",
    "run_tool",
    "remove_partial",
    "add_batch_arguments",
]

logger = logging.getLogger(__name__)

#: Per-case record written last into each prepared case folder: its existence means the case is complete.
RECORD_NAME = "prepare_record.json"
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
    it lists still exists (paths relative to ``out_dir.parent``); None otherwise (the case must be prepared).

    Args:
        out_dir: the case's output folder.
        fingerprint: :func:`input_fingerprint` of the case's input files now.
        settings: the per-case settings of this run (compared as JSON).
    """
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
    """Write ``out_dir/prepare_record.json`` atomically (after the outputs, so it is the completion mark).

    Args:
        out_dir: the case's output folder.
        record: the case's record with its ``fingerprint``, ``settings`` and ``outputs``.
    """
    write_json(record, out_dir / RECORD_NAME)


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
                        records[key] = crashed(
                            key,
                            RuntimeError(
                                "its worker process died (killed, e.g. by the out-of-memory killer; try fewer workers)"
                            ),
                        )
                    except Exception as err:  # noqa: BLE001
                        records[key] = crashed(key, err)
                bar.update()
                finished(key)
    finally:
        bar.close()
    return records


def run_batch(
    fn: Callable[..., dict[str, Any]],
    jobs: Sequence[tuple[str, tuple]],
    patients: dict[str, str],
    workers: int,
    desc: str,
    progress: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None, list[str]]:
    """Prepare every job's case with :func:`run_cases`, and stop the batch when the destination fills up.

    A full disk stops the batch instead of following the per-case rule "report and go on": every further case would
    read and preprocess its input only to fail on the same full disk, and the report would bury the one cause under
    identical failures. Cases done so far are kept and a re-run after freeing space skips them as up to date, so
    stopping loses nothing. A case never started gets a :func:`data_prep.common.not_started` record.

    Args:
        fn: the tool's per-case function (module level, so worker processes can pickle it).
        jobs: ``(case id, args of fn)`` per case.
        patients: case id -> patient id, for the records of crashed and not-started cases.
        workers: processes (1: in this process).
        desc: label of the progress bar.
        progress: show the progress bar.

    Returns:
        ``(records, full, waiting)``: a record per job; the record of the case whose write found the disk full, or
        None; the ids of the cases not started because of it.
    """
    records = run_cases(
        fn,
        jobs,
        workers,
        desc,
        progress,
        lambda key, err: {
            "case": key,
            "patient": patients[key],
            "status": "failed",
            "file": "",
            "reason": f"worker error {type(err).__name__}: {err}",
        },
        stop=stops_batch,
    )
    full = next((records[key] for key, _ in jobs if key in records and stops_batch(records[key])), None)
    waiting = [key for key, _ in jobs if key not in records] if full is not None else []
    for key in waiting:
        records[key] = not_started({"case": key, "patient": patients[key]}, full)
    return records, full, waiting


def remove_partial(out_dir: Path, written: Sequence[Path]) -> None:
    """Remove a failed case's outputs and its folder if that is then empty; best effort, as the failure being
    reported (e.g. a permission error) may also prevent the clean-up.

    Args:
        out_dir: the case's output folder.
        written: the outputs written so far.
    """
    for path in written:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            logger.warning("could not remove the partial output %s: %s", path, os_error_text(err))
    try:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
    except OSError:  # an empty output folder left behind is harmless; the partial files are what mattered
        pass


def add_batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every preparation tool shares: ``--split``, ``--seed``, ``--workers``, ``--overwrite``,
    ``--quiet``.

    Args:
        parser: the tool's parser (returned, with the options added).
    """
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of patients per split (default: 0.8 0.1 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default: 1)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="prepare every case again (default: cases whose outputs are up to date are skipped)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_tool(prepare: Callable[[], Mapping[str, Any]], quiet: bool, unit: tuple[str, str]) -> int:
    """Run a prep tool's ``prepare`` call for its command line and turn the outcome into an exit status.

    Exit 2 for bad arguments or an output that cannot be written (nothing was done), 1 when the run stopped or a
    case failed (the report names it), 0 otherwise. With ``quiet`` the one-line summary is printed.

    Args:
        prepare: the tool's ``prepare_*`` call with its arguments bound; returns the run summary.
        quiet: print the one-line summary (the progress bar is off).
        unit: what a case is called, singular and plural (``("case", "cases")``, ``("patient", "patients")``).
    """
    try:
        summary = prepare()
    except (FileNotFoundError, ValueError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = summary["counts"]
    if quiet:
        print(
            f"Prepared {counts['done']} {unit[1]} ({counts['skipped']} skipped, {counts['failed']} failed) into "
            f"{summary['dst']} (datalist: {summary['datalist']})"
        )
    if counts["failed"]:
        print(f"error: {counts['failed']} {unit[0]}(s) failed; see {summary['report_csv']}", file=sys.stderr)
        return 1
    return 0
