"""The performance switches (fused GPU Haar, channels_last_3d, gradient checkpointing, bf16 autocast, compile) fall
back or run on CPU and give the plain path's results; the benchmark scripts run in their tiny CPU mode.

The GPU side of each switch is measured by benchmarks/ (results in BENCHMARKS.md); the CUDA-only tests at the end
run only where a GPU is present.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from wdm3d import wavelets as wv
from wdm3d.diffusion import WaveletDiffusion, WaveletDiffusionPrepareBatch, WaveletMSELoss
from wdm3d.networks import WDMUNet, wdm_unet
from wdm3d.wavelets import dwt3d, fused_haar_available, idwt3d, set_fused_haar
from wdm3d.wavelets import fused as wv_fused

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def tiny_net(**kw) -> WDMUNet:
    args = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    args.update(kw)
    torch.manual_seed(0)
    net = WDMUNet(**args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh WDMUNet outputs zeros (zero-initialised convs): make every path do real work
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def grads(net) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.fixture
def fused_state():
    """Restore the fused-Haar switches after a test that changes them."""
    saved = dict(wv._fused_haar)
    yield wv._fused_haar
    wv._fused_haar.clear()
    wv._fused_haar.update(saved)


@pytest.fixture
def pretend_cuda(monkeypatch, fused_state):
    """Route CPU tensors as if they were on a GPU with Triton: the selection logic runs for real."""
    monkeypatch.setattr(wv_fused, "_on_cuda", lambda device: True)
    monkeypatch.setattr(wv_fused, "_triton_importable", lambda: True)
    fused_state.update(enabled=True, failed=None)
    return fused_state


# ----------------------------------------------------------------------------------------------------------------------
# fused GPU Haar: selection and fallback
# ----------------------------------------------------------------------------------------------------------------------


def test_fused_haar_is_not_selected_on_cpu(monkeypatch):
    x = torch.randn(1, 2, 4, 4, 4)
    assert not fused_haar_available(x)
    assert not fused_haar_available("cpu") and not fused_haar_available(torch.device("meta"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fused kernel was launched for a CPU tensor")

    monkeypatch.setattr(wv_fused, "_fused_haar_launch", must_not_run)
    y = dwt3d(x)
    assert torch.equal(y, wv._haar_forward_kernel(x))
    assert torch.equal(idwt3d(y), wv._haar_inverse_kernel(y))


def test_fused_haar_routes_forward_inverse_and_gradients(pretend_cuda, monkeypatch):
    calls = []

    def spy(t, inverse, kernel=None):
        calls.append(inverse)
        return wv._haar_inverse_kernel(t) if inverse else wv._haar_forward_kernel(t)

    monkeypatch.setattr(wv_fused, "_fused_haar_launch", spy)
    x = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    y = dwt3d(x)
    assert calls == [False]
    y.sum().backward()  # gradient of the DWT = IDWT of the upstream gradient, through the same selector
    assert calls == [False, True]
    idwt3d(y.detach())
    assert calls == [False, True, True]
    # float64 is not a fused dtype: the torch path, even "on a GPU"
    dwt3d(torch.randn(1, 1, 2, 2, 2, dtype=torch.float64))
    assert calls == [False, True, True]
    # switched off: the torch path
    assert set_fused_haar(False) is True
    dwt3d(x.detach())
    assert calls == [False, True, True] and not fused_haar_available(x)
    assert set_fused_haar(True) is False
    with pytest.raises(TypeError, match="True or False"):
        set_fused_haar("yes")


def test_fused_haar_failure_warns_once_and_falls_back(pretend_cuda, monkeypatch):
    launches = []

    def broken(t, inverse, kernel=None):
        launches.append(inverse)
        raise RuntimeError("PTX assembly failed (simulated)")

    monkeypatch.setattr(wv_fused, "_fused_haar_launch", broken)
    x = torch.randn(2, 3, 4, 6, 8)
    assert fused_haar_available(x)
    with pytest.warns(RuntimeWarning, match="falling back to the torch implementation"):
        y = dwt3d(x)
    assert torch.equal(y, wv._haar_forward_kernel(x))
    assert "PTX assembly failed" in pretend_cuda["failed"]
    assert not fused_haar_available(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        r = idwt3d(y)
    assert launches == [False]
    assert (r - x).abs().max().item() <= 1e-5


def test_fused_haar_environment_switch():
    code = "from wdm3d import wavelets as wv; print(wv._fused_haar['enabled'])"
    for value, expected in (("0", "False"), ("off", "False"), ("1", "True")):
        env = {**os.environ, "WDM3D_FUSED_HAAR": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected


def test_fused_kernel_in_triton_interpreter_matches_torch_path(monkeypatch, fused_state):
    # Triton's interpreter runs the real kernel on CPU tensors (numpy), where Triton is installed (not in CI)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        kernel = wv._build_triton_kernel()
    except Exception as err:  # pragma: no cover - depends on the Triton version
        pytest.skip(f"this Triton has no interpreter: {err}")
    saved = wv._FUSED_CONFIG["split"]
    try:
        for split in (True, False):
            wv._FUSED_CONFIG["split"] = split
            for shape in [(2, 3, 4, 6, 10), (1, 1, 2, 2, 2)]:
                x = torch.randn(shape)
                y = wv._fused_haar_launch(x, False, kernel=kernel)
                assert torch.allclose(y, wv._haar_forward_kernel(x), atol=1e-6)
                assert torch.allclose(
                    wv._fused_haar_launch(y, True, kernel=kernel), wv._haar_inverse_kernel(y), atol=1e-6
                )
                # half types: computed in float32, rounded once (the interpreter truncates, a GPU rounds to
                # nearest): within one bf16 unit in the last place of the float32 result
                xb = x.bfloat16()
                ref = wv._haar_forward_kernel(xb.float())
                yb = wv._fused_haar_launch(xb, False, kernel=kernel)
                assert yb.dtype == torch.bfloat16
                assert ((yb.float() - ref).abs() <= ref.abs() * 2**-7).all()
    finally:
        wv._FUSED_CONFIG["split"] = saved


# ----------------------------------------------------------------------------------------------------------------------
# channels_last_3d, gradient checkpointing, bf16 autocast
# ----------------------------------------------------------------------------------------------------------------------


def test_channels_last_3d_gives_the_contiguous_result():
    net = tiny_net().train()
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    assert net_cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not net.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 8, 8, 8, 8)
    t = torch.tensor([3, 700])
    out, out_cl = net(x, t), net_cl(x, t)
    assert out.abs().max() > 0.1
    assert torch.allclose(out, out_cl, rtol=1e-4, atol=1e-5)
    out.pow(2).mean().backward()
    out_cl.pow(2).mean().backward()
    assert torch.allclose(grads(net), grads(net_cl), rtol=1e-3, atol=1e-6)


def test_checkpointing_from_preset_recomputes_and_gives_the_plain_gradients():
    small = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4)
    plain = tiny_net(**small)
    ckpt = wdm_unet("wdm_128", use_checkpoint=True, **small)  # the switch as a bundle config passes it
    ckpt.load_state_dict(plain.state_dict())
    runs = []
    ckpt.middle[0].register_forward_pre_hook(lambda *a: runs.append(1))  # a recomputation may stop early
    x = torch.randn(2, 8, 8, 8, 8)
    t = torch.tensor([5, 500])
    plain(x, t).pow(2).mean().backward()
    ckpt.train()(x, t).pow(2).mean().backward()
    assert len(runs) == 2  # forward, then recomputed in the backward pass
    assert torch.allclose(grads(plain), grads(ckpt), rtol=1e-4, atol=1e-7)
    runs.clear()
    with torch.no_grad():
        ckpt.eval()(x, t)
    assert len(runs) == 1  # no recomputation outside training


def test_bf16_autocast_on_cpu_runs_and_is_close():
    net = tiny_net().eval()
    x = torch.randn(2, 8, 8, 8, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t)
    assert low.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05
    # the loss is computed in float32 whatever the prediction's dtype
    assert WaveletMSELoss()(low, ref.bfloat16()).dtype == torch.float32


def test_fp32_io_keeps_the_wavelet_convolutions_in_fp32_under_autocast():
    net, io = tiny_net().eval(), tiny_net(fp32_io=True).eval()  # the same random weights
    dtypes = {}
    for name in ("conv_in", "conv_out", "down.0"):
        io.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: dtypes.__setitem__(name, o.dtype))
    x = torch.randn(2, 8, 8, 8, 8)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(io(x, t), net(x, t))  # without autocast the switch changes nothing
        assert dtypes == {"conv_in": torch.float32, "conv_out": torch.float32, "down.0": torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, low = io(x, t), net(x, t)
    # under autocast: the two 8-channel convolutions in fp32, the rest of the network still bf16 (conv_in's fp32
    # output, left as it is, would promote the whole full-resolution level, its residual stream and skips, to fp32)
    assert dtypes["conv_in"] == dtypes["conv_out"] == torch.float32 and mixed.dtype == torch.float32
    assert dtypes["down.0"] == torch.bfloat16
    assert low.dtype == torch.bfloat16
    ref = net(x, t).detach()
    assert ((mixed - ref).norm() / ref.norm()).item() < 0.05
    # and it trains: gradients reach conv_in through the fp32 island
    with torch.autocast("cpu", dtype=torch.bfloat16):
        io.train()(x, t).float().pow(2).mean().backward()
    assert io.conv_in.weight.grad is not None and io.conv_in.weight.grad.abs().sum() > 0
    assert io.conv_in.weight.grad.dtype == torch.float32
    # a model cast to bf16 has no fp32 weights to keep: the switch steps aside (it raised a dtype mismatch). (The
    # whole bf16 model cannot run under CPU autocast, GroupNorm refuses bf16 parameters there: the layer alone.)
    half = tiny_net(fp32_io=True).bfloat16().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert half._io(half.conv_in, x.bfloat16(), back_to_autocast=True).dtype == torch.bfloat16


def test_supervised_trainer_amp_and_compile_switches_with_our_prepare_batch():
    # the bundle switches: SupervisedTrainer(amp=True, amp_kwargs={"dtype": torch.bfloat16}, compile=True).
    # MONAI 1.6.1 converts MetaTensor inputs to plain tensors for compile; our prepare_batch already returns plain
    # tensors. On CPU MONAI disables its CUDA autocast and GradScaler (with a warning), so the run must equal the
    # plain one; on a GPU the bf16 run must stay close to it.
    from ignite.engine import Events
    from monai.data import Dataset, MetaTensor, list_data_collate
    from monai.engines import SupervisedTrainer
    from monai.inferers import DiffusionInferer
    from monai.utils import set_determinism
    from torch.utils.data import DataLoader

    device = torch.device("cuda" if CUDA else "cpu")

    def train(**switches):
        set_determinism(0)
        diffusion = WaveletDiffusion()
        data = [{"image": MetaTensor(torch.rand(1, 8, 8, 8) * 2 - 1)} for _ in range(4)]
        loader = DataLoader(Dataset(data), batch_size=2, collate_fn=list_data_collate)
        net = tiny_net().to(device)
        losses = []
        trainer = SupervisedTrainer(
            device=device,
            max_epochs=1,
            train_data_loader=loader,
            network=net,
            optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
            loss_function=WaveletMSELoss(),
            inferer=DiffusionInferer(diffusion.scheduler),
            prepare_batch=WaveletDiffusionPrepareBatch(diffusion),
            decollate=False,
            **switches,
        )
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: losses.append((e.state.output["loss"].item(), type(e.state.output["pred"]))),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.run()
        set_determinism(None)
        return losses, net

    plain, net_plain = train()
    switched, net_switched = train(
        amp=True, amp_kwargs={"dtype": torch.bfloat16}, compile=True, compile_kwargs={"backend": "aot_eager"}
    )
    rel, atol = (5e-2, 5e-3) if CUDA else (1e-4, 1e-6)
    assert len(plain) == len(switched) == 2
    for (a, _), (b, pred_type) in zip(plain, switched):
        assert b == pytest.approx(a, rel=rel)
        assert pred_type is torch.Tensor
    for p, q in zip(net_plain.parameters(), net_switched.parameters()):
        assert torch.allclose(p, q, rtol=rel, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# the benchmark scripts, tiny CPU mode
# ----------------------------------------------------------------------------------------------------------------------


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_tiny_cpu(tmp_path):
    bench = _load_benchmark("train_step")
    out = tmp_path / "train.json"
    results = bench.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--presets",
            "wdm_256",
            "--steps",
            "1",
            "--json",
            str(out),
            "--variants",
            "baseline",
            "channels_last",
            "checkpointing + compile",
            "--markdown",
            str(tmp_path / "train.md"),
        ]
    )
    names = [r.variant for r in results]
    assert names == ["fp32 (PyTorch defaults) [baseline]", "bf16 + channels_last_3d", "bf16 + checkpointing + compile"]
    assert all(r.status == "ok" and r.volumes_per_s > 0 for r in results), [r.status for r in results]
    assert results[0].vs_baseline == 1.0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(results) and "| bf16 + channels_last_3d |" in (tmp_path / "train.md").read_text()


def test_sampling_benchmark_tiny_cpu(tmp_path):
    bench = _load_benchmark("sampling")
    results = bench.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--precisions",
            "fp32",
            "bf16",
            "--max-timed-steps",
            "1",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert [(r.sampler, r.precision) for r in results] == [
        (s, p) for p in ("fp32", "bf16") for s in ("ddpm", "ddim", "rflow")
    ]
    assert all(r.status == "ok" and r.s_per_step > 0 for r in results), [r.status for r in results]
    ddpm = results[0]
    assert ddpm.extrapolated and ddpm.s_per_volume == pytest.approx(ddpm.s_per_step * 1000)
    # a shortcut model's jumps: the network takes the interval, one evaluation per jump
    flow = bench.main(["--device", "cpu", "--tiny", "--precisions", "bf16", "--flow-map-steps", "1", "2"])
    assert [(r.sampler, r.steps) for r in flow][-2:] == [("shortcut", 1), ("shortcut", 2)]
    assert all(r.status == "ok" for r in flow), [r.status for r in flow]
    assert flow[-1].timed_steps == 2 and not flow[-1].extrapolated


def test_sampler_quality_verdicts():
    bench = _load_benchmark("sampler_quality")
    ref = {"fid": 10.0, "ms_ssim": 0.5, "wasserstein": 0.02, "mmd_features": 0.4, "mmd_voxels": 0.1}
    # distances: better (lower) always passes, up to 10% worse passes, more does not
    assert bench.compare({**ref, "fid": 5.0}, ref, 0.10)["fid"]["within"]
    assert bench.compare({**ref, "fid": 10.9}, ref, 0.10)["all_within"]
    worse = bench.compare({**ref, "fid": 11.2}, ref, 0.10)
    assert not worse["fid"]["within"] and not worse["all_within"] and worse["fid"]["ratio"] == pytest.approx(1.12)
    # MS-SSIM is a diversity level, not a distance: 10% either way
    assert not bench.compare({**ref, "ms_ssim": 0.44}, ref, 0.10)["ms_ssim"]["within"]
    assert not bench.compare({**ref, "ms_ssim": 0.56}, ref, 0.10)["ms_ssim"]["within"]
    assert bench.compare({**ref, "ms_ssim": 0.54}, ref, 0.10)["ms_ssim"]["within"]


def test_sampler_quality_benchmark_tiny_cpu(tmp_path):
    # the whole chain on the demo data: bundle training, the samplers, wdm3d.evaluate against the real set
    bench = _load_benchmark("sampler_quality")
    result = bench.main(
        [
            str(tmp_path),
            "--num-cases",
            "4",
            "--iterations",
            "2",
            "--num-samples",
            "2",
            "--sample-batch",
            "2",
            "--ddpm-steps",
            "4",
            "--ddim-steps",
            "2",
            "--no-rflow",
            "--pairs",
            "1",
            "--device",
            "cpu",
        ]
    )
    sets = result["sets"]
    assert [(s["sampler"], s["steps"], s["seed"]) for s in sets] == [("ddpm", 4, 1), ("ddpm", 4, 2), ("ddim", 2, 1)]
    assert all(s["metrics"]["n_fake"] == 2 and s["metrics"]["n_real"] == 4 for s in sets)
    assert all(s["comparison"][k]["ratio"] == 1.0 for k in bench.METRICS for s in sets[:1])
    # the noise-floor set really is another draw: its samples differ from the reference's
    import nibabel as nib

    a, b = (sorted((tmp_path / "work" / "samples" / s["name"]).glob("*.nii.gz"))[0] for s in sets[:2])
    assert not np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    table = (tmp_path / "results.md").read_text()
    assert "| DDPM-4 (seed 1) | ddpm | reference |" in table and "| DDIM-2 (seed 1) |" in table
    assert json.loads((tmp_path / "results.json").read_text())["sets"][2]["name"] == "ddim2"


# ----------------------------------------------------------------------------------------------------------------------
# CUDA only (run on a GPU machine; CI has none)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_haar_matches_torch_path(dtype):
    x = torch.randn(2, 3, 16, 12, 40, device="cuda").to(dtype)
    assert fused_haar_available(x), wv._fused_haar
    y = dwt3d(x)
    ref = wv._haar_forward_kernel(x.float())  # the torch path in float32
    if dtype == torch.float32:
        assert torch.allclose(y, ref, atol=1e-6)
    else:
        assert torch.allclose(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)
    r = idwt3d(y)
    assert (r.float() - x.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 5e-2)
    assert wv._fused_haar["failed"] is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_bf16_channels_last_close_to_fp32():
    net = tiny_net().cuda().eval()
    x = torch.randn(2, 8, 8, 8, 8, device="cuda")
    t = torch.tensor([3, 700], device="cuda")
    with torch.no_grad():
        ref = net(x, t)
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = net_cl(x, t)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.05
