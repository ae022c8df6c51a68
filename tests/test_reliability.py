"""Reliability: exact resume after SIGKILL, SIGTERM checkpoints, safe loading, numerical guards, bad inputs."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from wdm3d.artifacts import FORMAT_VERSION, latest_checkpoint, load_checkpoint, load_network_weights
from wdm3d.data import ResumableSampler, SkipBadSamples, load_datalist, volume_transforms
from wdm3d.demo import phantom_volumes
from wdm3d.engine import (
    EMAHandler,
    GuardedIteration,
    NonFiniteTrainingError,
    RNGState,
    check_cli_overrides,
    check_override_keys,
)
from wdm3d.networks import WDMUNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "wdm3d_brats" / "configs"
MONAI_MAIN = str(Path(__import__("monai").__file__).parent / "bundle" / "__main__.py")
TINY = {
    "image_size": [16, 16, 16],
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
    "mlflow": False,
    "num_workers": 0,
    "val_interval": 100,
    "train#validator#on_completed": False,
    "ema_decay": 0.5,
    "learning_rate": 1e-3,
}


def _volume(path, data, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), path)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    entries = []
    for i, v in enumerate(phantom_volumes(4, 16, seed=5)):
        _volume(root / f"case{i}" / "t1n.nii.gz", (v[0].numpy() + 1) / 2)
        entries.append({"case": f"case{i}", "t1n": f"case{i}/t1n.nii.gz"})
    (root / "datalist.json").write_text(json.dumps({"intensity_range": [0.0, 1.0], "training": entries}))
    return root


def root_cause(err):
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def workflow(dataset, out, **overrides):
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        run_id="training",
        dataset_dir=str(dataset),
        output_dir=str(out),
        **{**TINY, **overrides},
    )
    wf.initialize()
    return wf


# --- exact resume after SIGKILL -----------------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    configs, meta, overrides, kill_at = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    wf = ConfigWorkflow(config_file=configs, meta_file=meta, workflow_type="train", run_id="training", **overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    if kill_at:
        @trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
        def _die(engine):  # before this iteration's checkpoint: the work since the last one is lost
            os.kill(os.getpid(), signal.SIGKILL)
    wf.run()
    """
)


def _launch(tmp_path, dataset, out, kill_at, **extra):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    overrides = {
        **TINY,
        "dataset_dir": str(dataset),
        "output_dir": str(out),
        "batch_size": 1,
        "max_epochs": 3,
        "save_every_iterations": 1,
        "save_interval": 1,
        "n_saved": 2,
        **extra,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(CONFIGS / "train.json"),
            str(CONFIGS / "metadata.json"),
            json.dumps(overrides),
            str(kill_at),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_run_killed_with_sigkill_and_resumed_ends_with_the_same_weights(dataset, tmp_path):
    # 4 cases, batch 1: 4 iterations per epoch, 12 in all; the kill lands in iteration 6 (epoch 2, mid-epoch),
    # after checkpoint_iteration=5 was written
    straight = _launch(tmp_path, dataset, tmp_path / "straight", kill_at=0)
    killed = _launch(tmp_path, dataset, tmp_path / "killed", kill_at=6)
    out_killed = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, out_killed[-3000:]
    models = tmp_path / "killed" / "models"
    assert latest_checkpoint(models).name == "checkpoint_iteration=5.pt"
    assert sorted(p.name for p in models.glob("checkpoint_iteration=*.pt")) == [
        "checkpoint_iteration=4.pt",
        "checkpoint_iteration=5.pt",
    ]  # n_saved=2 kept
    resumed = _launch(tmp_path, dataset, tmp_path / "killed", kill_at=0)
    out_resumed = resumed.communicate(timeout=300)[0]
    out_straight = straight.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out_resumed[-3000:]
    assert straight.returncode == 0, out_straight[-3000:]
    assert "Resumed from" in out_resumed and "skipping the 1 batch(es)" in out_resumed
    a = load_checkpoint(tmp_path / "straight" / "models" / "checkpoint_final_iteration=12.pt")
    b = load_checkpoint(tmp_path / "killed" / "models" / "checkpoint_final_iteration=12.pt")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 12
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the run did change the weights (equality is not trivially true)
    assert not torch.equal(a["model"]["conv_out.weight"], torch.zeros_like(a["model"]["conv_out.weight"]))


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(dataset, tmp_path):
    from ignite.engine import Events

    previous = signal.getsignal(signal.SIGTERM)
    wf = workflow(dataset, tmp_path, batch_size=1, max_epochs=3, save_every_iterations=0)
    trainer = wf.parser.get_parsed_content("train#trainer")

    @trainer.on(Events.ITERATION_STARTED(once=3))
    def _term(engine):
        os.kill(os.getpid(), signal.SIGTERM)

    wf.run()
    assert trainer.state.iteration == 3  # stopped at the end of the iteration the signal arrived in
    ckpt = load_checkpoint(tmp_path / "models" / "checkpoint_interrupted_iteration=3.pt")
    assert ckpt["trainer"]["iteration"] == 3
    assert signal.getsignal(signal.SIGTERM) is previous  # our handler is gone again
    # an interrupted run is not a completed one: no final checkpoint, no end-of-training validation or upload
    assert trainer.state.stopped_by_signal and not list((tmp_path / "models").glob("checkpoint_final_*"))
    # and the next run continues from there (3 % 4: mid-epoch)
    wf = workflow(dataset, tmp_path, batch_size=1, max_epochs=1, save_every_iterations=0)
    wf.run()
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 4
    # final and interrupted checkpoints do not pile up across launches: one of each kind
    workflow(dataset, tmp_path, batch_size=1, max_epochs=2, save_every_iterations=0).run()
    assert sorted(p.name for p in (tmp_path / "models").glob("checkpoint_*_iteration=*")) == [
        "checkpoint_final_iteration=8.pt",
        "checkpoint_interrupted_iteration=3.pt",
    ]


def test_a_run_stopped_by_sigterm_is_marked_killed_not_finished():
    from types import SimpleNamespace

    from wdm3d.tracking import MLflowTracker

    ended = []
    tracker = MLflowTracker.__new__(MLflowTracker)
    tracker._end = ended.append
    tracker._on_terminate(SimpleNamespace(state=SimpleNamespace(stopped_by_signal=True)))
    tracker._on_terminate(SimpleNamespace(state=SimpleNamespace()))  # another terminate(): COMPLETED follows
    assert ended == ["KILLED"]


def test_a_fresh_run_keeps_its_own_checkpoints_beside_an_older_longer_run(dataset, tmp_path):
    workflow(dataset, tmp_path, batch_size=2, max_epochs=4, save_interval=1, n_saved=2).run()
    assert sorted(p.name for p in (tmp_path / "models").glob("checkpoint_epoch=*")) == [
        "checkpoint_epoch=3.pt",
        "checkpoint_epoch=4.pt",
    ]
    wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=1, save_interval=1, n_saved=2, resume=False)
    wf.run()  # a new run in the same folder: its epoch-1 checkpoint is the newest and must survive
    kept = sorted(p.name for p in (tmp_path / "models").glob("checkpoint_epoch=*"))
    assert "checkpoint_epoch=1.pt" in kept and len(kept) == 2
    newest = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert newest["trainer"]["iteration"] == 2  # a resume continues the new run (4 cases, batch 2), not the old one
    # the same after a copy that does not keep modification times (cp -r): the save log, not mtime, says which
    # file is newest; here the copy made the old run's files look newer
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "models", copy, copy_function=shutil.copyfile)
    for i, name in enumerate(
        ["checkpoints.json", "checkpoint_final_iteration=2.pt", "checkpoint_epoch=1.pt", "checkpoint_epoch=4.pt"]
    ):
        os.utime(copy / name, (1e9 + i, 1e9 + i))
    assert latest_checkpoint(copy).name == "checkpoint_final_iteration=2.pt"
    wf = workflow(dataset, copy.parent, batch_size=2, max_epochs=2, save_interval=1, n_saved=2, ckpt_dir=str(copy))
    wf.run()  # resumes the new run's epoch 1 and prunes by the log: epoch 4 (older, by the log) goes, 1 and 2 stay
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 4
    assert sorted(p.name for p in copy.glob("checkpoint_epoch=*")) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]


def test_a_second_run_on_a_checkpoint_folder_in_use_is_refused(dataset, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    holder = subprocess.Popen(  # another process (the first run) holding the folder's lock
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(models / ".lock")!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, b'{{"pid": 4242, "host": "node7"}}')
            print("locked", flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=1)
        with pytest.raises(Exception) as err:
            wf.run()
        assert "Another training run is writing checkpoints to" in str(root_cause(err.value))
        assert "node7" in str(root_cause(err.value))
        assert not list(models.glob("*.pt"))
    finally:
        holder.kill()
        holder.wait()
    wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=1)
    wf.run()  # the holder died: the kernel released its lock, nothing stale is left
    assert latest_checkpoint(models).name == "checkpoint_final_iteration=2.pt"
    wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=2)
    wf.run()  # a run that ended released its lock (same process)
    assert latest_checkpoint(models).name == "checkpoint_final_iteration=4.pt"


def test_a_resumed_run_takes_the_configured_learning_rate(dataset, tmp_path):
    import logging

    workflow(dataset, tmp_path, batch_size=2, max_epochs=1, learning_rate=1e-3).run()
    wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=2, learning_rate=2e-4)
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("wdm3d.engine.checkpoint").addHandler(handler)  # (the bundle's logging.conf replaces caplog's)
    try:
        wf.run()  # restoring the optimizer state must not bring back the checkpoint's lr over --learning_rate
    finally:
        logging.getLogger("wdm3d.engine.checkpoint").removeHandler(handler)
    optimizer = wf.parser.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["lr"] == 2e-4
    assert any("'optimizer[0].lr': (0.001, 0.0002)" in m for m in seen)
    assert any(s.get("step") for s in optimizer.state.values())  # the moments and step counts were restored


def test_resuming_with_another_batch_size_keeps_an_epoch_one_pass_over_the_data(dataset, tmp_path):
    workflow(dataset, tmp_path, batch_size=2, max_epochs=1).run()  # 4 cases: 2 iterations per epoch
    wf = workflow(dataset, tmp_path, batch_size=1, max_epochs=2)
    wf.run()
    state = wf.parser.get_parsed_content("train#trainer").state
    assert state.epoch_length == 4 and state.epoch == 2 and state.iteration == 8  # epoch 2: all 4 cases, batch 1


def test_resuming_keeps_the_validation_history(dataset, tmp_path):
    workflow(dataset, tmp_path, batch_size=2, max_epochs=2, val_interval=1).run()
    history = tmp_path / "validation" / "history.json"
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1, 2]
    workflow(dataset, tmp_path, batch_size=2, max_epochs=3, val_interval=1).run()  # resumes at epoch 2
    assert [r["epoch"] for r in json.loads(history.read_text())] == [1, 2, 3]


# --- safe loading --------------------------------------------------------------------------------------------------


def test_checkpoints_carry_format_and_training_config_and_refuse_other_architectures(dataset, tmp_path):
    workflow(dataset, tmp_path, batch_size=2, max_epochs=1).run()
    path = latest_checkpoint(tmp_path / "models")
    ckpt = load_checkpoint(path)
    rc = ckpt["run_config"]
    assert rc["wdm3d_format"] == FORMAT_VERSION == 1
    assert rc["network"]["base_channels"] == 8 and rc["network"]["channel_mult"] == [1, 2]
    assert rc["network"]["norm_num_groups"] == 4 and rc["network"]["class"].endswith("WDMUNet")
    assert rc["diffusion"]["prediction_type"] == "sample" and rc["settings"]["image_size"] == [16, 16, 16]
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    # resuming into a wider network names the first mismatching weight and both shapes
    wf = workflow(dataset, tmp_path, batch_size=2, max_epochs=2, **{"network_def#base_channels": 16})
    with pytest.raises(Exception) as err:
        wf.run()
    msg = str(root_cause(err.value))
    assert "does not fit this network" in msg and path.name in msg
    assert "'time_embed.0.weight' has shape (32, 8) in the checkpoint but (64, 16) in the network" in msg
    # so does loading weights for sampling, with what the checkpoint was trained with
    wide = WDMUNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    with pytest.raises(RuntimeError, match=r"'time_embed.0.weight' has shape \(32, 8\).*'base_channels': 8"):
        load_network_weights(wide, path)
    # a checkpoint from a newer format is refused
    ckpt["run_config"]["wdm3d_format"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"future\.pt has format 2"):
        load_checkpoint(tmp_path / "future.pt")


def test_a_checkpoint_entry_that_does_not_restore_names_the_file_and_entry(tmp_path):
    from ignite.engine import Engine

    from wdm3d.engine.checkpoint import ResumeFromLatest

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    state = opt.state_dict()
    state["param_groups"][0]["params"] = [0]  # one parameter where the optimizer has two
    torch.save({"model": net.state_dict(), "optimizer": state}, tmp_path / "ckpt_1.pt")
    resume = ResumeFromLatest(tmp_path, {"model": net, "optimizer": opt})
    with pytest.raises(ValueError, match=r"Checkpoint .*ckpt_1\.pt: cannot restore 'optimizer' \(AdamW\): .*size"):
        resume.restore(Engine(lambda e, b: None), tmp_path / "ckpt_1.pt")


def test_after_a_ddp_resume_the_ranks_draw_different_noise(monkeypatch):
    from wdm3d.engine.checkpoint import RNGState

    torch.manual_seed(0)
    state = RNGState().state_dict()  # what rank 0 saved
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    draws = {}
    for rank in (0, 1, 2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda r=rank: r)
        RNGState().load_state_dict(state)
        draws[rank] = (torch.randn(4), np.random.rand(), random.random())
    torch.manual_seed(0)
    assert torch.equal(draws[0][0], torch.randn(4))  # rank 0: exactly the saved state (exact single-process resume)
    assert not torch.equal(draws[1][0], draws[0][0]) and not torch.equal(draws[2][0], draws[1][0])
    assert len({d[1] for d in draws.values()}) == 3 and len({d[2] for d in draws.values()}) == 3


def test_rng_state_round_trips_with_weights_only(tmp_path):
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng": RNGState().state_dict()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    RNGState().load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_resumable_sampler_order_depends_on_seed_and_epoch_and_skips():
    data = list(range(10))
    s = ResumableSampler(data, seed=4)
    s.set_epoch(1)
    first = list(s)
    assert sorted(first) == data and list(s) == first  # same epoch: same order
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    s.skip_next(3)
    assert list(s) == first[3:] and list(s) == first  # skipping applies to one pass only
    ranks = [list(ResumableSampler(data, seed=4, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == data


# --- numerical guards ----------------------------------------------------------------------------------------------


def _guarded_trainer(losses, max_nonfinite_steps=2, grad_clip_norm=None, lr=0.1, amp=False):
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    calls = iter(losses)

    def loss_fn(pred, target):  # a normal MSE, with the scale factor of each step taken from ``losses``
        return ((pred - target) ** 2).mean() * next(calls)

    opt = torch.optim.SGD(net.parameters(), lr=lr)
    ema = EMAHandler(net, momentum=0.5)
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1) * 100} for _ in range(len(losses))]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=loss_fn,
        decollate=False,
        amp=amp,
        iteration_update=GuardedIteration(grad_clip_norm, max_nonfinite_steps),
    )
    if amp:  # MONAI makes a GradScaler only with CUDA; a CPU one runs the same scale/unscale/step/update path
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    ema.attach(trainer)
    seen = []

    from ignite.engine import Events

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        seen.append((net.weight.detach().clone(), ema.ema_model.weight.detach().clone(), engine.state.output["loss"]))

    return trainer, seen


@pytest.mark.parametrize("amp", [False, True])  # True: the AMP path with a GradScaler
def test_non_finite_steps_are_skipped_counted_and_stop_after_a_streak(amp):
    trainer, seen = _guarded_trainer([1.0, float("nan"), 1.0, float("inf"), float("nan"), float("nan")], amp=amp)
    assert (trainer.scaler is not None) == amp
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive.*max_nonfinite_steps=2"):
        trainer.run()
    (w1, e1, _), (w2, e2, l2), (w3, e3, _), (w4, e4, _), (w5, e5, _) = seen
    assert torch.isnan(l2) and torch.equal(w1, w2) and torch.equal(e1, e2)  # no update, no EMA update
    assert not torch.equal(w2, w3) and not torch.equal(e2, e3)  # a finite step trains again
    assert torch.equal(w3, w4) and torch.equal(w4, w5) and torch.equal(e3, e5)
    assert trainer.state.nonfinite_steps == 4 and trainer.state.metrics["nonfinite_steps"] == 4
    assert torch.isfinite(w5).all()
    if amp:
        assert trainer.scaler.get_scale() < 8.0  # the skipped steps lowered the loss scale


def test_gradient_clipping_bounds_the_update():
    trainer, seen = _guarded_trainer([1.0, 1.0], grad_clip_norm=0.01, lr=1.0)
    w0 = trainer.network.weight.detach().clone()
    trainer.run()
    step = seen[0][0] - w0  # the weight's share of the update (the bias takes the rest of the clipped norm)
    assert 0 < step.norm() <= 0.01 + 1e-6  # SGD lr 1: the update is the clipped gradient
    assert trainer.state.metrics["grad_norm_total"] > 0.01  # the raw norm was larger
    with pytest.raises(ValueError, match="grad_clip_norm"):
        GuardedIteration(grad_clip_norm=0)


class _ToyVAE(torch.nn.Module):
    """x -> conv (the decoder's 'last layer') -> reconstruction, with a fixed standard-normal posterior."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Conv3d(1, 1, 3, padding=1)

    def last_layer_weight(self):
        return self.out.weight

    def forward(self, x):
        from wdm3d.networks import LatentDistribution, VAEOutput

        mean = torch.zeros(x.shape[0], 2, 1, 1, 1)
        return VAEOutput(
            reconstruction=self.out(x), posterior=LatentDistribution(mean, torch.zeros_like(mean)), latent=mean
        )


class _CompiledLike(torch.nn.Module):
    """torch.compile's wrapper as far as unwrapping goes: the network under ``_orig_mod``, none of its methods."""

    def __init__(self, network):
        super().__init__()
        self._orig_mod = network

    def forward(self, x):
        return self._orig_mod(x)


def test_the_vae_gan_iteration_reaches_the_network_inside_a_compile_wrapper():
    # the adaptive GAN weight needs the decoder's last layer of the network itself, not of the wrapper that
    # SupervisedTrainer(compile=True) puts around it
    from monai.engines import SupervisedTrainer

    from wdm3d.engine import VAEIteration, VolumePrepareBatch
    from wdm3d.losses import VAELoss, patch_discriminator

    torch.manual_seed(0)
    inner = _ToyVAE()
    net = _CompiledLike(inner)
    disc = patch_discriminator(in_channels=1, channels=4, num_layers_d=2)
    before = inner.out.weight.detach().clone()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.randn(1, 1, 16, 16, 16)}],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=VAELoss(),
        prepare_batch=VolumePrepareBatch("image"),
        decollate=False,
        iteration_update=VAEIteration(disc, torch.optim.SGD(disc.parameters(), lr=0.1), discriminator_start=0),
    )
    trainer.run()
    terms = trainer.state.loss_terms
    assert terms["adaptive_weight"] > 0 and math.isfinite(terms["adv_g"]) and math.isfinite(terms["adv_d"])
    assert not torch.equal(inner.out.weight, before)  # the generator step trained the inner network


# --- the bad-input matrix ------------------------------------------------------------------------------------------


def _load(path, key="img", **kw):
    return volume_transforms(key, (8, 8, 8), **kw)({key: path})


def test_bad_inputs_fail_with_errors_that_name_the_file(tmp_path):
    good = _volume(tmp_path / "good.nii.gz", np.full((8, 8, 8), 0.5))
    assert tuple(_load(good)["img"].shape) == (1, 8, 8, 8)
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(Path(good).read_bytes()[:60])
    with pytest.raises(ValueError, match=r"Could not read .*trunc\.nii\.gz.*truncated"):
        _load(str(trunc))
    (tmp_path / "junk.nii").write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ValueError, match=r"Could not read .*junk\.nii"):
        _load(str(tmp_path / "junk.nii"))
    flat = _volume(tmp_path / "slice.nii.gz", np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"img: .*slice\.nii\.gz has 2 spatial dimension\(s\)"):
        _load(flat)
    multi = _volume(tmp_path / "multi.nii.gz", np.zeros((8, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"multi\.nii\.gz has 2 channel\(s\).*num_channels=1"):
        _load(multi, num_channels=1)
    nan = np.full((8, 8, 8), 0.5)
    nan[1, 2, 3], nan[4, 4, 4] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"nan\.nii\.gz has 2 NaN/Inf voxel"):
        _load(_volume(tmp_path / "nan.nii.gz", nan))
    hu = _volume(tmp_path / "hu.nii.gz", np.linspace(-1000, 1000, 512).reshape(8, 8, 8))
    with pytest.raises(ValueError, match=r"hu\.nii\.gz spans \[-1000, 1000\], far outside intensity_range \[0, 1\]"):
        _load(hu)
    slight = _volume(tmp_path / "slight.nii.gz", np.linspace(-0.2, 1.2, 512).reshape(8, 8, 8))
    assert float(_load(slight)["img"].max()) == 1.0  # small overshoots are clipped, not an error
    # wrong modality count: a key listing two files stacks two channels
    other = _volume(tmp_path / "other.nii.gz", np.full((8, 8, 8), 0.5))
    with pytest.raises(ValueError, match=r"good\.nii\.gz, .*other\.nii\.gz has 2 channel\(s\) \(modalities\)"):
        _load([good, other], num_channels=1)


def test_bad_datalists_name_the_file_and_key(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match=r"datalist\.json: split 'training' is empty"):
        load_datalist(path, "training", ["t1n"])
    path.write_text(json.dumps({"training": [{"t1n": "a.nii.gz"}, {"t1n": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=r"entry 1 of 'training' lists t1n=.*gone\.nii\.gz"):
        load_datalist(path, "training", ["t1n"])
    with pytest.raises(KeyError, match=r"no key\(s\) \['t2w'\]"):
        load_datalist(path, "training", ["t2w"], check_files=False)
    with pytest.raises(ValueError, match="empty"):
        SkipBadSamples([])


def test_misspelt_override_keys_are_refused_with_the_closest_key():
    config = json.loads((CONFIGS / "train.json").read_text())
    check_override_keys(config, ["batch_size", "network_def#base_channels", "train#dataloader#pin_memory"])
    with pytest.raises(KeyError, match=r"'bacth_size'.*Did you mean 'batch_size'"):
        check_override_keys(config, ["bacth_size"])
    with pytest.raises(KeyError, match=r"'diffusion#lll_scal'.*Did you mean 'diffusion#lll_scale'"):
        check_override_keys(config, ["diffusion#lll_scal"])
    argv = [MONAI_MAIN, "run", "training", "--config_file", str(CONFIGS / "train.json"), "--max_epoch", "3"]
    with pytest.raises(KeyError, match=r"'max_epoch'.*'max_epochs'"):
        check_cli_overrides(argv)
    assert check_cli_overrides(["pytest", "--bacth_size", "2"]) is False  # not a bundle run: not checked


def test_misspelt_key_stops_a_monai_bundle_run(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--output_dir",
        str(tmp_path),
        "--bacth_size",
        "2",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "Unknown config key 'bacth_size'" in proc.stderr and "Did you mean 'batch_size'" in proc.stderr
    assert not (tmp_path / "models").exists()  # stopped before training


class _SomeBad(torch.utils.data.Dataset):
    # items 2, 5 and 7 of 10 fail; module level so that spawned DataLoader workers can unpickle it
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i in (2, 5, 7):
            raise ValueError(f"item {i} is broken")
        return torch.tensor([i])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_bad_samples_found_by_dataloader_workers_are_counted_in_the_main_process(context):
    ds = SkipBadSamples(_SomeBad(), max_bad_samples=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context=context)
    seen = sorted(int(b) for b in loader)
    assert seen == [0, 1, 3, 3, 4, 6, 6, 8, 8, 9]  # each bad item replaced by the next good one
    assert ds.bad_samples == {}  # the main process met none itself
    assert ds.num_bad == 3  # but counts what its workers found (it read 0 before)
    # the limit covers the workers together: worker 0 meets item 2, worker 1 items 5 and 7 (round-robin batches),
    # so neither alone exceeds 2, all three do
    ds = SkipBadSamples(_SomeBad(), max_bad_samples=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context=context)
    with pytest.raises(RuntimeError, match="3 bad training samples, more than max_bad_samples=2"):
        list(loader)


def test_lowercase_false_on_the_bundle_command_line_means_false(dataset, tmp_path):
    # monai.bundle run hands "false" over as text, which counts as true: read as text, --mlflow false would log to
    # MLflow and --resume false would resume
    tiny = [f"--{k}={v!r}" if isinstance(v, (list, bool)) else f"--{k}={v}" for k, v in TINY.items() if k != "mlflow"]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(tmp_path),
        "--max_epochs",
        "1",
        "--batch_size",
        "2",
        *tiny,
        "--mlflow",
        "false",
        "--resume=false",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Read --mlflow false as False" in out and "Resuming is off" in out
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "mlflow_run.json").exists()
    assert (tmp_path / "models" / "checkpoint_final_iteration=2.pt").is_file()


def test_a_bad_sample_is_skipped_and_counted_during_training(dataset, tmp_path):
    data = json.loads((dataset / "datalist.json").read_text())
    nan = np.full((16, 16, 16), 0.5)
    nan[3, 3, 3] = np.nan
    _volume(tmp_path / "bad" / "t1n.nii.gz", nan)
    data["training"] = [{**e, "t1n": str(dataset / e["t1n"])} for e in data["training"]]
    data["training"].append({"case": "bad", "t1n": str(tmp_path / "bad" / "t1n.nii.gz")})
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    wf = workflow(tmp_path, tmp_path / "out", batch_size=1, max_epochs=1)
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    ds = wf.parser.get_parsed_content("train#safe_dataset")  # SkipBadSamples around train#dataset (the CacheDataset)
    assert trainer.state.iteration == 5  # the bad case was replaced, not dropped or fatal
    assert list(ds.bad_samples) == [4] and "NaN/Inf" in ds.bad_samples[4] and "bad/t1n.nii.gz" in ds.bad_samples[4]
    assert trainer.state.metrics["bad_samples"] == 1
    wf = workflow(tmp_path, tmp_path / "out2", batch_size=1, max_epochs=1, num_workers=2)
    wf.run()  # the workers meet the bad case; the main process's metric counts it
    assert wf.parser.get_parsed_content("train#trainer").state.metrics["bad_samples"] == 1
    wf = workflow(tmp_path, tmp_path / "out0", batch_size=1, max_epochs=1, max_bad_samples=0)
    with pytest.raises(Exception) as err:
        wf.run()
    assert "max_bad_samples=0" in str(root_cause(err.value)) and "bad/t1n.nii.gz" in str(root_cause(err.value))


def test_a_failed_validation_round_is_reported_and_training_goes_on(tmp_path):
    from types import SimpleNamespace

    from wdm3d.diffusion import WaveletDiffusion
    from wdm3d.engine import SampleValidator

    class OutOfMemory(torch.nn.Module):  # sampling fails the way a CUDA OOM does
        def forward(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

    logger = __import__("logging").getLogger("test_validation_round")
    engine = SimpleNamespace(state=SimpleNamespace(epoch=2, iteration=40, metrics={}), logger=logger)
    validator = SampleValidator(WaveletDiffusion(), OutOfMemory(), (1, 8, 8, 8), tmp_path, num_steps=2)
    validator(engine)  # a failed round must not raise into the engine, which would end the run at every val_interval
    history = json.loads((tmp_path / "history.json").read_text())
    assert history == [{"epoch": 2, "iteration": 40, "error": "RuntimeError: CUDA out of memory (simulated)"}]
    assert engine.state.metrics["validation_failures"] == 1 and not hasattr(engine.state, "val_round")
    engine.state.epoch = 3
    with pytest.raises(RuntimeError, match="simulated"):
        SampleValidator(WaveletDiffusion(), OutOfMemory(), (1, 8, 8, 8), tmp_path, num_steps=2, strict=True)(engine)
