"""The autoencoder bundles (wfvae, wavelet_vae) and latent wavelet diffusion, run through MONAI's bundle machinery
on a tiny dataset (CPU): train (VAE-GAN), reconstruct with metrics, encode to latents, train WDM on the latents and
sample volumes back through the exact chunked decoder."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from wdm3d.autoencoder import latent_affine
from wdm3d.demo import phantom_volumes
from wdm3d.engine import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
AFFINE = np.array([[-2.0, 0, 0, 90.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
SIZE = [32, 32, 32]
TINY_WF = {
    "network_def#base_channels": 8,
    "network_def#num_res_blocks": 1,
    "network_def#num_mid_blocks": 1,
    "latent_channels": 4,
}
TINY_WAVELET = {
    "network_def#base_channels": 8,
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
    "network_def#refine_channels": 4,
    "latent_channels": 4,
}
TRAIN = {
    "image_size": SIZE,
    "mlflow": False,
    "batch_size": 2,
    "num_workers": 0,
    "val_interval": 1,
    "save_interval": 1,
    "ema_decay": 0.5,
    "discriminator_start": 1,
    "learning_rate": 1e-3,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    entries = []
    for i, v in enumerate(phantom_volumes(5, 32, seed=4)):
        name = f"case{i}/case{i}-t1n.nii.gz"
        (root / f"case{i}").mkdir()
        nib.save(nib.Nifti1Image(((v[0].numpy() + 1) / 2).astype(np.float32), AFFINE), root / name)
        entries.append({"case": f"case{i}", "t1n": name})
    datalist = {"intensity_range": [0.0, 1.0], "training": entries[:3], "validation": entries[3:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def workflow(bundle, files, run_id, **overrides):
    configs = BUNDLES / bundle / "configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / f) for f in files],
        meta_file=str(configs / "metadata.json"),
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        **overrides,
    )
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def trained_wfvae(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("wfvae")
    wf = workflow(
        "wfvae",
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(out),
        max_epochs=1,
        **TRAIN,
        **TINY_WF,
    )
    disc_before = {k: v.clone() for k, v in wf.parser.get_parsed_content("discriminator").state_dict().items()}
    wf.run()
    return out, wf, disc_before


def test_wfvae_trains_as_a_vae_gan_and_checkpoints_every_part(trained_wfvae):
    out, wf, disc_before = trained_wfvae
    ckpt = load_checkpoint(latest_checkpoint(out / "models"))
    assert {"model", "ema", "optimizer", "discriminator", "d_optimizer", "trainer", "run_config"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 1  # 3 training cases, batch 2, drop_last
    assert ckpt["run_config"]["network"]["class"].endswith("WFVAE3D")
    # discriminator_start=1: the only iteration (1) is not after it, so the discriminator has not moved yet
    disc = wf.parser.get_parsed_content("discriminator").state_dict()
    assert all(torch.equal(disc[k], disc_before[k]) for k in disc_before)
    history = json.loads((out / "validation" / "history.json").read_text())
    assert history[-1]["num_cases"] == 2 and np.isfinite(history[-1]["psnr_mean"])
    assert (out / "validation" / history[-1]["file"]).is_file()


def test_gan_starts_after_discriminator_start_and_its_terms_are_logged(dataset, tmp_path):
    wf = workflow(
        "wfvae",
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        max_epochs=2,
        **{**TRAIN, "mlflow": True, "log_every": 1},
        **TINY_WF,
    )
    disc = wf.parser.get_parsed_content("discriminator")
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    wf.run()
    assert any(not torch.equal(v, before[k]) for k, v in disc.state_dict().items())  # iteration 2 trained it
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    it1 = next(r for r in rows if r["step"] == 1 and "loss" in r)
    it2 = next(r for r in rows if r["step"] == 2 and "loss" in r)
    for key in ("loss_recon", "loss_wavelet", "loss_kl"):
        assert key in it1 and np.isfinite(it1[key])
    assert "loss_adv_g" not in it1 and "loss_adv_d" not in it1
    assert it2["loss_adv_g"] > 0 and it2["loss_adaptive_weight"] > 0 and np.isfinite(it2["loss_adv_d"])
    assert any("val_psnr" in r for r in rows)


def test_a_discriminator_too_deep_for_the_volume_fails_at_the_first_step_not_when_the_gan_starts(dataset, tmp_path):
    wf = workflow(
        "wfvae",
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        max_epochs=1,
        **{**TRAIN, "discriminator_start": 5000, "num_layers_d": 4},
        **TINY_WF,
    )
    with pytest.raises(Exception) as err:  # 4 strided layers need 48 voxels per axis; the data are 32^3
        wf.run()
    cause = err.value
    while cause.__cause__ is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    assert "cannot take volumes of (32, 32, 32) with num_layers_d=4" in str(cause)
    assert not list((tmp_path / "models").glob("*.pt"))  # stopped at iteration 1


def test_reconstruct_reports_metrics_and_writes_volumes_with_the_data_geometry(dataset, trained_wfvae, tmp_path):
    out, _, _ = trained_wfvae
    wf = workflow(
        "wfvae",
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(out),
        reconstruction_dir=str(tmp_path),
        image_size=SIZE,
        chunk=8,
        latent_chunk=1,
        **TINY_WF,
    )
    wf.run()
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert [c["case"] for c in result["cases"]] == ["case3", "case4"] and result["failures"] == []
    assert np.isfinite(result["summary"]["psnr_mean"]) and -1 <= result["summary"]["ssim_mean"] <= 1
    img = nib.load(str(tmp_path / result["cases"][0]["nifti"]))
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.shape == tuple(SIZE)
    assert (tmp_path / "metrics.csv").read_text().startswith("case,")


def test_a_bad_case_is_reported_and_the_rest_reconstructed(dataset, trained_wfvae, tmp_path):
    out, _, _ = trained_wfvae
    data = json.loads((dataset / "datalist.json").read_text())
    bad = tmp_path / "broken-t1n.nii.gz"
    bad.write_bytes(b"not a nifti")
    for e in data["validation"]:
        e["t1n"] = str(dataset / e["t1n"])
    missing = str(tmp_path / "missing-t1n.nii.gz")
    data["validation"] = [{"case": "broken", "t1n": str(bad)}, {"case": "missing", "t1n": missing}] + data["validation"]
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    wf = workflow(
        "wfvae",
        ["inference.json"],
        "inference",
        datalist=str(tmp_path / "datalist.json"),
        output_dir=str(out),
        reconstruction_dir=str(tmp_path / "rec"),
        image_size=SIZE,
        **TINY_WF,
    )
    wf.run()
    result = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert [f["case"] for f in result["failures"]] == ["broken", "missing"]
    assert "broken-t1n" in result["failures"][0]["error"] and "missing-t1n" in result["failures"][1]["error"]
    assert len(result["cases"]) == 2
    assert bad.read_bytes() == b"not a nifti"  # source data untouched


@pytest.fixture(scope="module")
def latents(dataset, trained_wfvae, tmp_path_factory):
    out, _, _ = trained_wfvae
    lat = tmp_path_factory.mktemp("latents")
    wf = workflow(
        "wfvae",
        ["inference.json", "encode.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(out),
        latents_dir=str(lat),
        image_size=SIZE,
        chunk=8,
        **TINY_WF,
    )
    wf.run()
    return lat


def test_encode_writes_latents_with_scaled_geometry_and_normalisation(latents):
    data = json.loads((latents / "datalist_latents.json").read_text())
    assert len(data["training"]) == 3 and len(data["validation"]) == 2
    assert data["latent_channels"] == 4 and data["downsample_factor"] == 4 and data["latent_size"] == [8, 8, 8]
    img = nib.load(str(latents / data["training"][0]["latent"]))
    assert img.shape == (8, 8, 8, 4)
    np.testing.assert_allclose(img.affine, latent_affine(AFFINE, 4))
    z = np.stack([np.asarray(nib.load(str(latents / e["latent"])).dataobj) for e in data["training"]])
    np.testing.assert_allclose(data["latent_shift"], z.reshape(-1, 4).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data["latent_scale"], 1 / z.reshape(-1, 4).std(0), rtol=1e-3)


def test_latent_wavelet_diffusion_trains_and_samples_volumes_with_the_image_geometry(latents, tmp_path):
    tiny_unet = {
        "network_def#base_channels": 8,
        "network_def#channel_mult": [1, 2],
        "network_def#num_res_blocks": 1,
        "network_def#norm_num_groups": 4,
    }
    latent_datalist = str(latents / "datalist_latents.json")
    wf = workflow(
        "wdm3d_brats",
        ["train.json", "latent.json"],
        "training",
        latent_datalist=latent_datalist,
        output_dir=str(tmp_path),
        max_epochs=1,
        mlflow=False,
        batch_size=2,
        num_workers=0,
        val_interval=1,
        val_num_steps=2,
        save_interval=1,
        latent_chunk=2,
        **tiny_unet,
    )
    wf.run()
    assert (tmp_path / "validation" / "epoch_0001.png").is_file()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert ckpt["run_config"]["settings"]["num_channels"] == 4
    # the latent overlays keep the process they were built and tested with (DDPM on one level), whatever the
    # image-space default is
    trained = ckpt["run_config"]["diffusion"]
    assert (trained["process"], trained["levels"], trained["loss_weighting"]) == ("ddpm", 1, "none")
    samples = tmp_path / "samples"
    wf = workflow(
        "wdm3d_brats",
        ["inference.json", "latent_inference.json"],
        "inference",
        latent_datalist=latent_datalist,
        output_dir=str(tmp_path),
        samples_dir=str(samples),
        num_samples=1,
        num_steps=2,
        mlflow=False,
        autocast=None,
        latent_chunk=2,
        **tiny_unet,
    )
    wf.run()
    img = nib.load(str(samples / "sample_0000.nii.gz"))
    assert img.shape == tuple(SIZE)
    np.testing.assert_allclose(img.affine, AFFINE)
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["latent"]["shape"] == [4, 8, 8, 8] and manifest["latent"]["chunk"] == 2
    assert manifest["clip_projection"] is False


def test_wavelet_vae_bundle_trains_and_reconstructs(dataset, tmp_path):
    wf = workflow(
        "wavelet_vae",
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        max_epochs=2,
        **{**TRAIN, "mlflow": True, "log_every": 1},
        **TINY_WAVELET,
    )
    wf.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss_sparsity", 0) > 0 for r in rows)  # the sparsity prior is on (prior "both")
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models"))
    assert ckpt["run_config"]["network"]["class"].endswith("WaveletVAE3D")
    wf = workflow(
        "wavelet_vae",
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        reconstruction_dir=str(tmp_path / "rec"),
        image_size=SIZE,
        **TINY_WAVELET,
    )
    wf.run()
    assert json.loads((tmp_path / "rec" / "metrics.json").read_text())["summary"]["num_cases"] == 2


def test_the_two_vae_bundles_differ_only_where_the_models_do():
    a = json.loads((BUNDLES / "wfvae" / "configs" / "train.json").read_text())
    b = json.loads((BUNDLES / "wavelet_vae" / "configs" / "train.json").read_text())

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items() if isinstance(d, dict) else enumerate(d):
            key = f"{prefix}#{k}" if prefix else str(k)
            out.update(flat(v, key) if isinstance(v, (dict, list)) and v else {key: v})
        return out

    fa, fb = flat(a), flat(b)
    differ = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}
    allowed = {"bundle_root", "experiment_name", "gradient_checkpointing", "prior", "sparsity_weight"}
    assert {
        k
        for k in differ
        if not (
            k in allowed or k.startswith(("network_def", "loss#extra_weights", "train#tracker#params", "run_config"))
        )
    } == set()


# ----------------------------------------------------------------------------------------------------------------------
# wdm3d.autoencoder: what a checkpoint may build, and what an encode folder may reuse
# ----------------------------------------------------------------------------------------------------------------------


def _tiny_autoencoder(latent_channels):
    from wdm3d.networks import WFVAE3D

    torch.manual_seed(latent_channels)
    return WFVAE3D(
        in_channels=1, latent_channels=latent_channels, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1
    )


def test_build_network_only_builds_network_classes(tmp_path):
    from wdm3d.autoencoder import build_network

    target = tmp_path / "written_by_the_checkpoint.pt"
    crafted = tmp_path / "crafted.pt"
    # a function under an allowed module path: calling it with the checkpoint's arguments would write a file
    torch.save(
        {"run_config": {"network": {"class": "monai.networks.utils.save_state", "src": {}, "path": str(target)}}},
        crafted,
    )
    with pytest.raises(
        ValueError, match=r"crafted\.pt names 'monai\.networks\.utils\.save_state', which is not a network class"
    ):
        build_network(crafted)
    assert not target.exists()
    torch.save({"run_config": {"network": {"class": "wdm3d.networks.NoSuchNet"}}}, crafted)
    with pytest.raises(
        ValueError, match=r"crafted\.pt names network class 'wdm3d\.networks\.NoSuchNet', which does not exist"
    ):
        build_network(crafted)
    torch.save(
        {
            "run_config": {
                "network": {"class": "wdm3d.networks.WFVAE3D", "in_channels": 1, "latent_channels": 4, "levels": 0}
            }
        },
        crafted,
    )
    with pytest.raises(ValueError, match=r"Cannot rebuild wdm3d\.networks\.WFVAE3D from the settings in .*crafted\.pt"):
        build_network(crafted)


def _encode(network, ckpt, datalist, out, **kw):
    from wdm3d.autoencoder import encode_dataset

    return json.loads(encode_dataset(network, ckpt, datalist, "t1n", out, SIZE, device="cpu", **kw).read_text())


def test_encode_reuses_latents_only_from_the_same_checkpoint(dataset, tmp_path):
    net = _tiny_autoencoder(1)  # one latent channel: save_nifti writes it as a 3D volume
    ckpt_a, ckpt_b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"model": net.state_dict()}, ckpt_a)
    torch.save({"model": {k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}}, ckpt_b)
    out = tmp_path / "latents"
    first = _encode(net, ckpt_a, dataset / "datalist.json", out)
    files = sorted((out / "latents").glob("*_latent.nii.gz"))
    assert len(files) == 5 and nib.load(str(files[0])).ndim == 3
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = _encode(net, ckpt_a, dataset / "datalist.json", out)  # reuses the files, reads them back right
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert again["latent_shift"] == pytest.approx(first["latent_shift"], rel=1e-6)
    assert again["latent_scale"] == pytest.approx(first["latent_scale"], rel=1e-6)
    # another checkpoint must not adopt these latents under its own checksum
    with pytest.raises(ValueError, match=r"encoded differently \(sha256: "):
        _encode(net, ckpt_b, dataset / "datalist.json", out)
    with pytest.raises(ValueError, match=r"image_size: \[32, 32, 32\] there, \[16, 16, 16\] now"):
        from wdm3d.autoencoder import encode_dataset

        encode_dataset(net, ckpt_a, dataset / "datalist.json", "t1n", out, [16, 16, 16], device="cpu")
    redone = _encode(net, ckpt_b, dataset / "datalist.json", out, overwrite=True)
    assert redone["autoencoder"]["sha256"] != first["autoencoder"]["sha256"]
    assert redone["latent_shift"] != pytest.approx(first["latent_shift"], rel=1e-6)
    # latents of unknown origin (no stamp) are not adopted either
    stray = tmp_path / "stray"
    (stray / "latents").mkdir(parents=True)
    (stray / "latents" / "case0_latent.nii.gz").write_bytes(files[0].read_bytes())
    with pytest.raises(ValueError, match=r"stray/latents holds latents of unknown origin"):
        _encode(net, ckpt_a, dataset / "datalist.json", stray)


def test_cases_that_would_share_an_output_file_are_refused(dataset, tmp_path):
    from wdm3d.autoencoder import reconstruct_dataset

    for p in ("p0", "p1"):  # same file name in two folders and no 'case' key
        (tmp_path / p).mkdir()
        (tmp_path / p / "t1n.nii.gz").write_bytes((dataset / "case0" / "case0-t1n.nii.gz").read_bytes())
    datalist = tmp_path / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [{"t1n": "p0/t1n.nii.gz"}, {"t1n": "p1/t1n.nii.gz"}],
                "validation": [{"t1n": "p0/t1n.nii.gz"}, {"t1n": "p1/t1n.nii.gz"}],
            }
        )
    )
    net = _tiny_autoencoder(4)
    torch.save({"model": net.state_dict()}, tmp_path / "a.pt")
    pattern = r"p0/t1n\.nii\.gz and .*p1/t1n\.nii\.gz would both be written as case 't1n'"
    with pytest.raises(ValueError, match=pattern):
        _encode(net, tmp_path / "a.pt", datalist, tmp_path / "latents")
    with pytest.raises(ValueError, match=pattern):
        reconstruct_dataset(net, tmp_path / "a.pt", datalist, "t1n", tmp_path / "recon", SIZE, device="cpu")
    assert not (tmp_path / "latents" / "latents").exists() and not (tmp_path / "recon").exists()
