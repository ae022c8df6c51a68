"""LIDC-IDRI preparation: raw DICOM downloads in, preprocessed CT NIfTI volumes and a MONAI datalist out.

    python -m data_prep.lidc --src RAW --dst OUT [--spacing 1] [--spatial-size 256 256 256] [--pool 2] ...

Each patient's DICOM files are found from their headers and one CT series is chosen (:mod:`data_prep.lidc_discovery`),
read and checked to be one regular volume, never half-read (:mod:`data_prep.lidc_dicom`), and preprocessed as WDM
does without its data loss (:mod:`data_prep.lidc_case`): HU, 1 mm, crop / air-pad to 256^3, clip [-1000, p99.9],
[0, 1], optional pooling, the RAS geometry kept by every step.

Outputs, the report, re-runs and the split work as in ``data_prep.brats``: ``OUT/<case>/<case>-ct.nii.gz`` (float32 in
[0, 1], written atomically), ``OUT/<case>/prepare_record.json`` (input fingerprint over all the patient's DICOM files,
settings, chosen series), ``OUT/prepare_summary.json`` and ``OUT/prepare_report.csv`` (every case done / skipped (why)
/ failed (why)), and a seeded patient-level split in ``OUT/datalist.json``::

    {"name": "LIDC-IDRI (prepared by data_prep.lidc)", "modality": "CT", "image_key": "ct",
     "spatial_size": [128, 128, 128], "spacing": [2.0, 2.0, 2.0], "intensity_range": [0.0, 1.0],
     "hu_clip": {"low": -1000.0, "high": "percentile 99.9"}, "series_rule": "most_slices", "pool": 2, ...,
     "numTraining": 8, "numValidation": 1, "numTest": 1,
     "training": [{"case": "LIDC-IDRI-0001", "patient": "LIDC-IDRI-0001",
                   "ct": "LIDC-IDRI-0001/LIDC-IDRI-0001-ct.nii.gz"}, ...], "validation": [...], "test": [...]}

The sources are only read. The exit status is 1 when any case failed (the others are still prepared), 2 when the
output cannot be written (checked before any header is read) or the disk fills up (the batch stops), as in
``data_prep.brats``.

Parts: :mod:`data_prep.lidc_discovery` (patients and series from headers, the series choice),
:mod:`data_prep.lidc_dicom` (reading and checking a series), :mod:`data_prep.lidc_case` (CT preprocessing and one
patient), and the modules both tools share (:mod:`data_prep.volume`, :mod:`data_prep.datalist`,
:mod:`data_prep.batch`, :mod:`data_prep.report`, :mod:`data_prep.common`). This module runs the whole dataset and the
command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .batch import (
    UP_TO_DATE,
    add_batch_arguments,
    input_fingerprint,
    read_case_record,
    run_batch,
    run_tool,
)
from .common import check_src_dst, make_output_dir, os_error_text
from .datalist import DATALIST_NAME, check_split, same_or_none, split_entries
from .lidc_case import (
    AIR_HU,
    IMAGE_KEY,
    check_spacing,
    dropped_note,
    preprocess_ct,
    process_case,
    resample,
    with_dropped,
)
from .lidc_dicom import SeriesError, hu_from_dataset, lps_to_ras, read_ct_series
from .lidc_discovery import SERIES_RULES, DicomSeries, LidcCase, find_cases
from .report import SUMMARY_NAME, close_batch, run_summary, write_datalist
from .volume import check_pool, check_spatial_size

__all__ = [
    "IMAGE_KEY",
    "SERIES_RULES",
    "AIR_HU",
    "SeriesError",
    "DicomSeries",
    "LidcCase",
    "find_cases",
    "hu_from_dataset",
    "read_ct_series",
    "lps_to_ras",
    "resample",
    "preprocess_ct",
    "prepare_lidc",
    "main",
]

logger = logging.getLogger(__name__)


def prepare_lidc(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    series_rule: str = "most_slices",
    spacing: float | Sequence[float] = 1.0,
    spatial_size: Sequence[int] = (256, 256, 256),
    window: Sequence[float] | None = None,
    percentile: float = 99.9,
    pool: int = 1,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_slices: int = 10,
    spacing_tolerance: float = 0.02,
    tilt_tolerance: float = 0.5,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare every LIDC-IDRI patient below ``src`` into ``dst``: NIfTI volumes, ``datalist.json``, reports.

    Args:
        src: the DICOM download (any depth). Only read.
        dst: output folder (created); must not overlap ``src``.
        series_rule: which CT series of a patient is used, see :data:`SERIES_RULES`.
        spacing: voxel size after resampling in mm (one number or three).
        spatial_size: ``(X, Y, Z)`` after centre crop / air padding, before pooling (256^3 as WDM).
        window: fixed HU clip ``(low, high)``; None: -1000 up to the ``percentile`` of each scan (WDM).
        percentile: top clip percentile when ``window`` is None.
        pool: average-pooling factor (2: 256^3 -> 128^3).
        split: fractions ``(training, validation, test)`` of patients, summing to 1.
        seed: seed of the patient shuffle (:func:`data_prep.datalist.split_patients`).
        min_slices: series with fewer slices are rejected.
        spacing_tolerance: relative deviation of a slice step from the median that rejects a series.
        tilt_tolerance: degrees between the slice normal and the slice stacking direction that reject a series.
        workers: processes reading headers and preparing patients.
        progress: tqdm bars and a closing message.
        overwrite: prepare every patient again instead of skipping those whose outputs are up to date.

    Returns:
        The summary (also ``dst/prepare_summary.json``; every case also in ``dst/prepare_report.csv``): ``settings``,
        ``counts`` (found / done / skipped / failed), ``done``, ``skipped`` (``{"case", "reason"}``), ``failed``
        (``{"case", "file", "reason"}``), ``cases`` (each also with ``series`` and ``dropped``, the ``.dcm`` files
        that are not DICOM files as ``{"file", "reason"}``; they are named in ``reason`` too), ``splits``,
        ``datalist``, ``report_csv``, ``seconds``.

    Raises:
        FileNotFoundError: ``src`` is not a folder or holds no DICOM file nor patient folder.
        ValueError: an argument is invalid or ``dst`` overlaps ``src``.
        OutputError: ``dst`` cannot be written (checked before reading any header), a report cannot be written, or
            the disk filled up (ENOSPC / EDQUOT): the batch then stops after that patient, the summary lists the
            patients not started, and no datalist is written. The message names the path and the errno.
        RuntimeError: patients were found but none could be prepared (the summary is still written).
    """
    start = time.perf_counter()
    if series_rule not in SERIES_RULES:
        raise ValueError(f"series_rule must be one of {sorted(SERIES_RULES)}, got {series_rule!r}.")
    settings: dict[str, Any] = {
        "series_rule": series_rule,
        "spacing": list(check_spacing(spacing)),
        "spatial_size": list(check_spatial_size(spatial_size)),
        "window": None,
        "percentile": float(percentile),
        "pool": check_pool(pool),
        "min_slices": int(min_slices),
        "spacing_tolerance": float(spacing_tolerance),
        "tilt_tolerance": float(tilt_tolerance),
    }
    if window is not None:
        try:
            lo, hi = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ValueError(f"window must be two HU values (low, high), got {window!r}.") from None
        if not hi > lo:
            raise ValueError(f"window must be (low, high) HU with low < high, got {window!r}.")
        settings["window"] = [lo, hi]
    if not 0.0 < settings["percentile"] <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}.")
    bad = [s for s in settings["spatial_size"] if s != -1 and s % settings["pool"]]
    if bad:
        raise ValueError(f"spatial_size {settings['spatial_size']} is not divisible by pool={settings['pool']}.")
    if settings["spacing_tolerance"] <= 0 or settings["tilt_tolerance"] < 0 or settings["min_slices"] < 2:
        raise ValueError("spacing_tolerance must be > 0, tilt_tolerance >= 0 and min_slices >= 2.")
    fractions = check_split(split)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")

    src_path, dst_path = check_src_dst(src, dst, "LIDC")
    cases = find_cases(src_path, workers=workers, progress=progress)
    if not cases:
        raise FileNotFoundError(
            f"No DICOM files found below {str(src_path)!r}. Expected the TCIA layout "
            "LIDC-IDRI/LIDC-IDRI-0001/<study>/<series>/1-001.dcm (files with the DICOM preamble)."
        )
    make_output_dir(dst_path)

    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for case in cases:
        files = case.files
        try:
            fingerprint = input_fingerprint(files) if files else ""
        except Exception as err:  # noqa: BLE001 - e.g. a file removed since discovery: this patient fails alone
            records[case.case_id] = {
                "case": case.case_id,
                "patient": case.case_id,
                "status": "failed",
                "file": str(getattr(err, "filename", None) or case.folder),
                "reason": f"cannot read the file: {os_error_text(err)}",
                **dropped_note(case),
            }
            continue
        previous = (
            None if overwrite or not fingerprint else read_case_record(dst_path / case.case_id, fingerprint, settings)
        )
        if previous is not None:
            records[case.case_id] = {
                "case": case.case_id,
                "patient": case.case_id,
                "status": "skipped",
                "reason": UP_TO_DATE,
                "outputs": previous["outputs"],
                "shape": previous["shape"],
                "spacing": previous["spacing"],
                "series": previous.get("series"),
                **dropped_note(case),
            }
        else:
            jobs.append((case.case_id, (case, str(dst_path), settings, fingerprint)))
    ran, full, waiting = run_batch(
        process_case, jobs, {c.case_id: c.case_id for c in cases}, workers, "LIDC patients", progress
    )
    records |= ran

    current = [
        records[c.case_id]
        for c in cases
        if records[c.case_id]["status"] == "done" or records[c.case_id].get("reason") == UP_TO_DATE
    ]
    ordered = [with_dropped(records[c.case_id]) for c in cases]
    datalist_path = dst_path / DATALIST_NAME
    summary = run_summary(
        src_path,
        dst_path,
        settings | {"split": list(fractions), "seed": int(seed)},
        ordered,
        datalist_path if current and full is None else None,
        {"series": "", "dropped": []},
    )
    counts = summary["counts"]
    for entry in summary["failed"]:
        logger.warning("failed %s (%s): %s", entry["case"], entry["file"], entry["reason"])
    nothing_prepared = (
        f"None of the {len(cases)} LIDC patients below {str(src_path)!r} could be prepared "
        f"({counts['failed']} failed); see {dst_path / SUMMARY_NAME}."
    )
    close_batch(summary, ordered, full, waiting, "patients", start, None if current else nothing_prepared)

    entries = split_entries(current, fractions, seed)
    shape = same_or_none([r["shape"] for r in current], tol=0)
    datalist: dict[str, Any] = {
        "name": "LIDC-IDRI (prepared by data_prep.lidc)",
        "description": "Preprocessed chest CT volumes; paths are relative to this file's folder.",
        "tensorImageSize": "3D",
        "modality": "CT",
        "image_key": IMAGE_KEY,
        "spatial_size": [int(v) for v in shape] if shape is not None else None,
        "spacing": same_or_none([r["spacing"] for r in current]),
        "intensity_range": [0.0, 1.0],
        "hu_clip": {
            "low": settings["window"][0] if settings["window"] else AIR_HU,
            "high": settings["window"][1] if settings["window"] else f"percentile {settings['percentile']:g}",
        },
        "series_rule": series_rule,
        "resample_spacing": settings["spacing"],
        "pool": settings["pool"],
        "split": list(fractions),
        "seed": int(seed),
        "numTraining": len(entries["training"]),
        "numValidation": len(entries["validation"]),
        "numTest": len(entries["test"]),
        **entries,
    }
    write_datalist(summary, datalist, start)
    if progress:
        print(
            f"Prepared {counts['done']} of {len(cases)} LIDC patients ({counts['skipped']} skipped as up to date, "
            f"{counts['failed']} failed) into {dst_path}\n  datalist: {datalist_path} (training "
            f"{summary['splits']['training']}, validation {summary['splits']['validation']}, test "
            f"{summary['splits']['test']})\n  summary:  {dst_path / SUMMARY_NAME}\n  report:   {summary['report_csv']}"
        )
    return summary


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.lidc",
        description="Prepare the LIDC-IDRI DICOM download into [0, 1] CT NIfTI volumes and a MONAI datalist.\n"
        "Example: python -m data_prep.lidc --src /data/LIDC-IDRI --dst data/lidc128 --pool 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="folder with the DICOM download (only read)")
    parser.add_argument("--dst", required=True, help="output folder, outside --src")
    parser.add_argument(
        "--series-rule",
        default="most_slices",
        choices=sorted(SERIES_RULES),
        help="which CT series per patient: most_slices (default) or thinnest",
    )
    parser.add_argument(
        "--spacing",
        nargs="+",
        type=float,
        default=[1.0],
        metavar="MM",
        help="voxel size after resampling, one value or three (default: 1)",
    )
    parser.add_argument(
        "--spatial-size",
        nargs=3,
        type=int,
        default=(256, 256, 256),
        metavar=("X", "Y", "Z"),
        help="size after centre crop / air padding, before pooling (default: 256 256 256)",
    )
    parser.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="fixed HU clip (default: -1000 up to the --percentile of each scan, as WDM)",
    )
    parser.add_argument("--percentile", type=float, default=99.9, help="top clip percentile (default: 99.9)")
    parser.add_argument("--pool", type=int, default=1, help="average-pooling factor, 2 gives 128^3 (default: 1)")
    parser.add_argument("--min-slices", type=int, default=10, help="reject series with fewer slices (default: 10)")
    parser.add_argument(
        "--spacing-tolerance",
        type=float,
        default=0.02,
        help="relative slice-step deviation that rejects a series (default: 0.02)",
    )
    parser.add_argument(
        "--tilt-tolerance", type=float, default=0.5, help="degrees of gantry tilt that reject a series (default: 0.5)"
    )
    add_batch_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 0: no case failed, 1: some or all cases failed, 2: bad arguments, a
    missing source, or an output that cannot be written (an unwritable ``--dst``, a full disk).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spacing = args.spacing[0] if len(args.spacing) == 1 else args.spacing
    return run_tool(
        lambda: prepare_lidc(
            args.src,
            args.dst,
            series_rule=args.series_rule,
            spacing=spacing,
            spatial_size=args.spatial_size,
            window=args.window,
            percentile=args.percentile,
            pool=args.pool,
            split=args.split,
            seed=args.seed,
            min_slices=args.min_slices,
            spacing_tolerance=args.spacing_tolerance,
            tilt_tolerance=args.tilt_tolerance,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
        ),
        args.quiet,
        ("patient", "patients"),
    )


if __name__ == "__main__":
    sys.exit(main())
