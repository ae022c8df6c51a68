"""The ip_adapter_brats bundle (context-conditioned base, IP-Adapter on it, concat baseline) through MONAI's bundle
machinery on a tiny paired dataset, and the conditioning pieces it wires (CPU, seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from wdm3d.demo import phantom_volumes
from wdm3d.diffusion import DiffusionTarget, WaveletDiffusion, WaveletDiffusionInferer
from wdm3d.diffusion.conditioning import (
    ConditionalPrepareBatch,
    ContextConditionedUNet,
    expand_paired_datalist,
)
from wdm3d.engine import latest_checkpoint, load_checkpoint
from wdm3d.networks import ConditionDropout, IPAdapter, RandomConv3dFeatures, WDMUNet
from wdm3d.networks.ip_adapter import weights_fingerprint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "ip_adapter_brats" / "configs"
# a flipped, anisotropic, off-centre geometry; the references are 18 x 16 x 14 voxels (padded/cropped to 16^3 for the
# network), so the output must be put back on the reference's own grid
AFFINE = np.array([[-2.0, 0, 0, 90.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
VOCAB = {"modality": ["t1n", "t1c", "t2w", "t2f"], "dataset": ["brats"]}
TINY = {
    "image_size": [16, 16, 16],
    "network_def#unet#base_channels": 8,
    "network_def#unet#channel_mult": [1, 2],
    "network_def#unet#num_res_blocks": 1,
    "network_def#unet#norm_num_groups": 4,
    "context_dim": 16,
    "modalities": ["t1n", "t2w"],
    "mlflow": False,
}
TINY_TRAIN = {
    **TINY,
    "batch_size": 2,
    "num_workers": 0,
    "max_epochs": 1,
    "epoch_length": 2,
    "save_interval": 1,
    "val_interval": 1,
    "val_num_steps": 2,
    "ema_decay": 0.5,
}
ADAPTER = {"image_encoder_type": "random"}
SAMPLE = {"sampler": "ddim", "num_steps": 2, "max_cases": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four cases with a T1n-like phantom and a T2w-like contrast of it (same geometry), 18 x 16 x 14 voxels."""
    root = tmp_path_factory.mktemp("paired")
    entries = []
    for i, v in enumerate(phantom_volumes(4, 16, seed=5)):
        t1 = ((v[0].numpy() + 1) / 2).astype(np.float32)
        t1 = np.pad(t1, ((1, 1), (0, 0), (0, 0)))[:, :, 1:15]  # 18 x 16 x 14
        t2 = np.where(t1 > 0, 1.0 - t1, 0.0).astype(np.float32)
        (root / f"case{i}").mkdir()
        entry = {"case": f"case{i}"}
        for key, arr in (("t1n", t1), ("t2w", t2)):
            img = nib.Nifti1Image(arr, AFFINE)
            img.set_qform(AFFINE, code=1)
            img.set_sform(AFFINE, code=2)
            nib.save(img, root / f"case{i}" / f"case{i}-{key}.nii.gz")
            entry[key] = f"case{i}/case{i}-{key}.nii.gz"
        entries.append(entry)
    datalist = {"intensity_range": [0.0, 1.0], "training": entries[:2], "validation": entries[2:3], "test": entries[2:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def root_cause(err):
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


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """Train base (2 iterations), IP-Adapter on it (2) and concat baseline (2) into one output folder."""
    out = tmp_path_factory.mktemp("out")
    common = {"dataset_dir": str(dataset), "output_dir": str(out), **TINY_TRAIN}
    workflow(["train_base.json"], "training", **common).run()
    base_ckpt = latest_checkpoint(out / "models" / "base")
    base_bytes = base_ckpt.read_bytes()
    wf = workflow(["train.json"], "training", **common, **ADAPTER)
    wf.run()
    workflow(["train_base.json", "concat.json"], "training", **common).run()
    return {"out": out, "base_ckpt": base_ckpt, "base_bytes": base_bytes, "adapter_wf": wf}


def test_configs_parse_and_have_the_bundle_properties(dataset, tmp_path):
    for files in (["train_base.json"], ["train_base.json", "concat.json"]):
        wf = workflow(files, "training", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY_TRAIN)
        assert wf.check_properties() == []
    wf = workflow(
        ["inference.json"], "inference", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY, **ADAPTER
    )
    assert wf.check_properties() == []
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for name in ("train.json", "train_base.json", "inference.json"):
        assert "imports" in json.loads((CONFIGS / name).read_text())
    for name in ("concat.json", "demo.json"):  # overlays never define imports
        assert "imports" not in json.loads((CONFIGS / name).read_text())
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["learning_rate"] == 1e-4 and parser["weight_decay"] == 0.01
    assert [parser[k] for k in ("image_drop_rate", "context_drop_rate", "both_drop_rate")] == [0.05] * 3
    assert parser["image_encoder_type"] == "wfvae"


def test_adapter_training_keeps_the_base_and_saves_the_adapter_alone(trained, dataset):
    out = trained["out"]
    # the base's files are untouched and the frozen base in the adapter still holds the checkpoint's EMA weights
    assert trained["base_ckpt"].read_bytes() == trained["base_bytes"]
    ema = load_checkpoint(trained["base_ckpt"])["ema"]
    adapter = trained["adapter_wf"].parser.get_parsed_content("network")
    base_state = adapter.base.state_dict()
    assert set(base_state) == set(ema) and all(torch.equal(base_state[k].cpu(), ema[k]) for k in ema)
    assert not any(p.requires_grad for p in adapter.base.parameters())
    # the adapter trained: its K'/V' left their initial copies of the base's K/V
    name, proc = next(iter(adapter.ip_layers.items()))
    attn = adapter.base.get_submodule(name.replace(":", "."))
    assert not torch.equal(proc.to_k_ip.weight, attn.to_k.weight)

    saved = torch.load(out / "adapter" / "ip_adapter.pt", weights_only=True)
    assert set(saved) == {"image_proj", "ip_adapter", "meta"}
    assert saved["meta"]["image_encoder"] == weights_fingerprint(RandomConv3dFeatures(seed=0))
    assert all(k.endswith(("to_k_ip.weight", "to_v_ip.weight")) for k in saved["ip_adapter"])
    # it loads onto a freshly built base of the same architecture and reproduces the trained adapter's output
    fresh = ContextConditionedUNet(
        WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, context_dim=16), VOCAB
    )
    fresh.load_state_dict(ema)
    assert saved["meta"]["base"] == weights_fingerprint(fresh)  # the frozen base it was trained on
    loaded = IPAdapter(fresh, RandomConv3dFeatures(seed=0), projection="global+spatial")  # the bundle's default
    loaded.load_adapter(out / "adapter" / "ip_adapter.pt")
    x, ref = torch.randn(1, 8, 8, 8, 8), torch.rand(1, 1, 16, 16, 16) * 2 - 1
    ctx = fresh.indices({"modality": "t2w", "dataset": "brats"})
    adapter.eval()
    with torch.no_grad():
        assert torch.allclose(
            loaded(x, torch.tensor([50]), context=ctx, image=ref),
            adapter(x, torch.tensor([50]), context=ctx, image=ref),
            atol=1e-6,
        )
    # resumable checkpoints hold the adapter weights, not the frozen base again
    ckpt = load_checkpoint(latest_checkpoint(out / "models" / "ip_adapter"))
    assert "model" not in ckpt and set(ckpt["adapter"]) == {"image_proj", "ip_adapter"}
    assert ckpt["trainer"]["iteration"] == 2


def test_concat_baseline_trains_from_scratch_with_twice_the_input(trained):
    ckpt = load_checkpoint(latest_checkpoint(trained["out"] / "models" / "concat"))
    assert ckpt["model"]["unet.conv_in.weight"].shape[1] == 16 and ckpt["trainer"]["iteration"] == 2
    assert ckpt["run_config"]["settings"]["method"] == "concat"


@pytest.mark.parametrize("method", ["ip_adapter", "concat", "base"])
def test_synthesis_writes_the_target_on_the_reference_grid_with_metrics(trained, dataset, method):
    out = trained["out"]
    extra = {"method": method, **({"guidance_scale": 2.0} if method == "ip_adapter" else {})}
    files = ["inference.json", "concat.json"] if method == "concat" else ["inference.json"]
    wf = workflow(
        files, "inference", dataset_dir=str(dataset), output_dir=str(out), **TINY, **ADAPTER, **SAMPLE, **extra
    )
    wf.run()
    folder = out / "synthesis" / f"paired_{method}"
    for case in ("case2", "case3"):
        ref = nib.load(dataset / case / f"{case}-t1n.nii.gz")
        syn = nib.load(folder / f"{case}_t2w.nii.gz")
        assert syn.shape == ref.shape == (18, 16, 14)
        assert np.allclose(syn.affine, ref.affine) and int(syn.header["sform_code"]) == 2
        assert (folder / f"{case}_t2w.png").is_file()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ["case2", "case3"]
    assert metrics["summary"]["num_cases"] == 2 and {"psnr_mean", "ssim_mean", "mae_mean"} <= set(metrics["summary"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["failures"] == []


def test_a_failing_case_is_reported_and_the_rest_continue(trained, dataset, tmp_path):
    data = json.loads((dataset / "datalist.json").read_text())
    absolute = [{k: str(dataset / v) if k in ("t1n", "t2w") else v for k, v in e.items()} for e in data["test"]]
    data["test"] = [{"case": "broken", "t1n": str(tmp_path / "missing.nii.gz")}] + absolute
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        datalist=str(tmp_path / "datalist.json"),
        output_dir=str(trained["out"]),
        synthesis_dir=str(tmp_path / "syn"),
        **TINY,
        **ADAPTER,
        **{**SAMPLE, "max_cases": 3},
    )
    wf.run()
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert [f["case"] for f in manifest["failures"]] == ["broken"] and "missing.nii.gz" in manifest["failures"][0][
        "error"
    ]
    assert [c["case"] for c in manifest["cases"]] == ["case2", "case3"]


def test_reference_guided_generation_reports_similarity_per_lambda(trained, dataset):
    out = trained["out"]
    wf = workflow(
        ["inference.json"],
        "inference",
        dataset_dir=str(dataset),
        output_dir=str(out),
        mode="reference_guided",
        num_samples=2,
        ip_scales=[0.0, 1.0],
        **TINY,
        **ADAPTER,
        **SAMPLE,
    )
    wf.run()
    folder = out / "synthesis" / "reference_guided_ip_adapter"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"0", "1"}
    s = metrics["summary"]["1"]
    assert s["num_volumes"] == 4 and s["ssim_to_others"] is not None and s["ssim_between_samples"] is not None
    # lambda 0 is the base model: the same samples for every reference (same seeds)
    a = nib.load(folder / "case2" / "lambda_0" / "sample_00.nii.gz").get_fdata()
    b = nib.load(folder / "case3" / "lambda_0" / "sample_00.nii.gz").get_fdata()
    c = nib.load(folder / "case2" / "lambda_1" / "sample_00.nii.gz").get_fdata()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    from wdm3d.inference import batch_seed  # sample j's generator seed, recorded (runs with seeds 0 and 1 share none)

    assert {(r["sample"], r["seed"]) for r in metrics["samples"]} == {(j, batch_seed(0, j)) for j in range(2)}


def test_a_missing_base_checkpoint_says_so(dataset, tmp_path):
    wf = workflow(
        ["train.json"], "training", dataset_dir=str(dataset), output_dir=str(tmp_path), **TINY_TRAIN, **ADAPTER
    )
    with pytest.raises(Exception) as info:
        wf.run()
    err = root_cause(info.value)
    assert isinstance(err, FileNotFoundError)
    assert "base" in str(err) and "train_base.json" in str(err) and str(tmp_path / "models" / "base") in str(err)


def test_adapter_training_resumes_from_its_own_checkpoint(trained, dataset, tmp_path):
    import shutil

    shutil.copytree(trained["out"] / "models" / "base", tmp_path / "models" / "base")
    common = {"dataset_dir": str(dataset), "output_dir": str(tmp_path), **TINY_TRAIN, **ADAPTER}
    workflow(["train.json"], "training", **common).run()
    first = latest_checkpoint(tmp_path / "models" / "ip_adapter")
    saved = load_checkpoint(first)["adapter"]
    wf = workflow(["train.json"], "training", **{**common, "max_epochs": 2})
    checkpoints = wf.parser.get_parsed_content("train#checkpoints")
    wf.run()
    assert checkpoints.resumer.resumed_from == first
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "models" / "ip_adapter"))
    assert ckpt["trainer"]["iteration"] == 4
    changed = [k for k, v in saved["ip_adapter"].items() if not torch.equal(v, ckpt["adapter"]["ip_adapter"][k])]
    assert changed  # it went on training from the saved adapter


def test_the_trained_wfvae_is_the_default_image_encoder(tmp_path):
    from wdm3d.diffusion.conditioning import build_image_encoder
    from wdm3d.engine import RunConfig
    from wdm3d.networks import WFVAE3D

    vae = WFVAE3D(latent_channels=4, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1)
    torch.save(
        {"model": vae.state_dict(), "ema": vae.state_dict(), "run_config": RunConfig(network=vae).state_dict()},
        tmp_path / "checkpoint_epoch=1.pt",
    )
    encoder = build_image_encoder("wfvae", tmp_path)  # the folder: its newest checkpoint, rebuilt from run_config
    assert isinstance(encoder, WFVAE3D) and not any(p.requires_grad for p in encoder.parameters())
    base = ContextConditionedUNet(
        WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16), VOCAB
    )
    adapter = IPAdapter(base, encoder)
    ref = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    features = adapter.image_encoder(ref)
    assert torch.equal(features, encoder.encode(ref).mean) and features.shape == (1, 4, 4, 4, 4)
    assert adapter.encode_image(ref).shape == (1, 4, 16)


def test_a_missing_wfvae_encoder_says_so(tmp_path):
    from wdm3d.diffusion.conditioning import build_image_encoder

    with pytest.raises(FileNotFoundError, match="wfvae.*random"):
        build_image_encoder("wfvae", tmp_path / "nothing")
    with pytest.raises(ValueError, match="image_encoder_type"):
        build_image_encoder("clip")


def test_expansion_gives_one_sample_per_target_modality(dataset):
    datalist = dataset / "datalist.json"
    base = expand_paired_datalist(datalist, "training", ["t1n", "t2w", "t2f"])
    assert [(s["case"], s["modality"]) for s in base] == [
        ("case0", "t1n"),
        ("case0", "t2w"),
        ("case1", "t1n"),
        ("case1", "t2w"),
    ]
    assert all(Path(s["target"]).is_file() and "reference" not in s and s["dataset"] == "brats" for s in base)
    paired = expand_paired_datalist(datalist, "training", ["t1n", "t2w"], reference="t1n", self_pairs=False)
    assert [s["modality"] for s in paired] == ["t2w", "t2w"] and all(
        s["reference"].endswith("t1n.nii.gz") for s in paired
    )
    with pytest.raises(ValueError, match="t1c"):
        expand_paired_datalist(datalist, "training", ["t1c"])
    with pytest.raises(KeyError, match="'nope'"):
        expand_paired_datalist(datalist, "nope")
    with pytest.raises(ValueError, match="only target modality is the reference 't1n' and self_pairs is off"):
        expand_paired_datalist(datalist, "training", ["t1n"], reference="t1n", self_pairs=False)


@pytest.mark.parametrize("mode", ["ip_adapter", "context"])
def test_condition_dropout_rates_are_honoured_through_the_prepare_batch(mode):
    n = 4000
    diffusion = WaveletDiffusion()
    vols = torch.zeros(n, 1, 2, 2, 2)
    batch = {"target": vols, "reference": vols, "modality": ["t2w"] * n, "dataset": ["brats"] * n}
    prep = ConditionalPrepareBatch(diffusion, VOCAB, mode=mode, dropout=ConditionDropout(0.2, 0.1, 0.3))
    torch.manual_seed(0)
    x0, target, args, kw = prep(batch)
    null = torch.tensor([4, 1])
    dropped_ctx = (kw["context"] == null).all(1)
    assert ((kw["context"] == null).any(1) == dropped_ctx).all()  # a dropped context is null in every field
    assert (
        not (kw["context"][~dropped_ctx] == null).any() and (kw["context"][~dropped_ctx] == torch.tensor([2, 0])).all()
    )
    tol = 4 * (0.25 / n) ** 0.5
    assert abs(dropped_ctx.float().mean() - 0.4) < tol  # context-only 0.1 + both 0.3
    if mode == "ip_adapter":
        drop_image = kw["drop_image"]
        assert abs(drop_image.float().mean() - 0.5) < tol  # image-only 0.2 + both 0.3
        assert abs((drop_image & dropped_ctx).float().mean() - 0.3) < tol
        assert kw["image"] is vols
    else:
        assert "image" not in kw and "drop_image" not in kw
    assert x0.shape == (n, 8, 1, 1, 1) and args == () and set(kw) >= {"noise", "timesteps", "context"}


def test_conditional_prepare_batch_carries_the_loss_weights_of_the_process():
    # a weighted process (min-SNR here) must reach the loss with its per-sample weights, as unconditional training does
    vols = torch.rand(6, 1, 4, 4, 4)
    batch = {"target": vols, "reference": vols, "modality": ["t2w"] * 6, "dataset": ["brats"] * 6}
    weighted = WaveletDiffusion(loss_weighting="min_snr")
    torch.manual_seed(0)
    _, target, _, kw = ConditionalPrepareBatch(weighted, VOCAB, mode="context")(batch)
    assert isinstance(target, DiffusionTarget)
    assert torch.equal(target.weight, weighted.loss_weight(kw["timesteps"]))
    assert not torch.allclose(target.weight, torch.ones_like(target.weight))
    _, plain, _, _ = ConditionalPrepareBatch(WaveletDiffusion(), VOCAB, mode="context")(batch)
    assert isinstance(plain, torch.Tensor)


def test_inferer_zeroes_the_image_tokens_of_dropped_samples():
    torch.manual_seed(0)
    base = ContextConditionedUNet(
        WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16), VOCAB
    )
    for p in base.parameters():  # a trained-looking base (a fresh one outputs zeros)
        torch.nn.init.normal_(p, std=0.1)
    adapter = IPAdapter(base, RandomConv3dFeatures(seed=0))
    diffusion = WaveletDiffusion()
    inferer = WaveletDiffusionInferer(diffusion)
    x0, noise = torch.randn(2, 8, 8, 8, 8), torch.randn(2, 8, 8, 8, 8)
    t, ctx = torch.tensor([10, 600]), base.indices({"modality": ["t2w", "t1n"], "dataset": "brats"})
    ref = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        out = inferer(x0, adapter, noise, t, context=ctx, image=ref, drop_image=torch.tensor([True, False]))
        plain = base(diffusion.add_noise(x0, noise, t), t, context=ctx)
    assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])
    with pytest.raises(ValueError, match="IPAdapter"):
        inferer(x0, base, noise, t, context=ctx, image=ref)


def test_context_indices_out_of_range_are_refused_on_cpu():
    base = ContextConditionedUNet(
        WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16), VOCAB
    )
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        base(x, t, context=torch.tensor([[4, 1], [0, 0]]))  # the null index of each field is in range
        for bad in ([[5, 0], [0, 0]], [[0, 0], [-1, 0]], [[0, 2], [0, 0]]):
            with pytest.raises(ValueError, match=r"(modality|dataset) indices must be in \[0, [25]\)"):
                base(x, t, context=torch.tensor(bad))
        with pytest.raises(ValueError, match=r"\(B, 2\)"):
            base(x, t, context=torch.tensor([[0, 0, 0], [0, 0, 0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_context_embedding_on_the_gpu_does_not_synchronise():
    base = ContextConditionedUNet(
        WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16), VOCAB
    )
    base = base.cuda()
    idx = torch.tensor([[1, 0], [4, 1]], device="cuda")
    expected = base.tokens(idx.cpu())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = base.tokens(idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(tokens.cpu(), expected.cpu())
    # still checked, on the device (a failed device assert spoils the CUDA context: in a process of its own)
    code = (
        "import torch\n"
        "from wdm3d.diffusion.conditioning import ContextConditionedUNet\n"
        "from wdm3d.networks import WDMUNet\n"
        "unet = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16)\n"
        f"base = ContextConditionedUNet(unet, {VOCAB!r}).cuda()\n"
        "base.tokens(torch.tensor([[5, 0]], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "context indices must be in [0, n)" in proc.stderr or "device-side assert" in proc.stderr, proc.stderr[
        -2000:
    ]


# ----------------------------------------------------------------------------------------------------------------------
# the reference grid: outputs go back to the reference's voxels and header exactly
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 8, 7), (9, 6, 3), (10, 11, 4)])
def test_restore_grid_puts_every_voxel_back_in_its_place(shape):
    # odd differences too: the loading chain's pad puts the odd voxel last, its crop drops it first
    from monai.transforms import ResizeWithPadOrCrop

    from wdm3d.synthesis import restore_grid

    image_size = (8, 8, 6)
    original = torch.arange(1, 1 + np.prod(shape), dtype=torch.float32).reshape(1, *shape)
    model_grid = torch.as_tensor(
        ResizeWithPadOrCrop(spatial_size=image_size, mode="constant", constant_values=-1.0)(original)
    )
    back = restore_grid(model_grid, shape, fill=-1.0)
    assert back.shape == original.shape
    kept = back != -1.0
    assert torch.equal(back[kept], original[kept])  # no voxel moved
    assert int(kept.sum()) == np.prod([min(n, m) for n, m in zip(shape, image_size)])  # only cropped voxels lost


def test_reference_grid_carries_the_qform_and_sform_separately(tmp_path):
    from wdm3d.io import save_nifti
    from wdm3d.synthesis import reference_grid

    sform = np.array([[-2.0, 0.1, 0, 90.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
    qform = np.array([[-2.0, 0, 0, 91.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), None)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=0)
    nib.save(img, tmp_path / "ref.nii.gz")
    grid = reference_grid(tmp_path / "ref.nii.gz")
    assert grid.shape == (6, 5, 4) and grid.codes == (0, 2)
    out = nib.load(
        save_nifti(np.ones(grid.shape), grid.affine, tmp_path / "out.nii.gz", codes=grid.codes, qform=grid.qform)
    )
    ref = nib.load(tmp_path / "ref.nii.gz")
    for key in (
        "qform_code",
        "sform_code",
        "quatern_b",
        "quatern_c",
        "quatern_d",
        "qoffset_x",
        "srow_x",
        "srow_y",
        "srow_z",
    ):
        np.testing.assert_allclose(out.header[key], ref.header[key], err_msg=key)
