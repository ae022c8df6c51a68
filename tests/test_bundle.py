"""The wdm3d_brats bundle run through MONAI's bundle machinery on a tiny dataset (CPU, seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from wdm3d.demo import phantom_volumes
from wdm3d.engine import latest_checkpoint, load_checkpoint
from wdm3d.networks import WDMUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "wdm3d_brats" / "configs"
# a flipped, anisotropic, off-centre geometry: an identity affine anywhere would show
AFFINE = np.array([[-2.0, 0, 0, 90.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
TINY = {
    "image_size": [16, 16, 16],
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
}
TINY_TRAIN = {
    **TINY,
    "mlflow": False,
    "batch_size": 2,
    "num_workers": 0,
    "val_interval": 1,
    "val_num_steps": 2,
    "save_interval": 1,
    "ema_decay": 0.5,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    entries = []
    for i, v in enumerate(phantom_volumes(6, 16, seed=3)):
        name = f"case{i}/case{i}-t1n.nii.gz"
        (root / f"case{i}").mkdir()
        nib.save(nib.Nifti1Image(((v[0].numpy() + 1) / 2).astype(np.float32), AFFINE), root / name)
        entries.append({"case": f"case{i}", "t1n": name})
    datalist = {"intensity_range": [0.0, 1.0], "training": entries[:4], "validation": entries[4:5], "test": entries[5:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def root_cause(err):
    """MONAI wraps errors raised inside config expressions; the first one is what the user must read."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def workflow(files, run_id, **overrides):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    return wf


def train(dataset, out, max_epochs, **extra):
    wf = workflow(
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(out),
        max_epochs=max_epochs,
        **{**TINY_TRAIN, **extra},
    )
    wf.run()
    return wf


def test_configs_parse_and_have_the_bundle_properties(dataset, tmp_path):
    wf = workflow(["train.json"], "training", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY_TRAIN)
    assert wf.check_properties() == []
    wf = workflow(["inference.json"], "inference", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY)
    assert wf.check_properties() == []
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    # the default process runs on two Haar levels: 64 channels at a quarter of the 128^3 image size
    assert meta["version"] in meta["changelog"] and image["num_channels"] == 64 and image["spatial_shape"] == [32] * 3
    assert image["channel_def"]["0"].startswith("LLL of level-1 LLL") and len(image["channel_def"]) == 64


def test_defaults_are_the_quality_winner_and_wdm_paper_is_wdms_recipe():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["batch_size"] == 10 and parser["learning_rate"] == 1e-5 and parser["image_size"] == [128] * 3
    assert parser["unet_preset"] == "wdm_128" and parser["ema_decay"] == 0.9999
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW"
    # the winner of benchmarks/quality.py at equal budget among the 50-step recipes: rectified flow, x prediction,
    # velocity loss (JiT), logit-normal times, two Haar levels, 50 Euler steps (the rule's few-step pick, the
    # two-level shortcut model, failed the check at the demo's own scale: BENCHMARKS.md)
    d = parser.get_parsed_content("diffusion")
    assert (d.process, d.prediction_type, d.loss_weighting, d.rflow_sample_method, d.levels, d.flow_map) == (
        "rflow",
        "sample",
        "velocity",
        "logit-normal",
        2,
        None,
    )
    net = parser.get_parsed_content("network_def")
    assert net.in_channels == 64 and not net.interval_embedding
    assert (parser.get_parsed_content("val_sampler"), parser.get_parsed_content("val_num_steps")) == ("rflow", 50)
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    assert (inference.get_parsed_content("sampler"), inference.get_parsed_content("num_steps")) == ("rflow", 50)
    # shortcut.json: the two-level shortcut model; the network takes the jump size because the process has a flow
    # map, and the sampler and its steps follow the process unless set
    for files in (["train.json", "shortcut.json"], ["inference.json", "shortcut.json"]):
        pinned = ConfigParser()
        pinned.read_config([str(CONFIGS / f) for f in files])
        d = pinned.get_parsed_content("diffusion")
        assert (d.flow_map, d.levels, d.loss_weighting) == ("shortcut", 2, "none")
        assert pinned.get_parsed_content("network_def").interval_embedding
        sampler = "val_sampler" if files[0] == "train.json" else "sampler"
        steps = "val_num_steps" if files[0] == "train.json" else "num_steps"
        assert (pinned.get_parsed_content(sampler), pinned.get_parsed_content(steps)) == ("shortcut", 4)
        pinned[sampler] = "rflow"  # its velocity at interval 0 takes the multi-step number of steps
        assert pinned.get_parsed_content(steps, lazy=False) == 50
    # WDM's exact recipe, one overlay away, on training and inference alike
    for files in (["train.json", "wdm_paper.json"], ["inference.json", "wdm_paper.json"]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        d = parser.get_parsed_content("diffusion")
        assert (d.num_train_timesteps, d.prediction_type, d.lll_scale, d.process, d.levels) == (
            1000,
            "sample",
            3.0,
            "ddpm",
            1,
        )
        assert (d.loss_weighting, d.schedule["schedule"], d.schedule["beta_start"], d.schedule["beta_end"]) == (
            "none",
            "linear_beta",
            1e-4,
            0.02,
        )
        assert d.flow_map is None
        net = parser.get_parsed_content("network_def")
        assert net.in_channels == 8 and not net.interval_embedding  # WDM's network, to the parameter
    assert (parser.get_parsed_content("sampler"), parser.get_parsed_content("num_steps")) == ("ddpm", 1000)


def test_256_variant_is_one_extra_file():
    from monai.bundle import ConfigParser

    def network(*overlays):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json")] + [str(CONFIGS / f) for f in overlays])
        with torch.device("meta"):
            return parser, parser.get_parsed_content("network_def")

    parser, net = network("wdm_paper.json", "wdm_256.json")
    assert parser["image_size"] == [256] * 3 and parser["batch_size"] == 1 and parser["gradient_checkpointing"]
    assert net.channel_mult == (1, 2, 2, 4, 4, 4) and net.use_checkpoint and not net.fp32_io
    wdm = sum(p.numel() for p in net.parameters())
    assert round(wdm / 1e6, 2) == 83.16  # WDM's 256^3 network (the paper's table)
    # the default's two levels widen only the 3^3 input and output convolutions: 8 -> 64 channels, base width 64
    _, net = network("wdm_256.json")
    assert sum(p.numel() for p in net.parameters()) - wdm == 2 * (64 - 8) * 64 * 27 + (64 - 8)
    # a flow map's interval input adds one time-embedding MLP (64 -> 256 -> 256)
    _, flow = network("shortcut.json", "wdm_256.json")
    assert (
        sum(p.numel() for p in flow.parameters()) - sum(p.numel() for p in net.parameters()) == (64 + 1 + 256 + 1) * 256
    )
    parser["fp32_io"] = True  # the bf16 switch reaches the network
    with torch.device("meta"):
        assert parser.get_parsed_content("network_def", lazy=False).fp32_io


def test_training_writes_checkpoints_with_model_ema_optimizer_and_iteration(dataset, tmp_path):
    wf = train(dataset, tmp_path, max_epochs=1)
    ckpt_path = latest_checkpoint(tmp_path / "models")
    assert ckpt_path is not None
    ckpt = load_checkpoint(ckpt_path)
    assert {"model", "ema", "optimizer", "trainer", "geometry"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 2 and ckpt["trainer"]["epoch_length"] == 2  # 4 cases / batch 2: 1 epoch
    assert np.allclose(ckpt["geometry"]["affine"].numpy(), AFFINE)
    # EMA (decay 0.5 here) differs from the raw weights but is not the initial (zero) output conv either
    raw, ema = ckpt["model"]["conv_out.weight"], ckpt["ema"]["conv_out.weight"]
    assert not torch.equal(raw, ema) and ema.abs().sum() > 0
    assert torch.equal(wf.parser.get_parsed_content("network").state_dict()["conv_out.weight"].cpu(), raw)
    history = json.loads((tmp_path / "validation" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and (tmp_path / "validation" / "epoch_0001.png").is_file()


def test_training_resumes_from_the_latest_checkpoint(dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=1)
    saved = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    wf = workflow(
        ["train.json"], "training", dataset_dir=str(dataset), output_dir=str(tmp_path), max_epochs=2, **TINY_TRAIN
    )
    trainer = wf.parser.get_parsed_content("train#trainer")
    seen = {}

    from ignite.engine import Events

    @trainer.on(Events.ITERATION_STARTED(once=3))
    def _capture(engine):  # first iteration of the resumed run: weights as restored, before any update
        seen["model"] = {k: v.detach().clone() for k, v in engine.network.state_dict().items()}
        seen["step"] = engine.optimizer.state_dict()["state"][0]["step"].item()

    wf.run()
    assert trainer.state.iteration == 4 and trainer.state.epoch == 2
    for k, v in saved["model"].items():
        assert torch.equal(seen["model"][k], v), k
    assert seen["step"] == 2  # AdamW's step count came back with the optimizer state
    assert load_checkpoint(latest_checkpoint(tmp_path / "models"))["trainer"]["iteration"] == 4


def test_resume_can_be_turned_off(dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=1)
    wf = train(dataset, tmp_path, max_epochs=1, resume=False)
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2  # started again from 0


def test_inference_writes_nifti_with_the_dataset_geometry(dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=1)
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        num_samples=3,
        sampler="rflow",
        num_steps=3,
        seed=7,
        **TINY,
    )
    wf.run()
    out = tmp_path / "samples"
    manifest = json.loads((out / "manifest.json").read_text())
    from wdm3d.inference import batch_seed

    assert [s["seed"] for s in manifest["samples"]] == [batch_seed(7, i) for i in range(3)]
    assert manifest["sampler"] == "rflow" and manifest["num_steps"] == 3 and manifest["weights"] == "ema"
    assert manifest["checkpoint"].endswith(".pt") and manifest["intensity_range"] == [0.0, 1.0]
    for s in manifest["samples"]:
        img = nib.load(out / s["nifti"])
        assert img.shape == (16, 16, 16)
        np.testing.assert_allclose(img.affine, AFFINE)
        assert img.header.get_sform(coded=True)[1] == 1 and img.header.get_qform(coded=True)[1] == 1
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0
        png = Image.open(out / s["png"])
        assert png.mode == "L" and png.size[0] > png.size[1] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_inference_uses_the_checkpoint_geometry_without_the_dataset(dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=1)
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(tmp_path / "gone"),
        output_dir=str(tmp_path),
        num_samples=1,
        sampler="rflow",
        num_steps=2,
        **TINY,
    )
    wf.run()
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert manifest["geometry_source"] == "checkpoint"
    np.testing.assert_allclose(nib.load(tmp_path / "samples" / "sample_0000.nii.gz").affine, AFFINE)


def test_inference_rejects_a_size_the_model_was_not_trained_on(dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=1)
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(tmp_path / "gone"),
        output_dir=str(tmp_path),
        num_samples=1,
        sampler="rflow",
        num_steps=2,
        **{**TINY, "image_size": [32, 32, 32]},
    )
    with pytest.raises(Exception) as err:
        wf.run()
    assert isinstance(root_cause(err.value), ValueError)
    assert "image_size [32, 32, 32] differs" in str(root_cause(err.value))


def test_inference_refuses_another_diffusion_process_than_the_checkpoint_was_trained_with(dataset, tmp_path):
    # a checkpoint of WDM's recipe (the bundles' default before benchmarks/quality.py chose) sampled with today's
    trained = workflow(
        ["train.json", "wdm_paper.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        max_epochs=1,
        **TINY_TRAIN,
    )
    assert trained.parser.get_parsed_content("val_sampler") == "ddim"  # the validation sampler follows the process
    trained.run()
    wf = workflow(
        ["inference.json"], "inference", dataset_dir=str(dataset), output_dir=str(tmp_path), num_samples=1, **TINY
    )
    assert wf.parser.get_parsed_content("sampler") == "rflow"  # the default sampler follows the process
    with pytest.raises(Exception) as err:
        wf.run()  # would sample an x0-trained one-level ddpm network as a two-level rectified flow, without an error
    msg = str(root_cause(err.value))
    assert isinstance(root_cause(err.value), ValueError)
    assert "'process': ('ddpm', 'rflow')" in msg and "'levels': (1, 2)" in msg and '--diffusion#process "ddpm"' in msg
    assert "add configs/wdm_paper.json" in msg
    assert not (tmp_path / "samples" / "sample_0000.nii.gz").exists()
    # the fix the message names
    workflow(
        ["inference.json", "wdm_paper.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        num_samples=1,
        num_steps=2,
        **TINY,
    ).run()
    assert (tmp_path / "samples" / "sample_0000.nii.gz").exists()


def test_inference_without_a_checkpoint_says_so(dataset, tmp_path):
    wf = workflow(["inference.json"], "inference", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY)
    with pytest.raises(Exception) as err:
        wf.run()
    assert isinstance(root_cause(err.value), FileNotFoundError)
    assert "No checkpoint" in str(root_cause(err.value)) and "train first" in str(root_cause(err.value))


def _torchrun(dataset, out, **extra):
    overrides = []
    for k, v in {**TINY_TRAIN, "dataset_dir": str(dataset), "output_dir": str(out), **extra}.items():
        overrides += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    configs = str([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # --standalone: torchrun picks a free rendezvous port itself (a port probed here first could be taken by another
    # process before torchrun binds it)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_multi_gpu_overlay_trains_with_two_processes_on_gloo_and_resumes(dataset, tmp_path):
    _torchrun(dataset, tmp_path, max_epochs=2)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    # 4 cases split over 2 ranks with batch 2: one iteration per epoch per rank
    assert ckpt["trainer"]["epoch_length"] == 1 and ckpt["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])  # DDP wrapper not in the saved keys
    # only rank 0 samples validation previews
    assert len(json.loads((tmp_path / "validation" / "history.json").read_text())) == 2
    # a second launch resumes from that checkpoint: the iteration count goes on (3), the weights start from it
    proc = _torchrun(dataset, tmp_path, max_epochs=3, save_every_iterations=1)
    assert "Resumed from" in proc.stdout + proc.stderr
    resumed = load_checkpoint(tmp_path / "models" / "checkpoint_iteration=3.pt")
    assert resumed["trainer"]["iteration"] == 3 and resumed["trainer"]["epoch_length"] == 1
    assert resumed["optimizer"]["state"][0]["step"].item() == 3  # AdamW continued from step 2


def test_batch_seeds_of_nearby_run_seeds_are_unrelated():
    from wdm3d.inference import batch_seed

    runs = [{batch_seed(seed, i) for i in range(200)} for seed in range(4)]
    assert all(len(r) == 200 for r in runs)  # no repeats within a run
    assert all(not (runs[a] & runs[b]) for a in range(4) for b in range(a + 1, 4))  # seed 0 and 1 share no sample
    assert batch_seed(7, 3) == batch_seed(7, 3) and all(0 <= s < 2**63 for r in runs for s in r)
    torch.Generator().manual_seed(max(max(r) for r in runs))  # a valid torch seed


def _generator(tmp_path, out, num_samples, channels=1, **kw):
    from wdm3d.diffusion import WaveletDiffusion
    from wdm3d.inference import VolumeGenerator

    torch.manual_seed(0)
    net = WDMUNet(
        in_channels=8 * channels,
        out_channels=8 * channels,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_num_groups=4,
    )
    with torch.no_grad():  # "trained": the zero-initialised output layer would make every voxel the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    geometry = {
        "affine": torch.as_tensor(AFFINE),
        "shape": torch.tensor([16, 16, 16]),
        "intensity_range": torch.tensor([-1000.0, 1000.0], dtype=torch.float64),
    }
    torch.save({"model": net.state_dict(), "geometry": geometry}, tmp_path / "net.pt")
    ref = tmp_path / "ref.nii.gz"
    if not ref.exists():
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), AFFINE), ref)
    return VolumeGenerator(
        net,
        WaveletDiffusion(),
        tmp_path / "net.pt",
        out,
        image_size=(16, 16, 16),
        num_samples=num_samples,
        sampler="ddim",
        num_steps=2,
        reference_image=ref,
        device="cpu",
        progress=False,
        mlflow=False,
        **{"intensity_range": (0.0, 1.0), **kw},
    )


def test_a_rerun_replaces_the_earlier_run_and_a_failed_run_leaves_the_previous_output(tmp_path):
    out = tmp_path / "samples"
    _generator(tmp_path, out, 3, dicom=True).run()
    assert (out / "sample_0000_dicom").is_dir()
    (out / "notes.txt").write_text("mine")  # not a sample: left alone
    manifest = _generator(tmp_path, out, 2, seed=5).run()
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "sample_0000.nii.gz",
        "sample_0000.png",
        "sample_0001.nii.gz",
        "sample_0001.png",
    ]
    assert len(manifest["samples"]) == 2
    broken = _generator(tmp_path, out, 2, seed=6)
    broken.diffusion.sample = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        broken.run()
    # the failed run wrote into a temporary folder: the previous run's output is there, whole, manifest and all
    assert json.loads((out / "manifest.json").read_text())["seed"] == 5
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "sample_0000.nii.gz",
        "sample_0000.png",
        "sample_0001.nii.gz",
        "sample_0001.png",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_every_channel_of_a_multi_channel_model_is_written(tmp_path):
    manifest = _generator(tmp_path, tmp_path / "samples", 1, channels=2).run()
    img = nib.load(tmp_path / "samples" / manifest["samples"][0]["nifti"])
    assert img.shape == (16, 16, 16, 2)
    np.testing.assert_allclose(img.affine, AFFINE)
    data = img.get_fdata()
    assert not np.allclose(data[..., 0], data[..., 1])


def test_a_missing_datalist_does_not_override_the_checkpoint_intensity_range(tmp_path):
    # the bundles always pass a datalist path; when it is not there the checkpoint's range ([-1000, 1000]) holds
    gen = _generator(tmp_path, tmp_path / "samples", 1, intensity_range=None, datalist=tmp_path / "gone.json")
    manifest = gen.run()
    assert manifest["intensity_range"] == [-1000.0, 1000.0]


def test_recipe_switches_train_and_sample_through_the_bundle(dataset, tmp_path):
    """Two wavelet levels, min-SNR weighting and learned subband weights, set from the command line only."""
    switches = {
        "diffusion#process": "rflow",
        "diffusion#prediction_type": "v_prediction",
        "diffusion#levels": 2,
        "diffusion#loss_weighting": "min_snr",
        "learned_subband_weights": True,
    }
    wf = train(dataset, tmp_path, max_epochs=1, **switches)
    net = wf.parser.get_parsed_content("network")
    assert net.in_channels == 64  # 8**2 wavelet channels of one modality, at 1/4 resolution
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    log_var = ckpt["loss"]["log_variance"]
    assert log_var.shape == (64,) and log_var.abs().sum() > 0  # trained with the network, saved for resume
    assert ckpt["run_config"]["diffusion"]["levels"] == 2
    assert ckpt["run_config"]["diffusion"]["loss_weighting"] == "min_snr"
    # the loss weighting too: the default's velocity loss does not exist for v prediction
    inference = {k: v for k, v in switches.items() if k.startswith("diffusion#")}
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        num_samples=2,
        num_steps=3,
        seed=1,
        **TINY,
        **inference,
    )
    wf.run()
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert [nib.load(tmp_path / "samples" / s["nifti"]).shape for s in manifest["samples"]] == [(16, 16, 16)] * 2
    one_level = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path / "x"),
        checkpoint=str(tmp_path / "models"),
        num_samples=1,
        num_steps=2,
        **TINY,
        **{**inference, "diffusion#levels": 1},
    )
    with pytest.raises(Exception) as err:
        one_level.run()  # a two-level model sampled as one level
    assert "levels" in str(root_cause(err.value))


def test_dit_overlay_and_wdm_paper_preset(dataset, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "wdm_paper.json")])
    d = parser.get_parsed_content("diffusion")
    assert (d.process, d.prediction_type, d.num_train_timesteps, d.lll_scale, d.levels, d.loss_weighting) == (
        "ddpm",
        "sample",
        1000,
        3.0,
        1,
        "none",
    )
    assert d.schedule == {"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02}
    assert parser["learning_rate"] == 1e-5 and parser["batch_size"] == 10 and parser["unet_preset"] == "wdm_128"
    assert (parser["sampler"], parser["num_steps"]) == ("ddpm", 1000)
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in ("train.json", "dit.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        run_id="training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        max_epochs=1,
        **{
            **{k: v for k, v in TINY_TRAIN.items() if not k.startswith("network_def#")},
            "network_def#patch_size": 2,
            "network_def#hidden_size": 24,
            "network_def#depth": 1,
            "network_def#num_heads": 2,
        },
    )
    wf.initialize()
    wf.run()
    from wdm3d.networks import DiT3D

    assert isinstance(wf.parser.get_parsed_content("network"), DiT3D)
    assert latest_checkpoint(tmp_path / "models") is not None
