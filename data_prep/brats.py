"""BraTS preparation: raw NIfTI downloads in, preprocessed NIfTI volumes and a MONAI datalist out.

    python -m data_prep.brats --src RAW --dst OUT [--preset wdm] [--pool 2] [--modalities t1n t2w] ...

Cases are found in either BraTS naming scheme at any depth (:mod:`data_prep.brats_discovery`: the schemes, modality
renaming, label conventions) and prepared one volume at a time (:mod:`data_prep.brats_case`): images clipped to
percentiles and scaled to [0, 1], then centre pad/crop and pooling, the affine updated by every step. The presets are
in :data:`PRESETS`; every step can be overridden.

Outputs: ``OUT/<case>/<case>-<mod>.nii.gz`` (float32 images in [0, 1], uint8 label map), each written to a temporary
file in the same folder and moved into place with ``os.replace``, so a file that exists is complete. The source
folder is only read. A case that is missing a requested modality, an empty case folder, and a case with an
unreadable or inconsistent file (a dangling or self-referencing symlink included) are *failed* (file name and reason
recorded) and the others go on; a case with two files for one modality is *skipped*. ``OUT/prepare_summary.json``
(JSON) and ``OUT/prepare_report.csv`` list every case as done / skipped (why) / failed (why); the command exits with 1
when any case failed.

The output side is checked first: an ``--dst`` that cannot be created or written is one error line naming the path and
the errno (``Permission denied (EACCES)``), exit status 2, before any work and with nothing left behind. A write that
fails later names the output file and the errno, not the source being read, and removes the case's partial outputs.
A full disk (``No space left on device (ENOSPC)``, or a quota) stops the batch with exit status 2: the cases not
started are listed as skipped, no datalist is written, and a re-run after freeing space finishes the rest.

Re-runs: each finished case gets ``OUT/<case>/prepare_record.json`` (written after its volumes) with a fingerprint
of its input files (paths, sizes, modification times) and the per-case settings. A later run skips a case whose
record matches and whose outputs exist (``skipped``, reason ``"up to date"``; it stays in the datalist), and
prepares it again otherwise; ``--overwrite`` prepares everything again. ``--workers N`` prepares cases in N
processes; a tqdm bar shows progress.

Split and datalist: patients (the case id without the BraTS 2023 timepoint suffix, ``BraTS-GLI-00000`` for
``BraTS-GLI-00000-000``) are shuffled with ``seed`` and divided into training / validation / test (0.8 / 0.1 / 0.1 by
default), so all timepoints of a patient land in one split. ``OUT/datalist.json`` holds::

    {"name": "BraTS (prepared by data_prep.brats)", "preset": "wdm", "spatial_size": [128, 128, 128],
     "spacing": [2.0, 2.0, 2.0], "intensity_range": [0.0, 1.0], "modalities": ["t1n", "t2w"], "label_key": "seg",
     "labels": {"0": "background", ...}, "percentiles": [0.1, 99.9], "pool": 2, "split": [0.8, 0.1, 0.1], "seed": 0,
     "numTraining": 13, "numValidation": 2, "numTest": 1,
     "training": [{"case": "BraTS-GLI-00000-000", "patient": "BraTS-GLI-00000",
                   "t1n": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz", "t2w": "...", "seg": "..."}, ...],
     "validation": [...], "test": [...]}

with paths relative to ``OUT``; :func:`load_datalist` (:mod:`data_prep.datalist`) loads one split back with absolute
paths and checks that every file exists.

What both tools share: :mod:`data_prep.volume` (array and affine maths), :mod:`data_prep.datalist` (split,
datalist), :mod:`data_prep.batch` (re-runs, the parallel loop), :mod:`data_prep.report` (summary, CSV report) and
:mod:`data_prep.common` (output errors, atomic writes). This module runs the whole dataset and the command line.
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
    run_cases,
    run_tool,
    write_case_record,
)
from .brats_case import preprocess_image, preprocess_label, process_case
from .brats_discovery import (
    BRATS_LABELS,
    MODALITIES,
    MODALITY_ALIASES,
    SEG,
    BratsCase,
    find_cases,
    label_table,
    normalize_modalities,
    patient_id,
    subchallenge,
)
from .common import NOT_STARTED, check_src_dst, make_output_dir, os_error_text
from .datalist import (
    DATALIST_NAME,
    SPLIT_KEYS,
    check_split,
    load_datalist,
    same_or_none,
    split_entries,
    split_patients,
)
from .report import SUMMARY_NAME, close_batch, run_summary, write_datalist, write_report
from .volume import (
    SEG_POOL_MODES,
    check_percentiles,
    check_pool,
    check_spatial_size,
    normalize_intensity,
    pad_or_crop,
    pool_volume,
)

__all__ = [
    "MODALITIES",
    "SEG",
    "MODALITY_ALIASES",
    "PRESETS",
    "SEG_POOL_MODES",
    "SPLIT_KEYS",
    "BRATS_LABELS",
    "BratsCase",
    "find_cases",
    "patient_id",
    "subchallenge",
    "normalize_modalities",
    "normalize_intensity",
    "pad_or_crop",
    "pool_volume",
    "preprocess_image",
    "preprocess_label",
    "split_patients",
    "input_fingerprint",
    "read_case_record",
    "write_case_record",
    "run_cases",
    "write_report",
    "prepare_brats",
    "load_datalist",
    "main",
]

logger = logging.getLogger(__name__)

#: Preprocessing presets (REFERENCE section 1): WDM pads 240x240x155 to 256^3 (``pool=2`` gives 128^3); cWDM
#: crops/pads to 224x224x160. Both clip at the 0.1 / 99.9 percentiles and scale to [0, 1].
PRESETS: dict[str, dict[str, Any]] = {
    "wdm": {"percentiles": (0.1, 99.9), "spatial_size": (256, 256, 256), "pool": 1},
    "cwdm": {"percentiles": (0.1, 99.9), "spatial_size": (224, 224, 160), "pool": 1},
}


def prepare_brats(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    modalities: Sequence[str] | None = None,
    preset: str = "wdm",
    percentiles: Sequence[float] | None = None,
    spatial_size: Sequence[int] | None = None,
    pool: int | None = None,
    seg_pool: str = "mode",
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    harmonize_labels: bool = True,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare every BraTS case below ``src`` into ``dst``: NIfTI volumes, ``datalist.json``, ``prepare_summary.json``
    and ``prepare_report.csv``.

    Args:
        src: folder with the extracted BraTS download(s) (either naming scheme, any depth). Only read.
        dst: output folder (created); must not be inside ``src`` nor contain it.
        modalities: which of ``t1n, t1c, t2w, t2f, seg`` to prepare (2021 names accepted); None: every modality
            found in any case. A case that lacks one of them is skipped and reported.
        preset: ``"wdm"`` (clip 0.1/99.9 percentiles, [0, 1], pad to 256^3) or ``"cwdm"`` (224x224x160), see
            :data:`PRESETS`; the next three arguments override single steps of it.
        percentiles: clip percentiles ``(low, high)``; None: the preset's. ``(0, 100)`` means no clipping.
        spatial_size: size ``(X, Y, Z)`` after centre padding/cropping and before pooling; ``-1`` keeps an axis;
            None: the preset's.
        pool: average-pooling factor (2: 256^3 -> 128^3); None: the preset's (1).
        seg_pool: how the label map is pooled: ``"mode"`` (default), ``"max"`` or ``"nearest"``.
        split: fractions ``(training, validation, test)`` of *patients*, summing to 1.
        seed: seed of the patient shuffle.
        harmonize_labels: map BraTS 2021 label 4 (ET) to 3, the BraTS 2023 label, so all cases share one convention.
        workers: processes preparing cases in parallel (1: in this process).
        progress: show a tqdm bar and print where the output went.
        overwrite: prepare every case again; by default a case whose ``prepare_record.json`` matches the current
            input fingerprint (paths, sizes, modification times) and per-case settings, and whose outputs all exist,
            is skipped with the reason ``"up to date"`` (and still listed in the datalist).

    Returns:
        The summary (also written to ``dst/prepare_summary.json``): ``settings``, ``counts`` (found / done / skipped /
        failed), ``done`` (case ids), ``skipped`` (``{"case", "reason"}``), ``failed`` (``{"case", "file", "reason"}``),
        ``cases`` (every case: ``case``, ``patient``, ``status``, ``reason``, ``file``, ``outputs``), ``splits`` (cases
        per split), ``datalist`` (its path), ``report_csv`` and ``seconds``. A missing modality, an empty case folder
        and an unreadable or inconsistent file are failures; duplicated files and up-to-date cases are skips.

    Raises:
        FileNotFoundError: ``src`` is not a folder, or holds no BraTS-named files.
        ValueError: an argument is invalid, or ``dst`` overlaps ``src``.
        OutputError: ``dst`` cannot be written (checked before any work), a report cannot be written, or the disk
            filled up (ENOSPC / EDQUOT): the batch then stops after that case, the summary lists the cases not started,
            and no datalist is written. The message names the path and the errno.
        RuntimeError: cases were found but none could be prepared (the summary is still written).
    """
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    cfg = dict(PRESETS[preset])
    if percentiles is not None:
        cfg["percentiles"] = percentiles
    if spatial_size is not None:
        cfg["spatial_size"] = spatial_size
    if pool is not None:
        cfg["pool"] = pool
    cfg["percentiles"] = check_percentiles(cfg["percentiles"])
    cfg["spatial_size"] = check_spatial_size(cfg["spatial_size"])
    cfg["pool"] = check_pool(cfg["pool"])
    bad = [s for s in cfg["spatial_size"] if s != -1 and s % cfg["pool"]]
    if bad:
        raise ValueError(
            f"spatial_size {list(cfg['spatial_size'])} is not divisible by pool={cfg['pool']}; choose a size that "
            "is a multiple of the pooling factor (e.g. 256 with pool 2)."
        )
    if seg_pool not in SEG_POOL_MODES:
        raise ValueError(f"seg_pool must be one of {SEG_POOL_MODES}, got {seg_pool!r}.")
    fractions = check_split(split)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    wanted = normalize_modalities(modalities) if modalities is not None else None

    src_path, dst_path = check_src_dst(src, dst, "BraTS")
    cases = find_cases(src_path)
    if not cases:
        raise FileNotFoundError(
            f"No BraTS files found below {str(src_path)!r}. Expected names like "
            "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz (2023+) or "
            "BraTS2021_00000/BraTS2021_00000_t1.nii.gz (2021 and earlier)."
        )
    if wanted is None:
        present = {m for c in cases for m in c.files}
        wanted = [m for m in MODALITIES + (SEG,) if m in present]
    settings = {
        "preset": preset,
        "modalities": wanted,
        "percentiles": list(cfg["percentiles"]),
        "spatial_size": list(cfg["spatial_size"]),
        "pool": cfg["pool"],
        "seg_pool": seg_pool,
        "harmonize_labels": bool(harmonize_labels),
        "split": list(fractions),
        "seed": int(seed),
    }
    make_output_dir(dst_path)
    case_settings = {k: v for k, v in settings.items() if k not in ("split", "seed")}  # what a case's output depends on

    records: dict[str, dict[str, Any]] = {}
    jobs = []
    for case in cases:
        try:
            fingerprint = input_fingerprint(case.files.values()) if case.files else ""
        except Exception as err:  # noqa: BLE001 - e.g. a dangling or looping symlink: this case fails, others go on
            records[case.case_id] = {
                "case": case.case_id,
                "patient": case.patient_id,
                "status": "failed",
                "file": str(getattr(err, "filename", None) or ""),
                "reason": f"cannot read the file: {os_error_text(err)}",
            }
            continue
        previous = (
            None
            if overwrite or not fingerprint
            else read_case_record(dst_path / case.case_id, fingerprint, case_settings)
        )
        if previous is not None:
            records[case.case_id] = {
                "case": case.case_id,
                "patient": case.patient_id,
                "status": "skipped",
                "reason": UP_TO_DATE,
                "outputs": previous["outputs"],
                "shape": previous["shape"],
                "spacing": previous["spacing"],
            }
        else:
            jobs.append((case.case_id, (case, wanted, str(dst_path), case_settings, fingerprint)))
    patients = {c.case_id: c.patient_id for c in cases}
    ran, full, waiting = run_batch(process_case, jobs, patients, workers, "BraTS cases", progress)
    records |= ran

    ordered = [records[c.case_id] for c in cases]
    current = [r for r in ordered if r["status"] == "done" or r.get("reason") == UP_TO_DATE]
    datalist_path = dst_path / DATALIST_NAME
    summary = run_summary(src_path, dst_path, settings, ordered, datalist_path if current and full is None else None)
    counts = summary["counts"]
    for entry in summary["skipped"]:
        if entry["reason"] != UP_TO_DATE and not entry["reason"].startswith(NOT_STARTED):  # those: one error line
            logger.warning("skipped %s: %s", entry["case"], entry["reason"])
    for entry in summary["failed"]:
        logger.warning("failed %s (%s): %s", entry["case"], entry["file"], entry["reason"])
    nothing_prepared = (
        f"None of the {len(cases)} BraTS cases below {str(src_path)!r} could be prepared "
        f"({counts['skipped']} skipped, {counts['failed']} failed); see {dst_path / SUMMARY_NAME}."
    )
    close_batch(summary, ordered, full, waiting, "cases", start, None if current else nothing_prepared)

    entries = split_entries(current, fractions, seed)
    images = [m for m in wanted if m != SEG]
    has_seg = SEG in wanted
    challenges = sorted({subchallenge(r["case"]) for r in current})
    labels, convention = label_table(challenges, harmonize_labels) if has_seg else ({}, None)
    if has_seg and len(challenges) > 1:
        logger.warning(
            "the datalist mixes BraTS sub-challenges %s, whose label maps use the same values for "
            "different regions; the datalist's 'labels' cannot describe them.",
            challenges,
        )
    shape = same_or_none([r["shape"] for r in current], tol=0)  # None when cases differ (a -1 in spatial_size)
    datalist: dict[str, Any] = {
        "name": "BraTS (prepared by data_prep.brats)",
        "description": "Preprocessed BraTS volumes; paths are relative to this file's folder.",
        "tensorImageSize": "3D",
        "preset": preset,
        "spatial_size": [int(v) for v in shape] if shape is not None else None,
        "spacing": same_or_none([r["spacing"] for r in current]),
        "intensity_range": [0.0, 1.0],
        "modalities": images,
        "label_key": SEG if has_seg else None,
        "labels": labels,
        "label_convention": convention,
        "subchallenges": challenges,
        "percentiles": settings["percentiles"],
        "pool": settings["pool"],
        "split": settings["split"],
        "seed": settings["seed"],
        "numTraining": len(entries["training"]),
        "numValidation": len(entries["validation"]),
        "numTest": len(entries["test"]),
        **entries,
    }
    write_datalist(summary, datalist, start)
    if progress:
        up_to_date = sum(1 for r in ordered if r.get("reason") == UP_TO_DATE)
        print(
            f"Prepared {counts['done']} of {len(cases)} BraTS cases ({counts['skipped']} skipped, {up_to_date} of them "
            f"up to date; {counts['failed']} failed) into {dst_path}\n  datalist: {datalist_path} (training "
            f"{summary['splits']['training']}, validation {summary['splits']['validation']}, test "
            f"{summary['splits']['test']})\n  summary:  {dst_path / SUMMARY_NAME}\n  report:   {summary['report_csv']}"
        )
    return summary


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.brats",
        description="Prepare raw BraTS NIfTI (2021 or 2023+ naming) into [0, 1] NIfTI volumes and a MONAI datalist.\n"
        "Example: python -m data_prep.brats --src BraTS2023-GLI --dst brats_128 --modalities t1n --pool 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="folder with the extracted BraTS download (only read)")
    parser.add_argument("--dst", required=True, help="output folder, outside --src")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        metavar="MOD",
        help="subset of t1n t1c t2w t2f seg, 2021 names accepted (default: every modality found)",
    )
    parser.add_argument(
        "--preset",
        default="wdm",
        choices=sorted(PRESETS),
        help="wdm: clip 0.1/99.9 percentiles, [0, 1], pad to 256^3; cwdm: 224x224x160 (default: wdm)",
    )
    parser.add_argument(
        "--percentiles",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="clip percentiles (default: the preset's, 0.1 99.9; 0 100 disables clipping)",
    )
    parser.add_argument(
        "--spatial-size",
        nargs=3,
        type=int,
        default=None,
        metavar=("X", "Y", "Z"),
        help="size after centre pad/crop, before pooling; -1 keeps an axis (default: the preset's)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=None,
        help="average-pooling factor, 2 turns 256^3 into 128^3 (default: the preset's, 1)",
    )
    parser.add_argument(
        "--seg-pool", default="mode", choices=SEG_POOL_MODES, help="how the label map is pooled (default: mode)"
    )
    parser.add_argument("--no-harmonize-labels", action="store_true", help="keep BraTS 2021 label 4 instead of 3")
    add_batch_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0 when no case failed, 1 when any case failed (the others
    are still prepared and listed) or none could be prepared, 2 for bad arguments, a missing source, or an output that
    cannot be written (an unwritable ``--dst``, a full disk).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_tool(
        lambda: prepare_brats(
            args.src,
            args.dst,
            modalities=args.modalities,
            preset=args.preset,
            percentiles=args.percentiles,
            spatial_size=args.spatial_size,
            pool=args.pool,
            seg_pool=args.seg_pool,
            split=args.split,
            seed=args.seed,
            harmonize_labels=not args.no_harmonize_labels,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
        ),
        args.quiet,
        ("case", "cases"),
    )


if __name__ == "__main__":
    sys.exit(main())
