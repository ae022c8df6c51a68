"""What a preparation run reports: ``OUT/prepare_report.csv`` and ``OUT/prepare_summary.json`` (every case done /
skipped (why) / failed (why)), and the end of a run: the datalist, or the error of a run that cannot write one.

A run builds its summary (:func:`run_summary`), then :func:`close_batch` writes the CSV report and raises for a batch
stopped by a full disk or one that prepared nothing; otherwise :func:`write_datalist` writes the datalist and the
final summary.
"""

from __future__ import annotations

import csv
import errno
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wdm3d.io.nifti import atomic_write_text

from .common import OutputError, os_error_text, write_json, writing_output
from .datalist import SPLIT_KEYS

__all__ = [
    "SUMMARY_NAME",
    "REPORT_CSV_NAME",
    "REPORT_COLUMNS",
    "write_report",
    "stopped_by_full_disk",
    "run_summary",
    "close_batch",
    "write_datalist",
]

#: The run summary (JSON, every case with its status) and the same per-case listing as CSV, in ``dst``.
SUMMARY_NAME = "prepare_summary.json"
REPORT_CSV_NAME = "prepare_report.csv"
#: Columns of the CSV report.
REPORT_COLUMNS: tuple[str, ...] = ("case", "patient", "status", "reason", "file", "outputs")


def write_report(rows: Sequence[dict[str, Any]], dst: Path) -> Path:
    """Write ``dst/prepare_report.csv``: one row per case with :data:`REPORT_COLUMNS` (outputs joined by ``;``).

    Args:
        rows: every case's record, in report order.
        dst: the output folder.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        outputs = r.get("outputs") or {}
        writer.writerow(
            {
                "case": r.get("case", ""),
                "patient": r.get("patient", ""),
                "status": r.get("status", ""),
                "reason": r.get("reason", ""),
                "file": r.get("file", ""),
                "outputs": ";".join(f"{k}={v}" for k, v in outputs.items()),
            }
        )
    return atomic_write_text(dst / REPORT_CSV_NAME, buf.getvalue())


def stopped_by_full_disk(
    full: dict[str, Any],
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    dst: Path,
    noun: str,
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
        write_json(summary, dst / SUMMARY_NAME)
        also = f"; see {dst / SUMMARY_NAME}"
    except OSError as err:
        also = f"; the report could not be written either ({os_error_text(err)})"
    return OutputError(
        f"{full['reason']}; the batch stopped there ({done} {noun} done, {waiting} not started): free space and run "
        f"again, finished {noun} are kept and skipped as up to date{also}",
        getattr(errno, full.get("errno") or "", None),
    )


def run_summary(
    src: Path,
    dst: Path,
    settings: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    datalist: Path | None,
    case_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary written to ``dst/prepare_summary.json``: where, with what settings, and every case's outcome.

    Args:
        src: the source folder.
        dst: the output folder.
        settings: the run's settings.
        rows: every case's record, in report order.
        datalist: the datalist this run writes; None when it writes none (nothing prepared, or the batch stopped).
        case_fields: a tool's own record fields listed per case after :data:`REPORT_COLUMNS`, with the value used
            when a record lacks one.

    Returns:
        ``src``, ``dst``, ``datalist``, ``report_csv``, ``settings``, ``counts`` (found / done / skipped / failed),
        ``done`` (case ids), ``skipped`` (``{"case", "reason"}``), ``failed`` (``{"case", "file", "reason"}``) and
        ``cases``; :func:`close_batch` and :func:`write_datalist` add the rest.
    """
    extra = case_fields or {}
    done = [r["case"] for r in rows if r["status"] == "done"]
    skipped = [{"case": r["case"], "reason": r["reason"]} for r in rows if r["status"] == "skipped"]
    failed = [{"case": r["case"], "file": r["file"], "reason": r["reason"]} for r in rows if r["status"] == "failed"]
    return {
        "src": str(src),
        "dst": str(dst),
        "datalist": str(datalist) if datalist is not None else None,
        "report_csv": str(dst / REPORT_CSV_NAME),
        "settings": settings,
        "counts": {"found": len(rows), "done": len(done), "skipped": len(skipped), "failed": len(failed)},
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "cases": [{k: r.get(k, "") for k in REPORT_COLUMNS} | {k: r.get(k, v) for k, v in extra.items()} for r in rows],
    }


def close_batch(
    summary: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    full: dict[str, Any] | None,
    waiting: Sequence[str],
    noun: str,
    start: float,
    nothing_prepared: str | None,
) -> None:
    """Write the CSV report, unless the batch stopped; raise when there is no datalist to write.

    Args:
        summary: the :func:`run_summary` (``seconds`` is added before it is written).
        rows: every case's record, in report order.
        full: the record of the case that found the disk full (:func:`data_prep.batch.run_batch`), or None.
        waiting: the cases not started because of it.
        noun: what a case is called in messages (``"cases"``, ``"patients"``).
        start: ``time.perf_counter()`` when the run began.
        nothing_prepared: the error message when no case is prepared nor up to date, else None.

    Raises:
        OutputError: the batch stopped on a full disk (the report and summary are written if they still fit).
        RuntimeError: ``nothing_prepared`` (the summary is written first).
    """
    dst = Path(summary["dst"])
    if full is not None:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        raise stopped_by_full_disk(full, summary, rows, dst, noun, len(waiting))
    with writing_output(dst / REPORT_CSV_NAME):
        write_report(rows, dst)
    if nothing_prepared is not None:
        summary["seconds"] = round(time.perf_counter() - start, 3)
        with writing_output(dst / SUMMARY_NAME):
            write_json(summary, dst / SUMMARY_NAME)
        raise RuntimeError(nothing_prepared)


def write_datalist(summary: dict[str, Any], datalist: dict[str, Any], start: float) -> None:
    """Write the datalist to ``summary["datalist"]``, then the summary with the split sizes and the run's seconds.

    Args:
        summary: the :func:`run_summary` of a run that writes a datalist.
        datalist: the datalist, with ``spatial_size``, ``spacing`` and one list per split.
        start: ``time.perf_counter()`` when the run began.
    """
    path, dst = Path(summary["datalist"]), Path(summary["dst"])
    with writing_output(path):
        write_json(datalist, path)
    summary["splits"] = {key: len(datalist[key]) for key in SPLIT_KEYS}
    summary["spatial_size"] = datalist["spatial_size"]
    summary["spacing"] = datalist["spacing"]
    summary["seconds"] = round(time.perf_counter() - start, 3)
    with writing_output(dst / SUMMARY_NAME):
        write_json(summary, dst / SUMMARY_NAME)
