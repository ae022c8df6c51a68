"""Training throughput and peak memory of one WDM optimisation step, for the precision/memory switches side by side.

One step is what ``SupervisedTrainer`` runs with ``WaveletDiffusionPrepareBatch``: DWT of an image batch (already
on the device: data loading is not timed), noise, timesteps, diffusion target, noised input, the U-Net, the
wavelet MSE, backward and an AdamW step. Variants (each in its own try/except, so an OOM or a compile failure is a
row, not a crash):

- fp32 with PyTorch's defaults (cuDNN may use TF32 for convolutions, matmuls stay fp32): the baseline, and what a
  bundle runs today; fp32 with TF32 off everywhere (strict); fp32 with TF32 on everywhere;
- bf16 autocast (``SupervisedTrainer(amp=True, amp_kwargs={"dtype": torch.bfloat16})``; MONAI also runs a
  GradScaler then, so it is used here too);
- bf16 + ``network.to(memory_format=torch.channels_last_3d)``; bf16 + ``torch.backends.cudnn.benchmark``;
- bf16 + ``torch.compile(network)`` (``SupervisedTrainer(compile=True)``);
- bf16 + gradient checkpointing (``WDMUNet(use_checkpoint=True)``), alone and with compile (256^3);
- bf16 with the two 8-channel convolutions in fp32 (``WDMUNet(fp32_io=True)``), alone and with compile: the
  candidate fix for the slow bf16 cuDNN weight-gradient kernel found by ``--profile``.

Warm-up steps (and compilation) are excluded; then ``--steps`` steps are timed between two ``cuda.synchronize``.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients and AdamW state
included; the CUDA context, ~0.5 GB, is not). WDM's anchor: 0.72 s per iteration at batch 10, 128^3, on an A100
in fp32 = 13.9 volumes/s.

    python benchmarks/train_step.py --device cuda                        # both presets, all variants
    python benchmarks/train_step.py --device cuda --presets wdm_128 --json out.json --markdown out.md
    python benchmarks/train_step.py --device cpu --tiny                  # a tiny U-Net, seconds: tests the script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from wdm3d.diffusion import WaveletDiffusion, WaveletMSELoss
from wdm3d.networks import WDMUNet, count_parameters, wdm_unet

#: WDM's reported training speed: 0.72 s per iteration at batch 10, 128^3 images, one A100, fp32.
WDM_ANCHOR_VOLUMES_PER_S = 10 / 0.72

#: image size and batch of each preset, as WDM trained them
PRESET_SETUP = {"wdm_128": (128, 10), "wdm_256": (256, 1)}


@dataclass
class Variant:
    name: str
    amp: bool = False
    tf32: str = "default"  # "default" (PyTorch's), "off", "on"
    channels_last: bool = False
    compile: bool = False
    checkpoint: bool = False
    cudnn_benchmark: bool = False
    fp32_io: bool = False


def variants_for(preset: str) -> list[Variant]:
    rows = [
        Variant("fp32 (PyTorch defaults) [baseline]"),
        Variant("fp32, TF32 off (strict)", tf32="off"),
        Variant("fp32, TF32 on (matmul + cuDNN)", tf32="on"),
        Variant("bf16 autocast", amp=True),
        Variant("bf16 + channels_last_3d", amp=True, channels_last=True),
        Variant("bf16 + cudnn.benchmark", amp=True, cudnn_benchmark=True),
        Variant("bf16 + fp32 in/out convs", amp=True, fp32_io=True),
    ]
    if preset == "wdm_256":
        rows.append(Variant("bf16 + checkpointing", amp=True, checkpoint=True))
    # compiled variants last: they take the longest to prepare, and a timeout then loses the least
    rows.append(Variant("bf16 + compile", amp=True, compile=True))
    rows.append(Variant("bf16 + fp32 in/out convs + compile", amp=True, fp32_io=True, compile=True))
    if preset == "wdm_256":
        rows.append(Variant("bf16 + checkpointing + compile", amp=True, checkpoint=True, compile=True))
    return rows


@dataclass
class Result:
    preset: str
    image_size: int
    batch: int
    variant: str
    status: str = "ok"
    s_per_step: float | None = None
    volumes_per_s: float | None = None
    peak_alloc_gb: float | None = None
    peak_reserved_gb: float | None = None
    warmup_s: float | None = None
    vs_baseline: float | None = None
    vs_wdm_anchor: float | None = None
    loss: float | None = None
    settings: dict = field(default_factory=dict)


def set_tf32(mode: str, defaults: tuple[bool, bool]) -> None:
    matmul, cudnn = {"default": defaults, "off": (False, False), "on": (True, True)}[mode]
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_network(preset: str, tiny: bool, checkpoint: bool, fp32_io: bool = False) -> WDMUNet:
    if tiny:
        return WDMUNet(
            base_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            norm_num_groups=4,
            use_checkpoint=checkpoint,
            fp32_io=fp32_io,
        )
    return wdm_unet(preset, use_checkpoint=checkpoint, fp32_io=fp32_io)


def run_variant(v: Variant, preset: str, size: int, batch: int, args, device: torch.device, tf32_defaults) -> Result:
    res = Result(preset, size, batch, v.name, settings=asdict(v))
    model = opt = images = None
    try:
        set_tf32(v.tf32, tf32_defaults)
        torch.backends.cudnn.benchmark = v.cudnn_benchmark
        torch.manual_seed(0)
        model = build_network(preset, args.tiny, v.checkpoint, v.fp32_io).to(device).train()
        if v.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        res.settings["parameters_M"] = round(count_parameters(model) / 1e6, 2)
        net = torch.compile(model, backend=args.compile_backend) if v.compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        diffusion = WaveletDiffusion()
        loss_fn = WaveletMSELoss()
        amp_dtype = torch.bfloat16
        scaler = torch.amp.GradScaler(device.type, enabled=v.amp and device.type == "cuda")
        images = torch.rand(batch, 1, size, size, size, device=device) * 2 - 1

        def step() -> torch.Tensor:
            x0 = diffusion.encode(images)
            noise = torch.randn_like(x0)
            t = diffusion.sample_timesteps(batch, device=device)
            target = diffusion.target(x0, noise, t)
            x_t = diffusion.add_noise(x0, noise, t).float()
            ctx = torch.autocast(device.type, dtype=amp_dtype) if v.amp else contextlib.nullcontext()
            with ctx:
                pred = net(x_t, t)
                loss = loss_fn(pred, target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach()

        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        res.warmup_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        dt = (time.perf_counter() - t0) / args.steps
        res.s_per_step = dt
        res.volumes_per_s = batch / dt
        res.loss = float(loss)
        if device.type == "cuda":
            res.peak_alloc_gb = torch.cuda.max_memory_allocated(device) / 1e9
            res.peak_reserved_gb = torch.cuda.max_memory_reserved(device) / 1e9
        if not torch.isfinite(loss):
            res.status = "non-finite loss"
        if args.profile:
            profile_steps(step, device, f"{preset} ({size}^3, batch {batch}): {v.name}", args.profile)
    except Exception as err:  # OOM, compile failure, ...: a row, not a crash
        res.status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        model = opt = images = None  # drop the references (the step closure keeps its cell) so the memory is freed
        gc.collect()
        if v.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.backends.cudnn.benchmark = False
        set_tf32("default", tf32_defaults)
    return res


def profile_steps(step, device: torch.device, title: str, path: str, steps: int = 2) -> None:
    """Append the top kernels/ops of ``steps`` profiled steps (by self device time) to the text file ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
            break
        except Exception:
            continue
    with open(path, "a") as fh:
        fh.write(f"## {title}, {steps} steps\n\n{table}\n\n")


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["tf32_defaults"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: list[Result], env: dict) -> str:
    lines = [
        f"Device: {env.get('gpu', 'CPU')}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"{env['date']}.",
        "",
        "| preset (image, batch) | variant | s/step | volumes/s | x fp32 baseline | x WDM anchor | peak alloc GB "
        "| peak reserved GB | warm-up s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.preset} ({r.image_size}^3, {r.batch}) | {r.variant} | {fmt(r.s_per_step, '.3f')} "
            f"| {fmt(r.volumes_per_s, '.2f')} | {fmt(r.vs_baseline, '.2f')} | {fmt(r.vs_wdm_anchor, '.2f')} "
            f"| {fmt(r.peak_alloc_gb, '.2f')} | {fmt(r.peak_reserved_gb, '.2f')} | {fmt(r.warmup_s, '.1f')} "
            f"| {r.status} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=list(PRESET_SETUP), choices=list(PRESET_SETUP))
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny: 1)")
    parser.add_argument(
        "--variants", nargs="+", default=None, help="run only variants whose name contains one of these"
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; tiny: aot_eager)"
    )
    parser.add_argument(
        "--profile", default=None, help="append a torch.profiler table of 2 extra steps per variant here"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net on 16^3 images: checks the script in seconds")
    parser.add_argument("--json", default=None, help="write the rows (and the environment) to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table to this Markdown file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device; use --device cpu --tiny")
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    tf32_defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    env = environment(device)
    print(json.dumps(env), flush=True)

    results: list[Result] = []
    for preset in args.presets:
        size, batch = PRESET_SETUP[preset]
        if args.tiny:
            size, batch = 16, 2
        batch = args.batch or batch
        baseline = None
        for v in variants_for(preset):
            if args.variants and not any(s in v.name for s in args.variants):
                continue
            if device.type != "cuda" and v.tf32 != "default":
                continue  # TF32 only exists on CUDA
            r = run_variant(v, preset, size, batch, args, device, tf32_defaults)
            if v.name.endswith("[baseline]") and r.volumes_per_s:
                baseline = r.volumes_per_s
            if r.volumes_per_s:
                r.vs_baseline = r.volumes_per_s / baseline if baseline else None
                if preset == "wdm_128" and not args.tiny:
                    r.vs_wdm_anchor = r.volumes_per_s / WDM_ANCHOR_VOLUMES_PER_S
            results.append(r)
            print(markdown([r], env).splitlines()[-1], flush=True)
            # written after every row, so a timeout keeps what was measured
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"environment": env, "rows": [asdict(x) for x in results]}, fh, indent=1)
            if args.markdown:
                with open(args.markdown, "w") as fh:
                    fh.write(markdown(results, env))
    return results


if __name__ == "__main__":
    main()
