"""Reliability of the preparation tools (data_prep.brats, data_prep.lidc) against bad files and bad destinations.

- a self-referencing symlink among the inputs fails its case only; the good cases are prepared;
- an unwritable ``--dst`` is one clear line naming the path and the errno, exit status 2, nothing left behind;
- a write error (full disk, permissions) names the *destination* and the errno, leaves no partial file; a full disk
  stops the batch with exit status 2 instead of failing every remaining case the same way;
- zero-byte and self-looping ``.dcm`` files are listed (path and reason) in the LIDC case report, with a warning.

A full disk is simulated by replacing ``nibabel.save`` (what every NIfTI output goes through) with a writer that puts a
few bytes into its target and then raises ``OSError(ENOSPC)``, as a real full disk does half-way through a file.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_data_prep import _case_2023

from data_prep import brats, lidc
from data_prep.common import OutputError
from data_prep.ct_phantom import make_phantom_raw, phantom_case_id

REPO = Path(__file__).resolve().parents[1]
SMALL = {"spatial_size": (8, 8, 8), "progress": False}
BRATS_ARGS = ["--spatial-size", "8", "8", "8", "--quiet"]
LIDC_SHAPE, LIDC_SPACING = (16, 16, 12), (3.0, 3.0, 3.0)
LIDC_PREP = {"spacing": 6.0, "spatial_size": (8, 8, 8), "min_slices": 4, "progress": False}
LIDC_ARGS = ["--spacing", "6", "--spatial-size", "8", "8", "8", "--min-slices", "4", "--quiet"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry below ``root``: a symlink by its target (it may loop), a file by its content hash and mtime."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files + dirnames:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            else:
                out[key] = "dir"
    return out


def _brats_raw(src: Path, n: int, seed: int = 0, mods=("t1n", "seg")) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"BraTS-GLI-{i:05d}-000" for i in range(n)]
    for case_id in ids:
        _case_2023(src, case_id, rng, mods=mods, shape=(6, 6, 6))
    return ids


def _leftovers(dst: Path) -> list[Path]:
    """Temporary or hidden files (a half-written output) anywhere below ``dst``."""
    return [p for p in dst.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


class _FullDisk:
    """Stands in for ``nibabel.save``: the first ``ok`` saves are real, later ones write part of the file and raise
    ENOSPC (or ``code``), the way a write that runs out of space fails half-way."""

    def __init__(self, ok: int, code: int = errno.ENOSPC) -> None:
        self.ok, self.code, self.calls, self.real = ok, code, 0, nib.save

    def __call__(self, img, filename, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.ok:
            return self.real(img, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise OSError(self.code, os.strerror(self.code))


def _summary(dst: Path) -> dict:
    return json.loads((dst / "prepare_summary.json").read_text())


def _run_cli(tool: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"data_prep.{tool}", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def lidc_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc_raw")
    make_phantom_raw(root, num_cases=3, seed=4, shape=LIDC_SHAPE, spacing=LIDC_SPACING)
    return root


# --------------------------------------------------------------------------------------------------------------------
# 1. a self-referencing symlink fails its case only
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_self_referencing_symlink_fails_its_case_and_the_good_cases_are_prepared(tmp_path, workers):
    src, dst = tmp_path / "raw", tmp_path / "out"
    ids = _brats_raw(src, 3)
    loop = src / ids[1] / f"{ids[1]}-seg.nii.gz"
    loop.unlink()
    loop.symlink_to(loop.name)  # ln -s x.nii.gz x.nii.gz
    before = _snapshot(src)

    rc = brats.main(["--src", str(src), "--dst", str(dst), "--workers", str(workers), *BRATS_ARGS])

    assert rc == 1  # a case failed, the others were prepared
    summary = _summary(dst)
    assert summary["counts"] == {"found": 3, "done": 2, "skipped": 0, "failed": 1}
    (failed,) = summary["failed"]
    assert failed["case"] == ids[1] and failed["file"] == str(loop)
    assert "Too many levels of symbolic links (ELOOP)" in failed["reason"]
    rows = {r["case"]: r for r in csv.DictReader((dst / "prepare_report.csv").open())}
    assert rows[ids[1]]["status"] == "failed" and rows[ids[1]]["file"] == str(loop)
    for case_id in (ids[0], ids[2]):
        assert rows[case_id]["status"] == "done"
        for mod in ("t1n", "seg"):
            assert nib.load(str(dst / case_id / f"{case_id}-{mod}.nii.gz")).shape == (8, 8, 8)
    assert not (dst / ids[1]).exists()
    listed = [e["case"] for k in brats.SPLIT_KEYS for e in json.loads((dst / "datalist.json").read_text())[k]]
    assert sorted(listed) == [ids[0], ids[2]]
    assert _snapshot(src) == before


# --------------------------------------------------------------------------------------------------------------------
# 5. an unwritable --dst
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["brats", "lidc"])
def test_a_dst_that_cannot_be_a_folder_is_one_line_and_exit_status_2(tmp_path, lidc_raw, tool):
    src = lidc_raw if tool == "lidc" else tmp_path / "raw"
    if tool == "brats":
        _brats_raw(src, 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dst = blocker / "out"
    before = _snapshot(src)

    proc = _run_cli(tool, ["--src", str(src), "--dst", str(dst), *(BRATS_ARGS if tool == "brats" else LIDC_ARGS)])

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(dst) in lines[0] and "Not a directory (ENOTDIR)" in lines[0]
    assert blocker.read_text() == "not a folder" and not dst.exists()
    assert _snapshot(src) == before


@pytest.mark.parametrize("tool", ["brats", "lidc"])
def test_a_dst_without_write_permission_is_one_line_and_exit_status_2(tmp_path, lidc_raw, monkeypatch, capsys, tool):
    src = lidc_raw if tool == "lidc" else tmp_path / "raw"
    if tool == "brats":
        _brats_raw(src, 2)
    locked = tmp_path / "locked"
    locked.mkdir()
    dst = locked / "prepared" / "out"
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: refuse the folder creation as the kernel would for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    main = brats.main if tool == "brats" else lidc.main
    try:
        rc = main(["--src", str(src), "--dst", str(dst), *(BRATS_ARGS if tool == "brats" else LIDC_ARGS)])
    finally:
        locked.chmod(0o755)

    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(dst) in lines[0] and "Permission denied (EACCES)" in lines[0]
    assert list(locked.iterdir()) == []  # nothing partial: not even an empty folder


def test_the_writability_check_leaves_no_folder_behind_when_nothing_is_found(tmp_path):
    (tmp_path / "empty").mkdir()
    dst = tmp_path / "new" / "out"
    with pytest.raises(FileNotFoundError, match="No BraTS files"):
        brats.prepare_brats(tmp_path / "empty", dst, progress=False)
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------------------------------
# 6. write errors name the destination; a full disk stops the batch
# --------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_names_the_destination_stops_the_batch_and_leaves_nothing_partial(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "raw", tmp_path / "out"
    ids = _brats_raw(src, 4)
    before = _snapshot(src)
    full = _FullDisk(ok=3)  # case 0: t1n + seg; case 1: t1n written, then its seg hits the full disk
    monkeypatch.setattr(nib, "save", full)

    rc = brats.main(["--src", str(src), "--dst", str(dst), *BRATS_ARGS])

    err = capsys.readouterr().err
    target = dst / ids[1] / f"{ids[1]}-seg.nii.gz"
    assert rc == 2
    assert full.calls == 4  # the batch stopped: cases 2 and 3 were not read, processed nor written
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(target) in lines[0] and "No space left on device (ENOSPC)" in lines[0]
    assert str(src) not in lines[0]  # the source it was reading is not blamed
    summary = _summary(dst)
    status = {c["case"]: c for c in summary["cases"]}
    assert status[ids[0]]["status"] == "done"
    assert status[ids[1]]["status"] == "failed" and status[ids[1]]["file"] == str(target)
    assert "No space left on device (ENOSPC)" in status[ids[1]]["reason"]
    assert all(status[i]["status"] == "skipped" and "not started" in status[i]["reason"] for i in ids[2:])
    assert summary["counts"]["failed"] == 1
    assert not (dst / ids[1]).exists()  # its t1n, written before the disk filled up, is removed too
    assert not (dst / ids[2]).exists() and not (dst / ids[3]).exists()
    assert _leftovers(dst) == []
    assert _snapshot(src) == before

    monkeypatch.setattr(nib, "save", full.real)  # space freed: the re-run finishes the rest
    assert brats.main(["--src", str(src), "--dst", str(dst), *BRATS_ARGS]) == 0
    again = _summary(dst)
    assert again["done"] == ids[1:] and again["skipped"] == [{"case": ids[0], "reason": "up to date"}]


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="workers must inherit the patched writer")
def test_a_full_disk_stops_a_parallel_batch_too(tmp_path, monkeypatch):
    src, dst = tmp_path / "raw", tmp_path / "out"
    ids = _brats_raw(src, 6)
    real = nib.save

    def save(img, filename, *args, **kwargs):  # forked workers inherit this
        if Path(filename).parent.name == ids[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(img, filename, *args, **kwargs)

    monkeypatch.setattr(nib, "save", save)
    with pytest.raises(OutputError, match=r"No space left on device \(ENOSPC\)") as info:
        brats.prepare_brats(src, dst, workers=2, **SMALL)

    assert info.value.errno == errno.ENOSPC and str(dst / ids[0] / f"{ids[0]}-t1n.nii.gz") in str(info.value)
    status = {c["case"]: c for c in _summary(dst)["cases"]}
    assert status[ids[0]]["status"] == "failed"
    for case_id in ids[1:]:  # finished while the failure came in, or never started: nothing else failed
        assert status[case_id]["status"] == "done" or "not started" in status[case_id]["reason"]
    assert not (dst / ids[0]).exists() and _leftovers(dst) == []


def _fails_first(i: int) -> dict:  # module level: picklable for the worker processes
    if i:
        time.sleep(0.2)
    return {"case": i, "status": "failed" if i == 0 else "done"}


@pytest.mark.parametrize("workers", [1, 2])
def test_run_cases_stops_starting_cases_once_told_to(workers):
    records = brats.run_cases(
        _fails_first,
        [(i, (i,)) for i in range(12)],
        workers=workers,
        desc="x",
        progress=False,
        crashed=lambda key, err: {"case": key, "status": "crashed"},
        stop=lambda r: r["status"] == "failed",
    )
    assert records[0]["status"] == "failed"
    assert all(r["status"] == "done" for k, r in records.items() if k)  # cancelled cases are not made up
    if workers == 1:
        assert sorted(records) == [0]
    else:  # only what was already handed to a worker still runs
        assert len(records) <= 2 * workers + 2 and 11 not in records


def test_a_permission_error_while_writing_names_the_destination_and_the_batch_goes_on(tmp_path, monkeypatch):
    src, dst = tmp_path / "raw", tmp_path / "out"
    ids = _brats_raw(src, 3)
    real = nib.save

    def save(img, filename, *args, **kwargs):
        if Path(filename).parent.name == ids[1]:  # e.g. a case folder left behind by another user
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(img, filename, *args, **kwargs)

    monkeypatch.setattr(nib, "save", save)
    summary = brats.prepare_brats(src, dst, **SMALL)

    assert summary["done"] == [ids[0], ids[2]]
    (failed,) = summary["failed"]
    target = dst / ids[1] / f"{ids[1]}-t1n.nii.gz"
    assert failed["case"] == ids[1] and failed["file"] == str(target)
    assert str(target) in failed["reason"] and "Permission denied (EACCES)" in failed["reason"]
    assert not (dst / ids[1]).exists() and _leftovers(dst) == []


def test_lidc_full_disk_names_the_destination_and_stops(tmp_path, lidc_raw, monkeypatch, capsys):
    dst = tmp_path / "out"
    before = _snapshot(lidc_raw)
    full = _FullDisk(ok=0)
    monkeypatch.setattr(nib, "save", full)

    rc = lidc.main(["--src", str(lidc_raw), "--dst", str(dst), *LIDC_ARGS])

    err = capsys.readouterr().err
    first = phantom_case_id(0)
    target = dst / first / f"{first}-ct.nii.gz"
    assert rc == 2 and full.calls == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(target) in lines[0] and "No space left on device (ENOSPC)" in lines[0]
    status = {c["case"]: c for c in _summary(dst)["cases"]}
    assert status[first]["status"] == "failed" and status[first]["file"] == str(target)
    assert [status[phantom_case_id(i)]["status"] for i in (1, 2)] == ["skipped", "skipped"]
    assert not (dst / first).exists() and _leftovers(dst) == [] and not (dst / "datalist.json").exists()
    assert _snapshot(lidc_raw) == before


# --------------------------------------------------------------------------------------------------------------------
# 8a. dropped DICOM files are listed
# --------------------------------------------------------------------------------------------------------------------


def test_lidc_lists_dropped_dicom_files_with_their_reason_and_warns(tmp_path, caplog):
    src = tmp_path / "raw"
    cases = make_phantom_raw(src, num_cases=2, seed=5, shape=LIDC_SHAPE, spacing=LIDC_SPACING)
    series_dir = cases[0].files[0].parent
    empty = series_dir / "1-900.dcm"
    empty.write_bytes(b"")
    loop = series_dir / "1-901.dcm"
    loop.symlink_to(loop.name)
    emptied = cases[1].files[len(cases[1].files) // 2]  # a slice of the series itself, emptied
    emptied.write_bytes(b"")
    (series_dir / "notes.xml").write_text("<LidcReadMessage/>")  # not named .dcm: still ignored
    before = _snapshot(src)

    with caplog.at_level(logging.WARNING, logger="data_prep.lidc"):
        summary = lidc.prepare_lidc(src, tmp_path / "out", **LIDC_PREP)

    status = {c["case"]: c for c in summary["cases"]}
    ok, broken = status[cases[0].case_id], status[cases[1].case_id]
    assert ok["status"] == "done"  # its series is complete; the stray files are listed, not fatal
    assert {d["file"]: d["reason"] for d in ok["dropped"]} == {
        str(empty): "empty file (0 bytes)",
        str(loop): "cannot be read: Too many levels of symbolic links (ELOOP)",
    }
    assert broken["status"] == "failed" and "missing slice(s)" in broken["reason"]
    assert broken["dropped"] == [{"file": str(emptied), "reason": "empty file (0 bytes)"}]
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "out" / "prepare_report.csv").open())}
    assert str(empty) in rows[cases[0].case_id]["reason"] and str(loop) in rows[cases[0].case_id]["reason"]
    assert str(emptied) in rows[cases[1].case_id]["reason"]
    assert "notes.xml" not in json.dumps(summary)
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for path in (empty, loop, emptied):
        assert str(path) in warned
    assert _snapshot(src) == before

    # a re-run that skips the case as up to date still lists what it dropped
    again = lidc.prepare_lidc(src, tmp_path / "out", **LIDC_PREP)
    again_ok = {c["case"]: c for c in again["cases"]}[cases[0].case_id]
    assert again_ok["status"] == "skipped" and len(again_ok["dropped"]) == 2


def test_lidc_a_patient_with_only_dropped_files_is_a_failed_case_naming_them(tmp_path):
    src = tmp_path / "raw"
    cases = make_phantom_raw(src, num_cases=1, seed=6, shape=LIDC_SHAPE, spacing=LIDC_SPACING)
    lonely = src / "LIDC-IDRI-0042" / "study" / "series" / "1-001.dcm"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(b"")

    summary = lidc.prepare_lidc(src, tmp_path / "out", **LIDC_PREP)

    status = {c["case"]: c for c in summary["cases"]}
    assert status[cases[0].case_id]["status"] == "done"
    bad = status["LIDC-IDRI-0042"]
    assert bad["status"] == "failed" and "no readable DICOM file" in bad["reason"] and str(lonely) in bad["reason"]
    assert bad["dropped"] == [{"file": str(lonely), "reason": "empty file (0 bytes)"}]
