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
from mlflow.tracking import MlflowClient

from mlflow_server import free_port, mlflow_server
from test_bundle import AFFINE, CONFIGS, TINY, TINY_TRAIN, dataset, workflow  # noqa: F401 (fixture)
from wdm3d.engine import latest_checkpoint, load_checkpoint
from wdm3d.tracking import flatten_params

TRACKED = {**TINY_TRAIN, "mlflow": True, "log_every": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as (url, _):
        yield url


def train(dataset, out, max_epochs, **extra):
    wf = workflow(["train.json"], "training", dataset_dir=str(dataset), output_dir=str(out), max_epochs=max_epochs,
                  **{**TRACKED, **extra})
    wf.run()
    return wf


def run_of(out):
    return json.loads((Path(out) / "mlflow_run.json").read_text())


def test_flatten_params():
    flat = flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "true"}


def test_training_and_inference_are_visible_through_the_rest_api(server, dataset, tmp_path):
    train(dataset, tmp_path, max_epochs=2, tracking_uri=server)
    info = run_of(tmp_path)
    client = MlflowClient(tracking_uri=server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == info["run_name"]
    p = run.data.params
    assert p["batch_size"] == "2" and p["learning_rate"] == "1e-05" and p["image_size"] == "[16, 16, 16]"
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
        "checkpoints/checkpoint_final_iteration=4.pt"]

    # inference logs its manifest, previews and volumes to the run the checkpoint came from
    wf = workflow(["inference.json"], "inference", dataset_dir=str(dataset), output_dir=str(tmp_path), num_samples=1,
                  sampler="ddim", num_steps=2, **TINY)
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
        wf = workflow(["train.json"], "training", dataset_dir=str(dataset), output_dir=str(tmp_path / "out"),
                      max_epochs=2, tracking_uri=url, **TRACKED)
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
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("wdm3d_brats").experiment_id])
    assert len(ids) == 2 and len(runs) == 3 and len({r.info.run_name for r in runs}) == 3


def test_a_failed_run_is_marked_failed_and_never_reused(dataset, tmp_path):
    from ignite.engine import Events

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    wf = workflow(["train.json"], "training", dataset_dir=str(dataset), output_dir=str(tmp_path / "a"),
                  max_epochs=2, tracking_uri=uri, **TRACKED)
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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
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
