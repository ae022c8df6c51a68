"""Time and peak memory to generate one volume with WaveletDiffusion.sample, per sampler and precision.

Samplers: DDPM-1000 (WDM's ancestral chain), DDIM-50 and rectified flow with 30 steps (RFlow-30), each for one
(1, 1, N, N, N) volume with the WDM U-Net preset of that size (``wdm_128`` for 128^3, ``wdm_256`` for 256^3), with
WDM's clip projection (IDWT -> clamp -> DWT of every predicted x0) on. The network is untrained (freshly
initialised): the time and memory of a step do not depend on the weights' values, only the images would.

With ``--flow-map-steps 1 2 4`` the U-Net takes a flow map's jump size (``interval_embedding``) and a shortcut
model's sampler is timed at those jumps too (issue 25), one network evaluation per jump.

DDPM-1000 is long at 256^3: ``--ddpm-steps`` steps (default 50) of the chain are timed and the time is extrapolated
to 1000 steps (marked ``extrapolated`` in the table); its peak memory is that of the timed steps (every step does the
same work). DDIM-50 and RFlow-30 run in full (unless ``--max-timed-steps`` caps them too).

Precisions: fp32 (PyTorch's defaults, so cuDNN may use TF32 for convolutions); bf16 autocast around the network
call (WaveletDiffusion.sample has no precision switch yet: the model is wrapped in :class:`AutocastModel`);
bf16 + ``torch.compile`` of the network (``--compile``, for ``--compile-samplers``, default RFlow-30; compilation time
is reported apart, not in the per-volume time). Peak memory is ``torch.cuda.max_memory_allocated`` during sampling (weights included, the ~0.5 GB CUDA
context not; WDM's anchors, ~2.55 GB at 128^3 and ~7.27 GB at 256^3, come from its model card and likely include it).

    python benchmarks/sampling.py --device cuda --compile --json out.json --markdown out.md
    python benchmarks/sampling.py --device cuda --sizes 256 --precisions bf16 --compile --compile-samplers rflow shortcut --flow-map-steps 1 2 4
    python benchmarks/sampling.py --device cpu --tiny      # tiny U-Net, 16^3: checks the script in seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from wdm3d.diffusion import WaveletDiffusion
from wdm3d.networks import WDMUNet, wdm_unet

#: WDM's sampling memory (model card), GB, by image size
WDM_MEMORY_GB = {128: 2.55, 256: 7.27}
#: issue target for 256^3 generation with a few-step sampler on an H100
TARGET_S, TARGET_GB = 20.0, 8.0


class AutocastModel(nn.Module):
    """Run ``model(x, t, context=...)`` under ``torch.autocast`` (``dtype`` None: plain call); output in x's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.dtype is None:  # interval: a flow map's jump size (WDMUNet takes None)
            return self.model(x, timesteps, context=context, interval=interval)
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, timesteps, context=context, interval=interval).to(x.dtype)


@dataclass
class Result:
    image_size: int
    sampler: str
    steps: int
    precision: str
    status: str = "ok"
    timed_steps: int | None = None
    s_per_step: float | None = None
    s_per_volume: float | None = None
    extrapolated: bool = False
    peak_alloc_gb: float | None = None
    peak_reserved_gb: float | None = None
    wdm_memory_gb: float | None = None
    compile_s: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    net: nn.Module,
    size: int,
    sampler: str,
    steps: int,
    timed: int,
    precision: str,
    device,
    tiny: bool,
    compile_s: float | None,
) -> Result:
    res = Result(
        size,
        sampler,
        steps,
        precision,
        timed_steps=timed,
        extrapolated=timed < steps,
        wdm_memory_gb=None if tiny else WDM_MEMORY_GB.get(size),
        compile_s=compile_s,
    )
    try:
        if sampler == "shortcut":  # the flow map's process (x prediction; the timing does not depend on it)
            diffusion = WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="shortcut")
        else:
            diffusion = WaveletDiffusion(process="rflow" if sampler == "rflow" else "ddpm")
        kwargs = dict(image_shape=(1, size, size, size), num_samples=1, sampler=sampler, device=device, progress=False)
        diffusion.sample(net, num_steps=2, seed=1, **kwargs)  # warm-up: cuDNN algorithm choice, allocator
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = diffusion.sample(net, num_steps=timed, seed=0, **kwargs)
        sync(device)
        dt = time.perf_counter() - t0
        if not torch.isfinite(out).all():
            res.status = "non-finite output"
        del out
        res.s_per_step = dt / timed
        res.s_per_volume = dt / timed * steps if timed < steps else dt
        if device.type == "cuda":
            res.peak_alloc_gb = torch.cuda.max_memory_allocated(device) / 1e9
            res.peak_reserved_gb = torch.cuda.max_memory_reserved(device) / 1e9
    except Exception as err:  # OOM, compile failure, ...: a row, not a crash
        res.status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


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
        torch.zeros(1, device=device)
        free, total = torch.cuda.mem_get_info(device)
        env["cuda_context_gb"] = round((total - free - torch.cuda.memory_reserved(device)) / 1e9, 2)
    return env


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(results: list[Result], env: dict) -> str:
    lines = [
        f"Device: {env.get('gpu', 'CPU')}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"{env['date']}; untrained network, one volume (batch 1); CUDA context ~{env.get('cuda_context_gb', '-')} "
        "GB not in the peaks.",
        "",
        "| image | sampler | precision | s/step | s/volume | peak alloc GB | peak reserved GB | WDM GB | compile s "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_volume = fmt(r.s_per_volume, ".2f")
        if r.extrapolated and r.s_per_volume is not None:
            per_volume += f" (extrapolated from {r.timed_steps} steps)"
        lines.append(
            f"| {r.image_size}^3 | {r.sampler.upper()}-{r.steps} | {r.precision} | {fmt(r.s_per_step, '.4f')} "
            f"| {per_volume} | {fmt(r.peak_alloc_gb, '.2f')} | {fmt(r.peak_reserved_gb, '.2f')} "
            f"| {fmt(r.wdm_memory_gb, '.2f')} | {fmt(r.compile_s, '.1f')} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sizes (128 and/or 256)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--ddpm-steps", type=int, default=50, help="DDPM-1000 steps actually timed (extrapolated)")
    parser.add_argument("--compile", action="store_true", help="also bf16 + torch.compile (RFlow-30 and DDIM-50)")
    parser.add_argument("--compile-only", action="store_true", help="only the bf16 + torch.compile rows")
    parser.add_argument(
        "--compile-samplers",
        nargs="+",
        default=["rflow"],
        choices=["ddim", "rflow", "shortcut"],
        help="samplers timed with the compiled network (each timestep dtype compiles once more)",
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; tiny: aot_eager)"
    )
    parser.add_argument(
        "--max-timed-steps",
        type=int,
        default=None,
        help="time at most this many steps of any sampler and extrapolate (default: none; tiny: 3)",
    )
    parser.add_argument(
        "--flow-map-steps",
        type=int,
        nargs="*",
        default=[],
        help="also time a shortcut model's sampler at these jumps (e.g. 1 2 4); the U-Net then takes the jump size "
        "(interval_embedding: one more small MLP) for every row",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net on 16^3 images: checks the script in seconds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device; use --device cpu --tiny")
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    sizes = [16] if args.tiny else args.sizes
    cap = args.max_timed_steps or (3 if args.tiny else 1000)
    env = environment(device)
    print(json.dumps(env), flush=True)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    plan = [
        (name, steps, min(timed, cap))
        for name, steps, timed in [("ddpm", 1000, args.ddpm_steps), ("ddim", 50, 50), ("rflow", 30, 30)]
    ] + [("shortcut", k, min(k, cap)) for k in args.flow_map_steps]
    results: list[Result] = []

    def record(r: Result) -> None:
        results.append(r)
        print(markdown([r], env).splitlines()[-1], flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"environment": env, "rows": [asdict(x) for x in results]}, fh, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(markdown(results, env))

    for size in sizes:
        if size % 2 or (not args.tiny and size not in WDM_MEMORY_GB):
            parser.error(f"--sizes takes 128 and/or 256 (the WDM presets), got {size}")
        torch.manual_seed(0)
        flow = {"interval_embedding": True} if args.flow_map_steps else {}
        if args.tiny:
            base = WDMUNet(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, **flow)
        else:
            base = wdm_unet("wdm_128" if size == 128 else "wdm_256", **flow)
        base = base.to(device).eval()
        for precision in [] if args.compile_only else args.precisions:
            net = AutocastModel(base, dtypes[precision])
            for sampler, steps, timed in plan:
                record(run_one(net, size, sampler, steps, timed, precision, device, args.tiny, None))
        if args.compile or args.compile_only:
            dtype = torch.bfloat16
            try:
                compiled = torch.compile(base, backend=backend)
                net = AutocastModel(compiled, dtype)
                t0 = time.perf_counter()
                shape = (1, 8, size // 2, size // 2, size // 2)
                with torch.no_grad():
                    for name in args.compile_samplers:  # integer timesteps (ddim) and float ones (rflow) compile apart
                        t = torch.tensor([5] if name == "ddim" else [5.5], device=device)
                        gap = torch.tensor([250.0], device=device) if name == "shortcut" else None
                        net(torch.randn(shape, device=device), t, interval=gap)
                sync(device)
                compile_s = time.perf_counter() - t0
                for sampler, steps, timed in plan:
                    if sampler in args.compile_samplers:
                        record(
                            run_one(net, size, sampler, steps, timed, "bf16 + compile", device, args.tiny, compile_s)
                        )
            except Exception as err:
                r = Result(size, "rflow", 30, "bf16 + compile")
                r.status = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                record(r)
            torch._dynamo.reset()
        del base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
