"""MLflow tracking of the bundle, against a real ``mlflow server`` on 127.0.0.1 and SQLite stores."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_bundle
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, mlflow_server
from test_bundle import AFFINE, CONFIGS, TINY, TINY_TRAIN, workflow

from wdm3d.engine import latest_checkpoint, load_checkpoint
from wdm3d.tracking import flatten_params

dataset = test_bundle.dataset  # the tiny prepared dataset (a module-scoped fixture), shared with test_bundle
TRACKED = {**TINY_TRAIN, "mlflow": True, "log_every": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (url, _):
        yield url


def train(dataset, out, max_epochs, **extra):
    wf = workflow(
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(out),
        max_epochs=max_epochs,
        **{**TRACKED, **extra},
    )
    wf.run()
    return wf


def run_of(out):
    return json.loads((Path(out) / "mlflow_run.json").read_text())


# the settings the bundles once listed by hand as the tracker's params: dashboards and docs know them by these names
LISTED_BEFORE = (
    "image_key",
    "image_size",
    "num_channels",
    "unet_preset",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "subband_weights",
    "ema_decay",
    "max_epochs",
    "cache_rate",
    "num_workers",
    "seed",
    "bf16",
    "compile",
    "channels_last",
    "gradient_checkpointing",
    "fp32_io",
    "val_interval",
    "val_num_samples",
    "val_sampler",
    "val_num_steps",
    "save_interval",
    "intensity_range",
    "save_every_iterations",
    "grad_clip_norm",
    "max_nonfinite_steps",
    "max_bad_samples",
    "deterministic",
    "learned_subband_weights",
)


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "true"}


def test_config_settings_are_the_data_and_the_evaluated_expressions_of_the_top_level():
    from monai.bundle import ConfigParser

    from wdm3d.tracking import bundle_settings, config_settings

    parser = ConfigParser(
        {
            "imports": ["$import os"],
            "batch_size": 2,
            "image_size": [16, 16, 16],
            "note": None,
            "vocabularies": {"modality": ["t1n", "t2w"]},
            "doubled": "$@batch_size * 2",
            "sampler": "$'ddim' if @batch_size else 'ddpm'",
            "same": "@batch_size",
            "unused": "$1 / 0",  # nothing evaluates it, and neither do the settings (it could run the training)
            "network_def": {"_target_": "torch.nn.Identity"},
            "device": "$torch.device('cpu')",
            "initialize": [],
            "run": ["$@batch_size"],
            "finalize": [],
            "training": "$@run",
            "_meta_": {"version": "1"},
        }
    )
    parser.parse()
    assert config_settings(parser) == {
        "batch_size": 2,
        "image_size": [16, 16, 16],
        "note": None,
        "vocabularies": {"modality": ["t1n", "t2w"]},
    }
    for key in ("doubled", "sampler", "same", "network_def", "device"):
        parser.get_parsed_content(key)
    settings = bundle_settings(parser)  # read when asked: what the run has evaluated by then
    assert dict(settings) == {
        "batch_size": 2,
        "image_size": [16, 16, 16],
        "note": None,
        "vocabularies": {"modality": ["t1n", "t2w"]},
        "doubled": 4,
        "sampler": "ddim",
        "same": 2,
    }
    with pytest.raises(RuntimeError, match="call it from a config"):
        bundle_settings()  # no config is evaluating this call


def test_more_params_than_one_mlflow_batch_takes_are_all_logged(tmp_path):
    from wdm3d.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracker = MLflowTracker(
        tmp_path,
        tracking_uri=uri,
        experiment_name="many",
        settings={f"setting_{i}": i for i in range(150)},
        params={"setting_3": "given"},
    )
    tracker._start()
    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert {f"setting_{i}" for i in range(150)} <= set(params)  # MLflow takes 100 per call
    assert params["setting_149"] == "149" and params["setting_3"] == "given"  # params win over settings


def test_training_and_inference_are_visible_through_the_rest_api(server, dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=2, tracking_uri=server, note="a setting no list names")
    info = run_of(tmp_path)
    client = MlflowClient(tracking_uri=server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == info["run_name"]
    p = run.data.params
    assert p["batch_size"] == "2" and p["learning_rate"] == "1e-05" and p["image_size"] == "[16, 16, 16]"
    assert set(LISTED_BEFORE) <= set(p) and p["val_sampler"] == "rflow" and p["intensity_range"] == "[0.0, 1.0]"
    assert p["note"] == "a setting no list names"  # every top-level setting is a param, a new one too
    assert p["diffusion.lll_scale"] == "3.0" and p["diffusion.prediction_type"] == "sample"
    assert p["network.class"] == "WDMUNet" and int(p["network.parameters"]) > 0 and p["optimizer.class"] == "AdamW"
    assert p["versions.monai"] and p["versions.torch"] and p["git_commit"]
    datalist = Path(dataset) / "datalist.json"
    assert p["datalist.sha256"] == hashlib.sha256(datalist.read_bytes()).hexdigest() and p["datalist.n_training"] == "4"
    # metric histories: one loss per iteration (2 epochs x 2 iterations), per subband too, and per-epoch validation
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4]
    local = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m.value for m in loss) == pytest.approx(sorted(r["loss"] for r in local if "loss" in r))
    for name in ("loss_LLL", "loss_HHH", "lr", "grad_norm", "throughput_volumes_per_s"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 4, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_sample_std")] == [2, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert arts == {"validation/epoch_0001.png", "validation/epoch_0002.png"}
    assert "config/train.json" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/checkpoint_final_iteration=4.pt"
    ]

    # inference logs its manifest, previews and volumes to the run the checkpoint came from
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        num_samples=1,
        sampler="rflow",
        num_steps=2,
        **TINY,
    )
    wf.run()
    (folder,) = client.list_artifacts(run.info.run_id, "inference")
    files = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, folder.path)}
    assert files == {"manifest.json", "sample_0000.png", "sample_0000.nii.gz"}
    local_copy = client.download_artifacts(run.info.run_id, f"{folder.path}/sample_0000.nii.gz", str(tmp_path / "dl"))
    np.testing.assert_allclose(nib.load(local_copy).affine, AFFINE)


def test_a_dead_server_does_not_stop_training(dataset, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wf = train(dataset, tmp_path, max_epochs=1, tracking_uri=dead)
    assert any("MLflow" in str(w.message) and "training goes on" in str(w.message) for w in caught)
    assert wf.parser.get_parsed_content("train#trainer").state.iteration == 2
    assert (tmp_path / "models" / "checkpoint_final_iteration=2.pt").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # nothing lost locally


def test_a_server_that_dies_mid_run_does_not_stop_training(dataset, tmp_path):
    from ignite.engine import Events

    with mlflow_server(tmp_path / "srv") as (url, kill):
        wf = workflow(
            ["train.json"],
            "training",
            dataset_dir=str(dataset),
            output_dir=str(tmp_path / "out"),
            max_epochs=2,
            tracking_uri=url,
            **TRACKED,
        )
        trainer = wf.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: kill())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wf.run()
    assert trainer.state.iteration == 4
    assert any("MLflow" in str(w.message) for w in caught)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_two_launches_make_two_runs(dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    train(dataset, tmp_path / "a", max_epochs=1, tracking_uri=uri)
    train(dataset, tmp_path / "b", max_epochs=1, tracking_uri=uri)
    train(dataset, tmp_path / "b", max_epochs=1, tracking_uri=uri, resume=False)  # a fresh start, same folder
    ids = {run_of(tmp_path / "a")["run_id"], run_of(tmp_path / "b")["run_id"]}
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("wdm3d_brats").experiment_id]
    )
    assert len(ids) == 2 and len(runs) == 3 and len({r.info.run_name for r in runs}) == 3


def test_a_failed_run_is_marked_failed_and_never_reused(dataset, tmp_path):
    from ignite.engine import Events

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    wf = workflow(
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path / "a"),
        max_epochs=2,
        tracking_uri=uri,
        **TRACKED,
    )
    trainer = wf.parser.get_parsed_content("train#trainer")

    def boom(engine):
        raise RuntimeError("simulated crash")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), boom)
    with pytest.raises(Exception) as err:
        wf.run()
    assert "simulated crash" in repr(err.value) or "simulated crash" in repr(err.value.__cause__)
    failed = run_of(tmp_path / "a")["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(failed).info.status == "FAILED"
    train(dataset, tmp_path / "b", max_epochs=1, tracking_uri=uri)
    assert run_of(tmp_path / "b")["run_id"] != failed
    assert client.get_run(failed).info.status == "FAILED"


def test_a_killed_then_resumed_training_keeps_its_run(dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "out"
    args = {**TRACKED, "max_epochs": 200, "tracking_uri": uri, "dataset_dir": str(dataset), "output_dir": str(out)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json")]
    for k, v in args.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.time() + 240
        while not (out / "models" / "checkpoint_epoch=2.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "training subprocess ended or hung"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = run_of(out)["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(killed).info.status == "RUNNING"  # SIGKILL leaves no chance to say otherwise
    before = {m.step for m in client.get_metric_history(killed, "loss")}
    # the kill lands at some epoch >= 2 (tiny epochs are fast): resume one epoch past the newest checkpoint
    saved = load_checkpoint(latest_checkpoint(out / "models"))["trainer"]
    epoch = saved["iteration"] // saved["epoch_length"]
    assert epoch >= 2
    wf = train(dataset, out, max_epochs=epoch + 1, tracking_uri=uri)  # resume: continues from that checkpoint
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 * (epoch + 1) and run_of(out)["run_id"] == killed
    assert client.get_run(killed).info.status == "FINISHED"
    after = {m.step for m in client.get_metric_history(killed, "loss")}
    assert {2 * epoch + 1, 2 * epoch + 2} <= after and before <= after
    exp = client.get_experiment_by_name("wdm3d_brats").experiment_id
    assert len(client.search_runs([exp])) == 1


def _tracker(wf):
    from wdm3d.tracking import MLflowTracker

    tracker = wf.parser.get_parsed_content("train#tracker")
    assert isinstance(tracker, MLflowTracker)
    return tracker


@pytest.mark.parametrize(("retry_after", "outage"), [(0.0, 2), (1000.0, 1)])
def test_an_mlflow_blip_loses_no_metric_and_the_run_still_ends(dataset, tmp_path, retry_after, outage):
    # one failed call used to switch MLflow off for the rest of the launch: later metrics were never sent and the
    # run stayed RUNNING. Now: a cool-down, the metrics kept, sent when MLflow answers (at the latest at the end)
    from ignite.engine import Events

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    wf = workflow(
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path / "out"),
        max_epochs=3,
        tracking_uri=uri,
        **TRACKED,
    )
    trainer, tracker = wf.parser.get_parsed_content("train#trainer"), _tracker(wf)
    tracker.retry_after = retry_after
    failures = []

    def flaky(engine):
        real = tracker._client.log_batch

        def log_batch(*args, **kwargs):
            if len(failures) < outage:  # calls that fail; with a long cool-down the end of training retries
                failures.append(engine.state.iteration)
                raise ConnectionError("simulated outage")
            return real(*args, **kwargs)

        tracker._client.log_batch = log_batch

    trainer.add_event_handler(Events.ITERATION_STARTED(once=2), flaky)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wf.run()
    assert failures  # the outage happened
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_of(tmp_path / "out")["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4, 5, 6]


def test_a_resume_whose_run_is_gone_starts_a_tagged_run_and_changed_settings_are_recorded(dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "out"
    train(dataset, out, max_epochs=1, tracking_uri=uri)
    first = run_of(out)["run_id"]
    client = MlflowClient(tracking_uri=uri)
    train(dataset, out, max_epochs=2, tracking_uri=uri, grad_clip_norm=1.0)  # the same run, a changed setting
    assert run_of(out)["run_id"] == first
    run = client.get_run(first)
    assert run.data.params["grad_clip_norm"] == "null" and run.data.tags["wdm3d.resume1.grad_clip_norm"] == "1.0"
    client.delete_run(first)  # (or the output folder moved away from its store, or another tracking URI)
    train(dataset, out, max_epochs=3, tracking_uri=uri, grad_clip_norm=1.0)
    second = run_of(out)["run_id"]
    assert second != first  # used to stay untracked for the whole launch
    run = client.get_run(second)
    assert run.data.tags["wdm3d.resumed_from"].startswith(first) and run.data.params["grad_clip_norm"] == "1.0"
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(second, "loss")) == [5, 6]


def test_validation_metrics_are_logged_once_per_round_and_the_final_round_too(dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "out"
    train(dataset, out, max_epochs=3, tracking_uri=uri, val_interval=2, **{"train#validator#on_completed": True})
    history = json.loads((out / "validation" / "history.json").read_text())
    assert [(r["epoch"], r["iteration"]) for r in history] == [(2, 4), (3, 6)]
    client = MlflowClient(tracking_uri=uri)
    logged = [(m.step, m.value) for m in client.get_metric_history(run_of(out)["run_id"], "val_sample_std")]
    # epoch 2's round at step 4, the final round at step 6 with its own value (a stale copy of epoch 2's was
    # logged at step 6 and the final round's was lost: the run had ended before it)
    assert sorted(logged) == [(4, pytest.approx(history[0]["std"])), (6, pytest.approx(history[1]["std"]))]


def test_non_finite_metrics_reach_mlflow_and_metrics_jsonl_as_null(tmp_path):
    from wdm3d.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracker = MLflowTracker(tmp_path, tracking_uri=uri, experiment_name="nan")
    tracker._start()
    tracker._log_metrics({"loss": float("nan"), "lr": 1e-4}, 1)
    tracker._log_metrics({"loss": 0.5}, 2)
    values = [m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(tracker.run_id, "loss")]
    assert len(values) == 2 and np.isnan(values[0]) and values[1] == 0.5  # the NaN step used to vanish
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] is None and rows[0]["lr"] == 1e-4


def test_log_to_run_does_not_create_a_missing_sqlite_store(tmp_path):
    from wdm3d.tracking import log_to_run

    gone = tmp_path / "old_cluster" / "scratch" / "mlruns.db"
    (tmp_path / "f.txt").write_text("x")
    with pytest.warns(RuntimeWarning, match="does not exist here"):
        assert not log_to_run({"run_id": "abc", "tracking_uri": f"sqlite:///{gone}"}, [tmp_path / "f.txt"], "x")
    assert not (tmp_path / "old_cluster").exists()
