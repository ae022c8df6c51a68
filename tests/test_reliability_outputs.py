"""Reliability of what wdm3d writes: inference output folders, file modes, checkpoint saves on a full disk, a
truncated newest checkpoint, and a network too deep for the image size (CPU, seconds)."""

import errno
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from test_bundle import TINY_TRAIN, _generator, dataset, root_cause, workflow  # noqa: F401 (fixture)

from wdm3d.artifacts import load_checkpoint
from wdm3d.cli import main
from wdm3d.demo import phantom_volumes
from wdm3d.engine import TrainingCheckpoints
from wdm3d.evaluate import evaluate
from wdm3d.io import atomic_write_bytes, atomic_write_text, save_montage, save_nifti


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }  # the training lock records its holder's start time


def leftovers(folder: Path) -> list[str]:
    """Hidden or temporary entries that an interrupted write left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "tmp")) and p.name != ".lock")


# --- 2. an interrupted inference run leaves the previous output whole; evaluate refuses a mixture ------------------


def test_an_interrupted_inference_run_leaves_the_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "samples"
    first = _generator(tmp_path, out, 2, seed=5).run()
    before = snapshot(out)
    assert sorted(before) == [
        "manifest.json",
        "sample_0000.nii.gz",
        "sample_0000.png",
        "sample_0001.nii.gz",
        "sample_0001.png",
    ]

    import wdm3d.inference

    real_save, calls = wdm3d.inference.save_nifti, []

    def disk_fills_at_the_second_volume(volume, affine, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(volume, affine, path, **kw)

    monkeypatch.setattr(wdm3d.inference, "save_nifti", disk_fills_at_the_second_volume)
    with pytest.raises(OSError) as err:
        _generator(tmp_path, out, 3, seed=6).run()  # the first volume of this run was written before the disk filled
    assert err.value.errno == errno.ENOSPC
    assert snapshot(out) == before  # the previous run's files and manifest, byte for byte: no mixture
    assert json.loads((out / "manifest.json").read_text())["seed"] == first["seed"] == 5
    assert leftovers(tmp_path) == []  # the unfinished run's own folder is gone too

    # a sampler that fails (out of memory) after one batch: the same
    monkeypatch.setattr(wdm3d.inference, "save_nifti", real_save)
    broken = _generator(tmp_path, out, 3, seed=7)
    sample, n = broken.diffusion.sample, []

    def fails_on_the_second_batch(*a, **k):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("CUDA out of memory")
        return sample(*a, **k)

    broken.diffusion.sample = fails_on_the_second_batch
    with pytest.raises(RuntimeError, match="out of memory"):
        broken.run()
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_finished_inference_run_replaces_the_folder_whole_and_keeps_other_files(tmp_path):
    out = tmp_path / "samples"
    _generator(tmp_path, out, 3, seed=5).run()
    (out / "notes.txt").write_text("mine")
    manifest = _generator(tmp_path, out, 1, seed=8).run()
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "sample_0000.nii.gz",
        "sample_0000.png",
    ]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_an_output_folder_that_cannot_be_renamed_is_staged_inside_it(tmp_path, monkeypatch):
    # a mount point (a container volume) cannot be renamed: the run is staged in a hidden folder inside it
    import wdm3d.inference

    out = tmp_path / "samples"
    _generator(tmp_path, out, 2, seed=5).run()
    before = snapshot(out)
    monkeypatch.setattr(wdm3d.inference.os.path, "ismount", lambda p: Path(p) == out)
    broken, staged = _generator(tmp_path, out, 1, seed=6), []

    def out_of_memory(*a, **k):
        staged.extend(p.name for p in out.iterdir() if p.name.startswith(".wdm3d-partial-"))
        raise RuntimeError("out of memory")

    broken.diffusion.sample = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        broken.run()
    assert len(staged) == 1  # the run wrote inside the folder
    assert snapshot(out) == before and leftovers(out) == [] and leftovers(tmp_path) == []
    manifest = _generator(tmp_path, out, 1, seed=6).run()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sample_0000.nii.gz", "sample_0000.png"]
    assert json.loads((out / "manifest.json").read_text())["seed"] == manifest["seed"] == 6


def test_a_symlinked_output_folder_stays_a_link_and_leftovers_are_named(tmp_path, caplog):
    target = tmp_path / "scratch" / "samples"
    target.mkdir(parents=True)
    link = tmp_path / "samples"
    link.symlink_to(target)
    stale = tmp_path / "scratch" / ".samples.partial-dead"  # what a killed run leaves beside the folder
    stale.mkdir()
    with caplog.at_level(logging.WARNING):
        _generator(tmp_path, link, 1).run()
    assert link.is_symlink() and (target / "manifest.json").is_file() and (target / "sample_0000.nii.gz").is_file()
    assert str(stale) in caplog.text and stale.is_dir()  # named, not deleted: it may be a run still going


def _write_volumes(folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, v in zip(names, phantom_volumes(len(names), 16, seed=seed)):
        nib.save(nib.Nifti1Image(((v[0].numpy() + 1) / 2).astype(np.float32), np.eye(4)), folder / name)


@pytest.fixture
def real(tmp_path):
    _write_volumes(tmp_path / "real", [f"real_{i}.nii.gz" for i in range(3)], seed=1)
    return tmp_path / "real"


def test_evaluate_refuses_a_sample_folder_that_mixes_runs(tmp_path, real, capsys):
    fake = tmp_path / "samples"
    names = [f"sample_{i:04d}.nii.gz" for i in range(3)]
    # what an interrupted run without manifest would leave: sample_0000 of the new run beside 0001-0002 of the old one
    _write_volumes(fake, names, seed=2)
    with pytest.raises(ValueError, match=rf"{fake}.*no manifest\.json"):
        evaluate(real, fake, mlflow=False, progress=False)
    assert main(["evaluate", "--real", str(real), "--fake", str(fake), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "manifest.json" in err
    assert not (fake / "evaluation").exists()  # refused before anything was computed or written

    from wdm3d.evaluate import check_sample_folder

    # a manifest that lists only some of the volumes present
    (fake / "manifest.json").write_text(json.dumps({"samples": [{"nifti": n} for n in names[:2]]}))
    with pytest.raises(
        ValueError,
        match=rf"{fake} holds 1 NIfTI volume\(s\) that .*manifest\.json does not list.*"
        r"sample_0002\.nii\.gz",
    ):
        check_sample_folder(fake)
    # ... or one that lists a volume that is not there
    (fake / "manifest.json").write_text(json.dumps({"samples": [{"nifti": n} for n in names + ["sample_0003.nii.gz"]]}))
    with pytest.raises(FileNotFoundError, match=r"lists 1 volume\(s\) that are not in .*sample_0003\.nii\.gz"):
        check_sample_folder(fake)
    # ... or a manifest that is not JSON
    (fake / "manifest.json").write_text('{"samples": [')
    with pytest.raises(ValueError, match=r"manifest\.json is not a readable wdm3d manifest"):
        check_sample_folder(fake)
    # a complete one is accepted
    (fake / "manifest.json").write_text(json.dumps({"samples": [{"nifti": n} for n in names]}))
    check_sample_folder(fake)


def test_evaluate_still_reads_a_plain_folder_of_volumes(tmp_path, real):
    from wdm3d.evaluate import check_sample_folder

    plain = tmp_path / "plain"
    _write_volumes(plain, ["a.nii.gz", "b.nii.gz", "c.nii.gz"], seed=2)
    check_sample_folder(plain)  # never had a manifest, no sample_NNNN names: a folder of volumes, read as it is
    res = evaluate(real, plain, pairs=2, mlflow=False, progress=False, out_dir=tmp_path / "ev")
    assert res["n_fake"] == 3


# --- 3. files keep the mode the umask gives, not the temporary file's 0600 ----------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, mask):
    expected = 0o666 & ~mask
    with umask(mask):
        written = [
            atomic_write_text(tmp_path / "datalist.json", "{}"),
            atomic_write_bytes(tmp_path / "blob.bin", b"x"),
            save_nifti(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "v.nii.gz"),
            save_montage(tmp_path / "v.png", [np.zeros((4, 4, 4))]),
        ]
        atomic_write_text(tmp_path / "datalist.json", "{}")  # replacing a file does not keep a 0600 either
        out = tmp_path / "samples"
        _generator(tmp_path, out, 1).run()
        written += sorted(p for p in out.iterdir() if p.is_file())
        ckpt_dir = tmp_path / "models"
        _train(ckpt_dir, iterations=1)
        written += [ckpt_dir / "checkpoint_iteration=1.pt", ckpt_dir / "checkpoints.json"]
    assert len(written) == 4 + 3 + 2
    for path in written:
        assert oct(path.stat().st_mode & 0o777) == oct(expected), path
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)  # the swapped-in sample folder too


# --- 4. a checkpoint save on a full disk -----------------------------------------------------------------------------


def _train(directory: Path, iterations: int, max_epochs: int = 1, **kw) -> tuple[Engine, torch.nn.Module]:
    """A trivial ignite run of ``iterations`` steps per epoch that checkpoints every iteration."""
    net = torch.nn.Linear(3, 2)

    def step(engine, batch):
        with torch.no_grad():
            net.weight.add_(1.0)  # the weights record the iteration count

    engine = Engine(step)
    ckpt = TrainingCheckpoints(
        directory,
        {"model": net},
        save_interval=0,
        save_final=False,
        save_every_iterations=1,
        save_on_sigterm=False,
        **{"n_saved": 3, **kw},
    )
    ckpt.attach(engine)
    engine.run(range(iterations), max_epochs=max_epochs)
    return engine, net


@pytest.mark.parametrize("how", ["oserror", "torch_wrapped"])
def test_a_checkpoint_save_on_a_full_disk_names_the_file_and_errno_and_leaves_the_rest(tmp_path, monkeypatch, how):
    models = tmp_path / "models"
    _train(models, iterations=2, n_saved=2)
    before = snapshot(models)
    assert {"checkpoint_iteration=1.pt", "checkpoint_iteration=2.pt"} <= set(before)

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")  # some bytes reach the disk before it is full
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            if how == "oserror":
                raise
            # what torch.save does with a failing file object: its own error, the OSError only as the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as err:
        _train(models, iterations=1, max_epochs=3, n_saved=2)  # resumes at iteration 2, fails saving iteration 3
    monkeypatch.setattr(torch, "save", real_save)
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert str(models / "checkpoint_iteration=3.pt") in message and "No space left on device" in message
    assert "ENOSPC" in message
    assert leftovers(models) == []  # no temporary file
    assert not (models / "checkpoint_iteration=3.pt").exists()
    assert snapshot(models) == before  # both earlier checkpoints and the save log, byte for byte
    assert load_checkpoint(models / "checkpoint_iteration=2.pt")["trainer"]["iteration"] == 2

    # within one run, once n_saved files exist: the oldest is pruned only after the next save succeeded (ignite's
    # Checkpoint removes it before writing, so the failed save would have cost it)
    saves = []

    def full_at_the_third(obj, f, *a, **k):
        saves.append(1)
        return real_save(obj, f, *a, **k) if len(saves) <= 2 else full_disk(obj, f)

    monkeypatch.setattr(torch, "save", full_at_the_third)
    one_run = tmp_path / "one_run"
    with pytest.raises(OSError, match="checkpoint_iteration=3.pt"):
        _train(one_run, iterations=4, n_saved=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in one_run.glob("*.pt")) == ["checkpoint_iteration=1.pt", "checkpoint_iteration=2.pt"]
    assert [load_checkpoint(one_run / f"checkpoint_iteration={i}.pt")["trainer"]["iteration"] for i in (1, 2)] == [1, 2]
    assert leftovers(one_run) == []


# --- 8b. a truncated newest checkpoint -------------------------------------------------------------------------------


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.read_bytes()


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path, caplog):
    models = tmp_path / "models"
    _train(models, iterations=3)
    bad = models / "checkpoint_iteration=3.pt"
    damaged = _truncate(bad)
    good = load_checkpoint(models / "checkpoint_iteration=2.pt")

    seen = {}
    net = torch.nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    TrainingCheckpoints(
        models, {"model": net}, save_interval=0, save_final=False, save_every_iterations=1, save_on_sigterm=False
    ).attach(engine)

    @engine.on(Events.STARTED)
    def record(e):  # after the resume (attached later), before any new save
        seen["iteration"] = e.state.iteration
        seen["weight"] = net.weight.detach().clone()
        seen["bad"] = bad.read_bytes()

    with caplog.at_level(logging.WARNING):
        engine.run(range(3), max_epochs=1)
    assert seen["iteration"] == 2 and torch.equal(seen["weight"], good["model"]["weight"])
    assert seen["bad"] == damaged  # the damaged file is kept (not deleted, not rewritten) for inspection
    text = caplog.text
    assert str(bad) in text and str(models / "checkpoint_iteration=2.pt") in text and "truncated" in text


def test_resume_stops_with_a_clear_error_when_no_checkpoint_is_intact(tmp_path):
    models = tmp_path / "models"
    _train(models, iterations=1)
    bad = models / "checkpoint_iteration=1.pt"
    damaged = _truncate(bad)
    with pytest.raises(RuntimeError, match=rf"{bad}.*truncated.*no earlier intact checkpoint.*resume"):
        _train(models, iterations=1)
    assert bad.read_bytes() == damaged


def test_inference_names_the_previous_intact_checkpoint_when_the_newest_is_truncated(tmp_path):
    gen = _generator(tmp_path, tmp_path / "samples", 1)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tmp_path / "net.pt", models / "checkpoint_iteration=1.pt")
    shutil.copy(tmp_path / "net.pt", models / "checkpoint_iteration=2.pt")
    os.utime(models / "checkpoint_iteration=1.pt", (1_000_000, 1_000_000))  # saved first
    bad = models / "checkpoint_iteration=2.pt"
    damaged = _truncate(bad)
    for given in (models, bad):  # the folder (its newest file) or the file itself
        gen.checkpoint = given
        with pytest.raises(RuntimeError) as err:
            gen.run()
        message = str(err.value)
        assert str(bad) in message and "truncated" in message
        assert f"--checkpoint {models / 'checkpoint_iteration=1.pt'}" in message
        assert bad.read_bytes() == damaged
    assert not (tmp_path / "samples").exists()


# --- 7. a network too deep for the image size ------------------------------------------------------------------------


def test_a_network_too_deep_for_the_image_size_is_refused_when_the_config_is_read(dataset, tmp_path):  # noqa: F811
    with pytest.raises(Exception) as err:  # in the bundle's initialize step, before any data is loaded
        workflow(
            ["train.json"],
            "training",
            dataset_dir=str(dataset),
            output_dir=str(tmp_path),
            max_epochs=1,
            **{**TINY_TRAIN, "image_size": [48, 48, 48], "network_def#channel_mult": [1, 2, 2, 2]},
        ).run()
    cause = root_cause(err.value)
    message = str(cause)
    assert isinstance(cause, ValueError), message
    for part in (  # the bundles' default runs on two wavelet levels: a multiple of 4 * 2^3
        "image_size [48, 48, 48]",
        "levels 2",
        "channel_mult [1, 2, 2, 2]",
        "smallest valid size is 32",
        "32 or 64",
    ):
        assert part in message, (part, message)
    assert not list((tmp_path / "models").glob("*.pt"))  # nothing trained


def test_image_size_check_names_each_setting_and_the_sizes_that_work():
    from wdm3d.engine.config_check import check_image_size

    check_image_size([32, 32, 32], levels=1, channel_mult=[1, 2, 2, 2, 2])
    check_image_size([64, 64, 32], levels=2, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ValueError) as err:
        check_image_size([64, 64, 40], levels=2, channel_mult=[1, 2, 2])
    message = str(err.value)
    # two levels: the U-Net sees 40 / 4 = 10, which 3 channel_mult entries (2 halvings) cannot divide by 4
    for part in (
        "image_size [64, 64, 40]",
        "levels 2",
        "channel_mult [1, 2, 2]",
        "(16, 16, 10)",
        "smallest valid size is 16",
        "32 or 48",
    ):
        assert part in message, (part, message)
