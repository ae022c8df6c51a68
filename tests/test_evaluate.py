"""wdm3d.evaluate, `wdm3d evaluate` and the bundle's evaluate step, on tiny folders (CPU, seconds)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from wdm3d.cli import main
from wdm3d.demo import phantom_volumes
from wdm3d.evaluate import evaluate, find_run_info, load_volumes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "wdm3d_brats" / "configs"
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def write(folder: Path, vols, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(vols):
        p = folder / f"{prefix}_{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(v, np.float32), AFFINE), p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    vols = [((v[0].numpy() + 1) / 2) for v in phantom_volumes(10, 16, seed=3)]
    write(root / "real", vols[:6], "real")
    write(root / "fake", vols[6:] + [vols[2]], "sample")  # the last synthetic one is a planted copy of real_02
    return root


def test_cli_end_to_end_writes_json_markdown_and_png(folders, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(
        [
            "evaluate",
            "--real",
            str(folders / "real"),
            "--fake",
            str(folders / "fake"),
            "--out",
            str(out),
            "--pairs",
            "6",
            "--no-mlflow",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for step in ("fid", "ms_ssim", "wasserstein", "mmd", "memorization"):
        assert f"  {step}: " in printed  # the cost of each metric
    assert "resnet_50_23dataset.pth" in printed and str(out) in printed
    res = json.loads((out / "results.json").read_text())
    assert {"fid", "ms_ssim", "wasserstein", "mmd_features", "mmd_voxels", "memorization", "timings", "metrics"} <= set(
        res
    )
    assert res["n_fake"] == 5 and res["n_real"] == 6 and res["shape"] == [16, 16, 16]
    assert res["fid"]["extractor"] == "random_conv3d" and not res["fid"]["comparable_with_papers"]
    assert (res["fid"]["n_fake"], res["fid"]["n_real"]) == (5, 6) and res["fid"]["fid"] > 0
    assert res["ms_ssim"]["fake"]["n_pairs"] == 6 and res["ms_ssim"]["real"]["n_pairs"] == 6
    assert res["ms_ssim"]["fake"]["adapted"] and "not comparable" in res["ms_ssim"]["fake"]["note"]
    assert [c["fake"] for c in res["memorization"]["suspected_copies"]] == ["sample_04.nii.gz"]
    assert res["memorization"]["suspected_copies"][0]["train"] == "real_02.nii.gz"
    assert set(res["metrics"]) >= {
        "eval_fid_random_conv3d",
        "eval_ms_ssim_fake",
        "eval_ms_ssim_real",
        "eval_copy_fraction",
    }
    report = (out / "report.md").read_text()
    assert "3D FID (random_conv3d)" in report and "NOT comparable" in report and "sample_04.nii.gz" in report
    for name in ("intensity_histogram", "nn_ncc", "ms_ssim", "montage_synthetic", "montage_real"):
        img = Image.open(out / res["files"][name])
        assert img.size[0] > 100 and img.size[1] > 50, name
        assert f"({res['files'][name]})" in report


def test_a_sample_folder_is_read_as_its_manifest_lists_it(tmp_path):
    vols = [((v[0].numpy() + 1) / 2) for v in phantom_volumes(4, 16, seed=5)]
    paths = write(tmp_path / "samples", vols, "sample")
    listed = [{"nifti": p.name} for p in paths[:2]]  # the last run wrote two; two are an earlier run's leftovers
    (tmp_path / "samples" / "manifest.json").write_text(json.dumps({"samples": listed}))
    volumes, names, _ = load_volumes(tmp_path / "samples")
    assert names == ["sample_00.nii.gz", "sample_01.nii.gz"] and volumes.shape[0] == 2
    paths[1].unlink()  # a manifest naming a file that is not there: say so, do not read the others instead
    with pytest.raises(FileNotFoundError, match=r"manifest\.json lists 1 volume\(s\) that are not in .*sample_01"):
        load_volumes(tmp_path / "samples")


def test_shape_mismatch_names_the_file(folders, tmp_path, capsys):
    fake = tmp_path / "fake"
    write(fake, [np.zeros((16, 16, 16)), np.zeros((16, 16, 12))], "s")
    with pytest.raises(ValueError, match=r"s_01\.nii\.gz has shape \(16, 16, 12\)"):
        load_volumes(fake)
    assert main(["evaluate", "--real", str(folders / "real"), "--fake", str(fake), "--no-mlflow"]) == 2
    assert "s_01.nii.gz" in capsys.readouterr().err
    small = tmp_path / "small"
    write(small, [np.zeros((8, 8, 8))] * 2, "s")
    with pytest.raises(ValueError, match="same size"):
        evaluate(folders / "real", small, mlflow=False, progress=False)


def test_medicalnet_without_weights_says_which_file(folders, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--real",
                str(folders / "real"),
                "--fake",
                str(folders / "fake"),
                "--out",
                str(tmp_path),
                "--features",
                "medicalnet",
                "--no-mlflow",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "resnet_50_23dataset.pth" in err and "--weights" in err


def test_datalist_input_and_logging_to_the_generating_run(folders, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    write(data / "case", list(load_volumes(folders / "real")[0]), "t1n")
    entries = [{"case": f"c{i}", "t1n": f"case/t1n_{i:02d}.nii.gz"} for i in range(6)]
    (data / "datalist.json").write_text(
        json.dumps({"intensity_range": [0.0, 1.0], "training": entries[:4], "test": entries[4:]})
    )
    # an inference output inside a training output: output/{mlflow_run.json, samples/manifest.json}
    output = tmp_path / "output"
    samples = output / "samples"
    write(samples, load_volumes(folders / "fake")[0], "sample")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("wdm3d_test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    (output / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    (samples / "manifest.json").write_text(json.dumps({"mlflow_run_id": run_id, "intensity_range": [0.0, 1.0]}))
    assert find_run_info(samples) == {"run_id": run_id, "tracking_uri": uri}

    res = evaluate(data / "datalist.json", samples, pairs=4, progress=False)  # image key guessed: only t1n
    assert res["n_real"] == 4 and res["value_range_source"] == "manifest.json intensity_range" and res["mlflow_logged"]
    logged = client.get_run(run_id).data.metrics
    assert logged["eval_fid_random_conv3d"] == pytest.approx(res["fid"]["fid"])
    assert logged["eval_copy_fraction"] == pytest.approx(res["memorization"]["copy_fraction"])
    (folder,) = client.list_artifacts(run_id, "evaluation")
    assert {"report.md", "results.json", "nn_ncc.png"} <= {
        Path(a.path).name for a in client.list_artifacts(run_id, folder.path)
    }
    assert (samples / "evaluation" / "report.md").is_file()

    test_split = evaluate(data / "datalist.json", samples, split="test", image_key="t1n", mlflow=False, progress=False)
    assert test_split["n_real"] == 2

    # an unreachable server only warns
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.warns(RuntimeWarning, match="Could not log to MLflow"):
        res = evaluate(
            data / "datalist.json",
            samples,
            pairs=4,
            progress=False,
            tracking_uri="http://127.0.0.1:9",
            out_dir=tmp_path / "offline",
        )
    assert not res["mlflow_logged"] and (tmp_path / "offline" / "results.json").is_file()


TINY = {
    "image_size": [16, 16, 16],
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
}


def test_bundle_evaluate_step_after_train_and_inference(tmp_path):
    data = tmp_path / "data"
    entries = []
    for i, v in enumerate(phantom_volumes(6, 16, seed=3)):
        name = f"case{i}/case{i}-t1n.nii.gz"
        (data / f"case{i}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(((v[0].numpy() + 1) / 2).astype(np.float32), AFFINE), data / name)
        entries.append({"case": f"case{i}", "t1n": name})
    (data / "datalist.json").write_text(
        json.dumps({"intensity_range": [0.0, 1.0], "training": entries[:4], "test": entries[4:]})
    )
    out = tmp_path / "output"

    def workflow(config, run_id, workflow_type, **overrides):
        wf = ConfigWorkflow(
            config_file=str(CONFIGS / config),
            meta_file=str(CONFIGS / "metadata.json"),
            workflow_type=workflow_type,
            run_id=run_id,
            dataset_dir=str(data),
            output_dir=str(out),
            **overrides,
        )
        wf.initialize()
        return wf

    workflow(
        "train.json",
        "training",
        "train",
        max_epochs=1,
        mlflow=False,
        batch_size=2,
        num_workers=0,
        val_interval=5,
        save_interval=1,
        **TINY,
    ).run()
    workflow(
        "inference.json", "inference", "infer", num_samples=3, sampler="rflow", num_steps=2, mlflow=False, **TINY
    ).run()
    wf = workflow("evaluate.json", "evaluate", "infer", pairs=3, mlflow=False)
    assert wf.check_properties() == []
    wf.run()
    res = json.loads((out / "samples" / "evaluation" / "results.json").read_text())
    assert res["n_fake"] == 3 and res["n_real"] == 4 and res["value_range_source"] == "manifest.json intensity_range"
    assert res["fid"]["extractor"] == "random_conv3d" and np.isfinite(res["fid"]["fid"])
    assert (out / "samples" / "evaluation" / "report.md").is_file()
