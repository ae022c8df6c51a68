"""Files written by wdm3d at commit f0fa095 still load, and give the outputs recorded then.

``tests/fixtures/legacy`` holds a prepared datalist, a wdm3d_brats checkpoint with the volumes sampled from it, and
a wfvae checkpoint with its reconstruction of one volume, all written by that commit's code (``make_fixture.py``
there says how); ``manifest.json`` records the bundle overrides that made each one. These tests rerun the current
bundles with the same overrides and compare. They use only what users use: the bundle configs run through MONAI's
``ConfigWorkflow`` (as ``python -m monai.bundle run`` does), the config names the bundles define (``train#trainer``),
and ``wdm3d.data.load_datalist`` / ``intensity_range``, so that they hold wherever the code inside wdm3d moves.
"""

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from test_bundle import root_cause

from wdm3d.data import intensity_range, load_datalist

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())
#: The recorded runs were on the CPU in float32 and are rerun so, which reproduces them bit for bit on the machine
#: that wrote them (with 1 or 2 threads alike); another CPU may pick convolution kernels that sum in another order,
#: a few float32 ulps (~1e-7 for voxels in [0, 1]). 1e-5 leaves room for that and nothing more: the smallest real
#: change tried moves some voxel by 5e-3 (one more DDIM step), others by 0.01-0.3 (eta 0.1, another seed, the raw
#: weights instead of the EMA ones).
ATOL = 1e-5
#: files in the fixture folder that manifest.json does not (and cannot) list with an md5
NOT_HASHED = {"manifest.json", "make_fixture.py"}


def fixture_copy(tmp_path: Path) -> Path:
    """A copy of the fixture to run in: a run that wrote into the fixture itself would change what later runs read."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "legacy", ignore=shutil.ignore_patterns("__pycache__")))


def recorded_diffusion(checkpoint: Path) -> dict:
    """The diffusion settings a checkpoint recorded, as bundle overrides. The bundles' default recipe changed on
    2026-12-06 (benchmarks/quality.py chose another); a checkpoint of the earlier default runs with the settings it
    recorded, which is what the refusal message tells a user to set."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return {f"diffusion#{k}": v for k, v in ckpt["run_config"]["diffusion"].items()}


def workflow(bundle: str, section: dict, diffusion: dict | None = None, **paths: str) -> ConfigWorkflow:
    """The recorded bundle run ``section`` of the manifest, with its placeholder paths set to ``paths`` (and
    ``diffusion``: the recorded process, where today's default is another)."""
    overrides = dict(section["overrides"])
    unknown = set(paths) - set(overrides)
    assert not unknown, f"{unknown} are not among the recorded overrides {sorted(overrides)}"
    overrides.update(paths)
    overrides.update(diffusion or {})
    configs = REPO / "bundles" / bundle / "configs"
    run_id = section["run_id"]
    wf = ConfigWorkflow(
        config_file=[str(configs / f) for f in section["config_file"]],
        meta_file=str(configs / "metadata.json"),
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    return wf


def run(wf: ConfigWorkflow) -> None:
    """Run an initialized workflow and release what it holds."""
    try:
        wf.run()
    finally:
        wf.finalize()


def assert_same_volume(actual: Path, expected: Path) -> None:
    """``actual`` has ``expected``'s shape, data type, affine and NIfTI geometry codes exactly, its voxels within
    ATOL."""
    got, want = nib.load(actual), nib.load(expected)
    assert got.shape == want.shape, f"{actual.name}: shape {got.shape}, recorded {want.shape}"
    assert got.get_data_dtype() == want.get_data_dtype(), f"{actual.name}: dtype differs from the recorded one"
    assert np.array_equal(got.affine, want.affine), f"{actual.name}: affine\n{got.affine}\nrecorded\n{want.affine}"
    assert got.header.get_sform(coded=True)[1] == want.header.get_sform(coded=True)[1]
    assert got.header.get_qform(coded=True)[1] == want.header.get_qform(coded=True)[1]
    np.testing.assert_allclose(got.get_fdata(), want.get_fdata(), rtol=0, atol=ATOL, err_msg=actual.name)


def test_the_fixture_files_are_the_recorded_ones():
    on_disk = {
        p.relative_to(FIXTURE).as_posix()
        for p in FIXTURE.rglob("*")
        if p.is_file() and p.name not in NOT_HASHED and "__pycache__" not in p.parts
    }
    recorded = MANIFEST["md5"]
    described = {f for part in ("datalist", "wdm", "wfvae") for f in MANIFEST[part]["files"]}
    assert described == set(recorded), "every fixture file has an md5 and a description in manifest.json"
    missing = sorted(set(recorded) - on_disk)
    assert not missing, (
        f"{missing} are missing from {FIXTURE}; .gitignore ignores *.pt, so a checkout lacks the "
        "checkpoints unless they were added with `git add -f`."
    )
    assert not on_disk - set(recorded), f"{sorted(on_disk - set(recorded))} are in the fixture but not in its manifest"
    changed = [f for f, md5 in recorded.items() if hashlib.md5((FIXTURE / f).read_bytes()).hexdigest() != md5]
    assert not changed, (
        f"{changed} differ from what commit {MANIFEST['commit']} wrote: restore them with git, do not "
        "regenerate them with the current code."
    )


def test_the_datalist_loads_to_the_recorded_entries():
    datalist = FIXTURE / "data" / "datalist.json"
    recorded = json.loads((FIXTURE / "data" / "datalist_entries.json").read_text())
    key = MANIFEST["datalist"]["image_key"]
    assert sorted(recorded) == sorted(MANIFEST["datalist"]["splits"])
    for split, entries in recorded.items():
        loaded = load_datalist(datalist, split, [key])
        for entry in loaded:
            assert Path(entry[key]).is_absolute() and Path(entry[key]).is_file()
            entry[key] = Path(entry[key]).relative_to(FIXTURE).as_posix()
        assert loaded == entries, split
    assert intensity_range(datalist) == MANIFEST["datalist"]["intensity_range"]


def test_the_diffusion_checkpoint_samples_the_recorded_volumes(tmp_path):
    legacy = fixture_copy(tmp_path)
    recorded = MANIFEST["wdm"]
    out = tmp_path / "samples"
    paths = dict(dataset_dir=str(legacy / "data"), checkpoint=str(legacy / "wdm" / "models"), samples_dir=str(out))
    with pytest.raises(Exception) as err:  # today's default is another process: refused before sampling
        run(workflow("wdm3d_brats", recorded["sample"], **paths))
    assert "sampler 'ddim' does not fit a model trained with process 'rflow'" in str(root_cause(err.value))  # recorded
    assert not out.exists() or not list(out.glob("*.nii.gz"))
    run(workflow("wdm3d_brats", recorded["sample"], recorded_diffusion(FIXTURE / recorded["checkpoint"]), **paths))
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == [Path(s).name for s in recorded["samples"]]
    for sample in recorded["samples"]:
        assert_same_volume(out / Path(sample).name, FIXTURE / sample)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["seed"] for s in manifest["samples"]] == recorded["sample_seeds"]
    assert manifest["weights"] == recorded["weights"]
    assert Path(manifest["geometry_source"]).relative_to(legacy).as_posix() == recorded["geometry_source"]


def test_the_diffusion_checkpoint_resumes_training_where_it_stopped(tmp_path):
    legacy = fixture_copy(tmp_path)
    recorded = MANIFEST["wdm"]
    saved = torch.load(FIXTURE / recorded["checkpoint"], map_location="cpu", weights_only=True)
    wf = workflow(
        "wdm3d_brats",
        recorded["train"],
        recorded_diffusion(FIXTURE / recorded["checkpoint"]),
        dataset_dir=str(legacy / "data"),
        output_dir=str(legacy / "wdm"),
        max_epochs=recorded["checkpoint_epoch"] + 1,
    )
    trainer = wf.parser.get_parsed_content("train#trainer")
    first = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _capture(engine):  # the first iteration of this run: the weights as restored, before any update
        if not first:
            first["iteration"] = engine.state.iteration
            first["model"] = {k: v.detach().clone().cpu() for k, v in engine.network.state_dict().items()}

    run(wf)
    assert first["iteration"] == recorded["checkpoint_iteration"] + 1  # not 1: it did not start over
    assert first["model"].keys() == saved["model"].keys()
    for k, v in saved["model"].items():
        assert torch.equal(first["model"][k], v), k
    assert trainer.state.epoch == recorded["checkpoint_epoch"] + 1
    assert trainer.state.iteration == recorded["checkpoint_iteration"] + recorded["epoch_length"]


def test_the_vae_checkpoint_reconstructs_the_recorded_volume(tmp_path):
    legacy = fixture_copy(tmp_path)
    recorded = MANIFEST["wfvae"]
    out = tmp_path / "reconstruction"
    run(
        workflow(
            "wfvae",
            recorded["reconstruct"],
            dataset_dir=str(legacy / "data"),
            checkpoint=str(legacy / "wfvae" / "models"),
            reconstruction_dir=str(out),
        )
    )
    for expected in recorded["reconstructions"].values():
        assert_same_volume(out / Path(expected).name, FIXTURE / expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == [c["case"] for c in recorded["metrics"]]
    for got, want in zip(metrics["cases"], recorded["metrics"]):
        for name in ("psnr", "ssim", "mae"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=f"{want['case']} {name}")
