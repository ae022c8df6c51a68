import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from wdm3d.cli import main
from wdm3d.demo import phantom_volumes, run_demo
from wdm3d.diffusion import WaveletDiffusion, WaveletDiffusionInferer, WaveletDiffusionPrepareBatch, WaveletMSELoss
from wdm3d.networks import WDMUNet


def test_stock_supervised_trainer_learns_in_the_wavelet_domain():
    set_determinism(0)
    diffusion = WaveletDiffusion()
    data = [{"image": v} for v in phantom_volumes(8, size=8, seed=0)]
    loader = DataLoader(data, batch_size=4, shuffle=True)
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=20,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=3e-3),
        loss_function=WaveletMSELoss(),
        inferer=WaveletDiffusionInferer(diffusion),
        prepare_batch=WaveletDiffusionPrepareBatch(diffusion),
        decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 40
    # a zero-initialised x0 predictor starts at E[y0^2]; the loss must fall well below that
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    set_determinism(None)


def test_quick_demo_runs_the_bundle_end_to_end(tmp_path):
    summary = run_demo(tmp_path, num_cases=4, quick=True, num_samples=2, progress=False)
    datalist = json.loads(Path(summary["datalist"]).read_text())
    reference = nib.load(Path(summary["datalist"]).parent / datalist["training"][0]["t1n"])
    assert len(summary["samples"]) == 2 and len(summary["previews"]) == 2 and summary["validation_previews"]
    for f in summary["samples"]:
        img = nib.load(f)
        assert img.shape == reference.shape == (16, 16, 16)
        np.testing.assert_allclose(img.affine, reference.affine)  # geometry of the prepared demo data (8 mm here)
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1  # the datalist's intensity range
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["samples"] == summary["samples"] and on_disk["checkpoint"].startswith(str(tmp_path.resolve()))


def test_phantoms_are_valid_and_seeded():
    a, b, c = phantom_volumes(3, 12, seed=1), phantom_volumes(3, 12, seed=1), phantom_volumes(3, 12, seed=2)
    assert a.shape == (3, 1, 12, 12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() == -1 and a.max() <= 1 and (a > -1).float().mean() > 0.1


def test_cli_info_and_console_script(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "wdm_128: 57.91M" in out and "wdm_256: 83.16M" in out
    proc = subprocess.run([sys.executable, "-m", "wdm3d.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_cli_demo(tmp_path, capsys):
    assert (
        main(
            ["demo", "--output", str(tmp_path), "--quick", "--num-cases", "4", "--num-samples", "1", "--device", "cpu"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Synthetic volumes" in out and str(tmp_path.resolve()) in out
    assert (tmp_path / "samples" / "sample_0000.nii.gz").exists() and (
        tmp_path / "samples" / "sample_0000.png"
    ).exists()
    # the demo samples the bundles' default process with its sampler (--quick: 2 Euler steps)
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["num_steps"], manifest["network_evaluations"]) == ("rflow", 2, 2)


def test_cli_demo_refuses_a_sampler_its_process_cannot_use_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:  # the demo trains rectified flow: a DDPM sampler would fail after training
        main(["demo", "--output", str(tmp_path), "--quick", "--sampler", "ddim"])
    assert err.value.code == 2 and "invalid choice: 'ddim'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_interrupted_demo_training_stops_before_sampling(tmp_path, monkeypatch, capsys):
    """On SIGTERM the bundle saves a checkpoint and returns normally; the demo must not sample that half-trained
    network and call it done."""
    from types import SimpleNamespace

    import wdm3d.bundle

    calls = []

    def fake_run_bundle(name, run_id, configs, **overrides):
        calls.append(run_id)
        state = SimpleNamespace(epoch=3, max_epochs=150, iteration=9)
        trainer = SimpleNamespace(state=state)
        return SimpleNamespace(parser=SimpleNamespace(get_parsed_content=lambda key: {"train#trainer": trainer}[key]))

    monkeypatch.setattr(wdm3d.bundle, "run_bundle", fake_run_bundle)
    from wdm3d.demo import DemoInterrupted

    with pytest.raises(DemoInterrupted, match="epoch 3 of 150"):
        run_demo(tmp_path / "a", num_cases=4, quick=True, progress=False)
    assert calls == ["training"]  # inference never ran
    assert not (tmp_path / "a" / "summary.json").exists() and not (tmp_path / "a" / "samples").exists()
    calls.clear()
    assert main(["demo", "--output", str(tmp_path / "b"), "--quick", "--num-cases", "4"]) == 143
    assert "interrupted" in capsys.readouterr().err and calls == ["training"]
