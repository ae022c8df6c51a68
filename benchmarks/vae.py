"""WF-VAE-3D benchmarks: whole vs chunked encode/decode (time, peak memory, equality), and a short side-by-side
training of WF-VAE-3D, Wavelet-VAE-3D and MONAI's AutoencoderKL (issue 6, item 5).

Modes (first positional argument; default ``all``):

- ``memory``: :class:`wdm3d.networks.WFVAE3D` (untrained, fresh initialisation with seed 0: time and memory do not
  depend on the weights' values) encodes a ``(1, 1, D, H, W)`` volume and decodes a ``(1, Z, D/f, H/f, W/f)`` latent,
  whole (:meth:`~WFVAE3D.encode` / :meth:`~WFVAE3D.decode` under ``no_grad``) and chunked
  (:meth:`~WFVAE3D.encode_chunked` / :meth:`~WFVAE3D.decode_chunked`, slab by slab along depth with the causal
  cache). Sets of shapes: cubes (``--sizes``, default 64 128 256) and a depth sweep (``--depths`` at a fixed
  ``--depth-hw`` x ``--depth-hw`` slice, for the memory-vs-depth figure); with ``--chunk-sweep`` also several chunk
  sizes at one cube size. Every (shape, operation, whole/chunked) runs in its own configuration; the reported time is
  the median of up to ``--repeats`` calls after a first call (fewer once ``--max-repeat-s`` is used up), and
  ``max |chunked - whole|`` compares the two outputs of the same shape. Then (unless ``--no-check``) chunked is
  compared with whole in fp32 for several chunk sizes and depths that are not multiples of the chunk.
  Peak memory, weights and input excluded, output included:

  * CPU: each configuration runs in a **fresh subprocess**; after the timed calls, one more call runs under
    ``torch.profiler`` with ``profile_memory=True``, and the peak is the highest "Total Allocated" of PyTorch's CPU
    allocator during that call minus its value before (every tensor, im2col workspaces included: the CPU analogue of
    ``torch.cuda.max_memory_allocated``; memory that oneDNN allocates outside PyTorch's allocator is not seen). The
    same profile gives the share of convolution time that ran in PyTorch's im2col fallback (``slow_conv3d``) instead
    of oneDNN: PyTorch picks the fallback for a 3D conv when ``N*C*D*H <= 20480`` (a heuristic meant for 2D
    inputs), which thin slabs of a narrow model hit. For reference the JSON also holds the resident-set growth of the
    first call (``rss_peak_mb``: ``/proc/self/clear_refs`` <- 5 resets ``VmHWM``, baseline ``VmRSS``; or
    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after where the reset is refused). It is not used in
    the tables: glibc keeps freed blocks and the kernel may reclaim or merge pages, so it varied by up to 2x between
    configurations that allocate the same tensors.
  * CUDA: in one process; ``torch.cuda.max_memory_allocated`` during the first call minus ``memory_allocated``
    before it, with ``torch.cuda.synchronize`` around every timed call. ``--bf16`` runs the calls under
    ``torch.autocast(dtype=bfloat16)`` (fp32 otherwise; TF32 at PyTorch's defaults).

  The model width (``base_channels``) is per cube size (``--widths``, default 128 for every size on CUDA, the model's
  default; on CPU narrower so that the run takes minutes) and ``--depth-width`` for the sweep.

- ``train``: WF-VAE-3D, Wavelet-VAE-3D and MONAI's ``AutoencoderKL`` (through :class:`MonaiKLAdapter`, no
  attention) of similar parameter counts, all with 4x compression per axis and 8 latent channels, trained side by
  side on the same data for the same steps: plain VAE (no GAN, no perceptual loss), AdamW with the same lr, batch,
  weight decay and seed, the same batch order, loss :class:`wdm3d.losses.VAELoss` with its defaults (L1 + 1e-6 KL;
  + 0.1 x the wavelet pyramid loss for the models that return coefficient pyramids (both wavelet models);
  + 1e-4 x the sparsity term for Wavelet-VAE). Reconstruction (posterior mean) PSNR / SSIM / MAE on the held-out
  cases (the datalist's validation + test splits) at step 0, every ``--eval-every`` steps and at the end. Data:
  ``--datalist`` (a prepared datalist) or, without it, the embedded demo dataset written by
  ``data_prep.demo`` to ``--demo-dir`` (``--demo-resolution 4`` -> 32^3 volumes, 2 -> 64^3).

- ``all``: both.

On a CPU shared with other jobs use ``--threads 1``: with 2 threads every parallel op waits for the second OpenMP
thread to be scheduled (milliseconds per op), which penalises the many small ops of the chunked path.

Examples::

    python benchmarks/vae.py memory --device cpu --threads 1 --chunk-sweep --json vae_mem.json --markdown vae_mem.md
    python benchmarks/vae.py train --steps 300 --json vae_train.json --markdown vae_train.md
    python benchmarks/vae.py memory --device cuda --bf16          # GPU: default width 128, 64^3 .. 256^3
    python benchmarks/vae.py all --tiny                           # tiny shapes and models: checks the script

The machine (CPU model, logical cores, torch threads, torch version; the GPU where there is one) heads every table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wdm3d.networks import WFVAE3D, count_parameters

#: CPU default width (base_channels) per cube size: keeps the CPU run to minutes; CUDA uses the model default (128)
CPU_WIDTHS = {64: 16, 128: 16, 256: 16}
LATENT_CHANNELS = 8
LEVELS = 2  # 4x per axis

# ----------------------------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def environment(device: torch.device, threads: int) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def machine_line(env: dict) -> str:
    if env.get("gpu"):
        return f"{env['gpu']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env.get('cudnn')}; {env['date']}"
    return (
        f"{env['cpu']}, {env['logical_cores']} logical cores, {env['torch_threads']} torch threads; "
        f"torch {env['torch']}; {env['date']}; load average at start {env.get('load_average_at_start')}"
    )


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ----------------------------------------------------------------------------------------------------------------------
# memory mode: one configuration (run in a fresh subprocess on CPU)
# ----------------------------------------------------------------------------------------------------------------------


def build_wfvae(width: int) -> WFVAE3D:
    torch.manual_seed(0)
    return WFVAE3D(latent_channels=LATENT_CHANNELS, levels=LEVELS, base_channels=width).eval()


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark (VmHWM) of this process; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_mb("VmHWM") is not None
    except OSError:
        return False


def _maxrss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: dict) -> dict:
    """Time and peak memory of one (op, mode, shape, width) configuration; optionally saves the output.

    ``cfg``: ``op`` ("encode"/"decode"), ``mode`` ("whole"/"chunked"), ``shape`` ``[D, H, W]`` of the *image*,
    ``width``, ``enc_chunk`` (input slices), ``dec_chunk`` (latent slices), ``device``, ``bf16``, ``repeats``,
    ``threads``, ``save`` (path or None).
    """
    device = torch.device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    model = build_wfvae(cfg["width"]).to(device)
    f = model.downsample_factor
    d, h, w = cfg["shape"]
    gen = torch.Generator().manual_seed(1)
    if cfg["op"] == "encode":
        inp = torch.randn((1, 1, d, h, w), generator=gen)
        tiny = torch.randn((1, 1, 2 * f, 2 * f, 2 * f), generator=gen).to(device)
    else:
        inp = torch.randn((1, LATENT_CHANNELS, d // f, h // f, w // f), generator=gen)
        tiny = torch.randn((1, LATENT_CHANNELS, 2, 2, 2), generator=gen).to(device)
    inp = inp.to(device)
    chunk = cfg["enc_chunk"] if cfg["op"] == "encode" else cfg["dec_chunk"]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.get("bf16") else contextlib.nullcontext()

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp:
            if cfg["op"] == "encode":
                dist = model.encode(x) if cfg["mode"] == "whole" else model.encode_chunked(x, chunk)
                return dist.mean
            return model.decode(x) if cfg["mode"] == "whole" else model.decode_chunked(x, chunk)

    call(tiny)  # library start-up (thread pools, oneDNN), not the measured call's memory
    del tiny
    gc.collect()
    _sync(device)
    row = {k: cfg[k] for k in ("op", "mode", "shape", "width", "bf16")}
    row.update(chunk=chunk if cfg["mode"] == "chunked" else None, parameters_M=count_parameters(model) / 1e6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    elif _reset_hwm():
        base, rss_method = _proc_status_mb("VmRSS"), "VmHWM reset"
    else:
        base, rss_method = _maxrss_mb(), "ru_maxrss"
    t0 = time.perf_counter()
    out = call(inp)
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        row.update(
            peak_mb=(torch.cuda.max_memory_allocated(device) - base) / 2**20,
            memory_method="torch.cuda.max_memory_allocated",
        )
    else:  # resident memory: allocator- and OS-dependent, kept for reference; the peak comes from the profiled call
        rss = (_proc_status_mb("VmHWM") if rss_method == "VmHWM reset" else _maxrss_mb()) - base
        row.update(rss_peak_mb=rss, rss_method=rss_method)
    row.update(
        first_call_s=first,
        input_mb=inp.numel() * inp.element_size() / 2**20,
        output_mb=out.numel() * out.element_size() / 2**20,
        output_shape=list(out.shape),
    )
    if cfg.get("save"):
        torch.save(out.float().cpu(), cfg["save"])
    del out
    times = []
    for _ in range(cfg["repeats"]):
        if times and sum(times) > cfg.get("max_repeat_s", float("inf")):
            break  # enough for a median on a slow configuration
        _sync(device)
        t0 = time.perf_counter()
        out = call(inp)
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    row.update(times_s=times, median_s=statistics.median(times) if times else first)
    if device.type == "cpu":
        row.update(cpu_profiled_call(call, inp))
    return row


def cpu_profiled_call(call, inp: torch.Tensor) -> dict:
    """One call under ``torch.profiler`` with ``profile_memory=True``: the peak of PyTorch's CPU allocator total
    during the call (every tensor, im2col workspaces included; the CPU analogue of ``max_memory_allocated``), and
    which convolution kernels ran, by self time. PyTorch runs a CPU 3D convolution in oneDNN
    (``mkldnn_convolution``) or in its im2col fallback (``slow_conv3d``), chosen per call from the input's shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call(inp)
        del out
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})),
        key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)),
    )
    peak = None
    if mem:
        base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
        peak = (max(e["args"]["Total Allocated"] for e in mem) - base) / 2**20
    averages = prof.key_averages()
    slow = sum(e.self_cpu_time_total for e in averages if e.key == "aten::slow_conv3d_forward")
    onednn = sum(e.self_cpu_time_total for e in averages if e.key == "aten::mkldnn_convolution")
    return {
        "peak_mb": peak,
        "memory_method": "torch.profiler CPU allocator total (profile_memory)",
        "slow_conv3d_share_of_conv": slow / (slow + onednn) if slow + onednn else None,
    }


def run_config(cfg: dict, subprocess_timeout: float) -> dict:
    """``measure(cfg)`` in a fresh Python process (CPU: clean peak memory) or in this one (CUDA)."""
    if cfg["device"] != "cpu":
        try:
            return measure(cfg)
        except Exception as err:  # OOM: a row, not a crash
            first = str(err).splitlines()[0][:160] if str(err) else ""
            return {**cfg, "status": f"FAILED {type(err).__name__}: {first}"}
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=subprocess_timeout)
    except subprocess.TimeoutExpired:
        return {**cfg, "status": f"FAILED timeout after {subprocess_timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {**cfg, "status": f"FAILED {tail[0][:200]}"}
    return json.loads(lines[-1])


def _max_diff(a: str, b: str) -> float | None:
    if not (os.path.isfile(a) and os.path.isfile(b)):
        return None
    return float((torch.load(a, weights_only=True) - torch.load(b, weights_only=True)).abs().max())


def run_jobs(jobs: list[dict], args, tmp: str) -> list[dict]:
    """Whole and chunked encode and decode for each job (``set``, ``shape``, ``width``, ``enc_chunk``,
    ``dec_chunk``, ``repeats``; ``whole`` False skips the whole calls); chunked rows carry ``max_abs_diff`` against the
    whole output of the same job (or of an earlier job with the same shape and width)."""
    rows = []
    whole_outputs: dict = {}
    for job in jobs:
        for op in ("encode", "decode"):
            modes = ("whole", "chunked") if job.get("whole", True) else ("chunked",)
            for mode in modes:
                key = (tuple(job["shape"]), job["width"], op)
                path = os.path.join(
                    tmp,
                    f"{job['set']}_{'x'.join(map(str, job['shape']))}_w{job['width']}_{op}_{mode}"
                    f"_{job['enc_chunk']}_{job['dec_chunk']}.pt",
                )
                cfg = {
                    "op": op,
                    "mode": mode,
                    "shape": job["shape"],
                    "width": job["width"],
                    "enc_chunk": job["enc_chunk"],
                    "dec_chunk": job["dec_chunk"],
                    "device": args.device,
                    "bf16": args.bf16,
                    "repeats": job["repeats"],
                    "max_repeat_s": args.max_repeat_s,
                    "threads": args.threads,
                    "save": path,
                }
                t0 = time.perf_counter()
                row = run_config(cfg, args.worker_timeout)
                row.setdefault("status", "ok")
                row["set"] = job["set"]
                row.pop("save", None)
                if mode == "whole":
                    whole_outputs[key] = path
                else:
                    row["max_abs_diff"] = _max_diff(whole_outputs.get(key, ""), path)
                    with contextlib.suppress(OSError):
                        os.remove(path)
                rows.append(row)
                print(
                    f"[{job['set']}] {'x'.join(map(str, job['shape']))} width {job['width']} {op} {mode}"
                    f"{'' if mode == 'whole' else ' chunk ' + str(row.get('chunk'))}: "
                    f"median {fmt(row.get('median_s'), '.3f')} s, peak {fmt(row.get('peak_mb'), '.0f')} MB, "
                    f"diff {fmt(row.get('max_abs_diff'), '.2e')}, slow_conv3d share "
                    f"{fmt(row.get('slow_conv3d_share_of_conv'), '.2f')}, {row['status']} "
                    f"({time.perf_counter() - t0:.0f} s wall)",
                    flush=True,
                )
    return rows


def check_chunks(args) -> list[dict]:
    """chunked == whole for several chunk sizes and depths that are not multiples of the chunk (fp32, in-process)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_wfvae(args.check_width).to(device)
    f = model.downsample_factor
    rows = []
    hw = args.check_hw
    for depth in args.check_depths:
        x = torch.randn((1, 1, depth, hw, hw), generator=torch.Generator().manual_seed(depth)).to(device)
        with torch.no_grad():
            whole = model.encode(x).mean
            recon = model.decode(whole)
            for chunk in args.check_enc_chunks:
                got = model.encode_chunked(x, chunk).mean
                rows.append(
                    {
                        "op": "encode",
                        "shape": [depth, hw, hw],
                        "chunk": chunk,
                        "max_abs_diff": float((got - whole).abs().max()),
                        "max_abs_value": float(whole.abs().max()),
                    }
                )
            for chunk in args.check_dec_chunks:
                got = model.decode_chunked(whole, chunk)
                rows.append(
                    {
                        "op": "decode",
                        "shape": [depth, hw, hw],
                        "chunk": chunk,
                        "max_abs_diff": float((got - recon).abs().max()),
                        "max_abs_value": float(recon.abs().max()),
                    }
                )
        print(
            f"[check] depth {depth} (latent {depth // f}): max diff "
            f"{max(r['max_abs_diff'] for r in rows if r['shape'][0] == depth):.2e}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# train mode
# ----------------------------------------------------------------------------------------------------------------------


def train_models(tiny: bool) -> dict:
    """The three autoencoders, built from a seed; similar parameter counts, 4x per axis, 8 latent channels."""
    from monai.networks.nets import AutoencoderKL

    from wdm3d.networks import MonaiKLAdapter, WaveletVAE3D

    def kl() -> torch.nn.Module:
        ch = (4, 8, 8) if tiny else (16, 32, 32)
        return MonaiKLAdapter(
            AutoencoderKL(
                spatial_dims=3,
                in_channels=1,
                out_channels=1,
                channels=ch,
                latent_channels=LATENT_CHANNELS,
                num_res_blocks=(2, 2, 2),
                norm_num_groups=4 if tiny else 8,
                attention_levels=(False, False, False),
                with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False,
            )
        )

    return {
        "WF-VAE-3D": (
            lambda: WFVAE3D(latent_channels=LATENT_CHANNELS, levels=LEVELS, base_channels=4 if tiny else 16),
            f"WFVAE3D(levels=2, latent_channels=8, base_channels={4 if tiny else 16}), defaults otherwise",
        ),
        "Wavelet-VAE-3D": (
            lambda: WaveletVAE3D(
                levels=LEVELS,
                latent_channels=LATENT_CHANNELS,
                base_channels=4 if tiny else 24,
                norm_num_groups=4 if tiny else 8,
            ),
            f"WaveletVAE3D(levels=2, latent_channels=8, base_channels={4 if tiny else 24}), "
            "prior='both', defaults otherwise",
        ),
        "MONAI AutoencoderKL": (
            kl,
            f"AutoencoderKL(channels={(4, 8, 8) if tiny else (16, 32, 32)}, "
            "num_res_blocks=2, latent_channels=8, no attention)",
        ),
    }


def load_volumes(datalist: str, splits: list[str], key: str, size: list[int] | None) -> tuple[torch.Tensor, list[int]]:
    from wdm3d.data import intensity_range, load_datalist, read_datalist, volume_transforms

    if size is None:
        meta = read_datalist(datalist).get("spatial_size")
        size = [int(s) for s in meta] if isinstance(meta, list) and len(meta) == 3 else None
    vols = []
    for split in splits:
        try:
            entries = load_datalist(datalist, split=split, keys=[key])
        except (KeyError, ValueError):
            continue
        for entry in entries:
            if size is None:
                import nibabel as nib

                size = list(nib.load(entry[key]).shape[:3])
            chain = volume_transforms(key, size, intensity_range=intensity_range(datalist))
            vols.append(torch.as_tensor(chain(entry)[key]).float())
    if not vols:
        raise ValueError(f"{datalist}: no volumes under key {key!r} in splits {splits}.")
    return torch.stack(vols), size


def evaluate(model: torch.nn.Module, volumes: torch.Tensor) -> dict:
    from wdm3d.metrics.reconstruction import reconstruction_metrics, summarize_cases

    model.eval()
    rows = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(volumes.shape[0]):
            x = volumes[i : i + 1].to(device)
            rows += reconstruction_metrics(model(x, sample=False).reconstruction, x, value_range=(-1.0, 1.0))
    model.train()
    return summarize_cases(rows)


def train_one(name: str, build, description: str, train: torch.Tensor, held_out: torch.Tensor, args) -> dict:
    from wdm3d.losses import VAELoss

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = VAELoss()
    order = torch.Generator().manual_seed(args.seed)  # same batch order for every model
    res = {
        "model": name,
        "description": description,
        "parameters_M": count_parameters(model) / 1e6,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "image_size": list(train.shape[2:]),
        "evals": [],
        "status": "ok",
    }
    res["evals"].append({"step": 0, **evaluate(model, held_out)})
    step_times, recon_hist, terms_last = [], [], {}
    t_start = time.perf_counter()
    eval_s = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train.shape[0], (args.batch,), generator=order)
        x = train[idx].to(device)
        _sync(device)
        t0 = time.perf_counter()
        out = model(x)
        total, terms = loss_fn(out, x, model=model)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        recon_hist.append(float(terms["recon"].detach()))
        if not torch.isfinite(total):
            res["status"] = f"non-finite loss at step {step}"
            break
        if step % args.log_every == 0 or step == args.steps:
            terms_last = {k: float(v.detach()) for k, v in terms.items()}
            print(
                f"[train] {name} step {step}/{args.steps}: total {float(total):.4f} recon {terms_last['recon']:.4f} "
                f"wavelet {terms_last['wavelet']:.4f} kl {terms_last['kl']:.2f} "
                f"sparsity {terms_last.get('sparsity', 0.0):.4f}; median {statistics.median(step_times):.3f} s/step",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            t0 = time.perf_counter()
            res["evals"].append({"step": step, **evaluate(model, held_out)})
            eval_s += time.perf_counter() - t0
            e = res["evals"][-1]
            print(
                f"[eval] {name} step {step}: PSNR {e['psnr_mean']:.2f} SSIM {e['ssim_mean']:.4f} "
                f"MAE {e['mae_mean']:.4f}",
                flush=True,
            )
    res.update(
        wall_s=time.perf_counter() - t_start - eval_s,
        eval_wall_s=eval_s,
        median_s_per_step=statistics.median(step_times),
        train_recon_l1_last10=statistics.mean(recon_hist[-10:]),
        train_recon_l1_first10=statistics.mean(recon_hist[:10]),
        last_terms=terms_last,
        final=res["evals"][-1],
    )
    return res


def run_train(args) -> dict:
    torch.set_num_threads(args.threads)
    datalist = args.datalist
    if datalist is None:
        from data_prep.demo import make_demo_dataset

        demo = Path(args.demo_dir)
        datalist = demo / "prepared" / "datalist.json"
        if not datalist.is_file():
            t0 = time.perf_counter()
            datalist = make_demo_dataset(
                demo, num_cases=args.demo_cases, seed=args.seed, resolution=args.demo_resolution, progress=False
            )
            print(
                f"[train] demo dataset ({args.demo_cases} cases) written in {time.perf_counter() - t0:.1f} s: "
                f"{datalist}",
                flush=True,
            )
    size = [args.train_size] * 3 if args.train_size else None
    train, size = load_volumes(str(datalist), ["training"], args.key, size)
    held_out, _ = load_volumes(str(datalist), ["validation", "test"], args.key, size)
    print(
        f"[train] {train.shape[0]} training and {held_out.shape[0]} held-out volumes of {size} from {datalist}",
        flush=True,
    )
    results = []
    models = train_models(args.tiny)
    for name, (build, description) in models.items():
        if args.models and not any(s.lower() in name.lower() for s in args.models):
            continue
        try:
            results.append(train_one(name, build, description, train, held_out, args))
        except Exception as err:
            results.append(
                {
                    "model": name,
                    "description": description,
                    "status": f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                }
            )
    return {
        "datalist": str(datalist),
        "num_train": int(train.shape[0]),
        "num_held_out": int(held_out.shape[0]),
        "image_size": size,
        "rows": results,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------------


def _shape(s) -> str:
    return "x".join(map(str, s)) if len(set(s)) > 1 else f"{s[0]}^3"


def _ratio(a, b) -> str:
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"


def _share(r: dict) -> str:
    v = r.get("slow_conv3d_share_of_conv")
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown_memory(rows: list[dict], checks: list[dict], env: dict, args) -> str:
    prec = "bf16 autocast" if args.bf16 else "fp32"
    method = next((r.get("memory_method") for r in rows if r.get("memory_method")), "-")
    lines = [
        f"Machine: {machine_line(env)}. WFVAE3D(levels=2, latent_channels=8, base_channels=width), untrained, "
        f"batch 1, {prec}; unless stated, encoder chunk {args.enc_chunk} input slices and decoder chunk "
        f"{args.dec_chunk} latent slices ({args.dec_chunk * 2**LEVELS} output slices). Time: median of up to "
        f"{args.repeats} calls after a first one (sweeps: {args.sweep_repeats}). Peak: {method} (see the script's "
        'docstring), output included, weights and input not. "slow_conv3d": share of the convolution time spent '
        'in PyTorch\'s im2col fallback instead of oneDNN (CPU only). "RSS growth": resident-set growth during the '
        "first call (CPU only; allocator- and OS-dependent, but it also sees memory oneDNN allocates outside PyTorch).",
        "",
    ]
    by = {(r.get("set"), tuple(r.get("shape", ())), r.get("width"), r.get("op"), r.get("mode")): r for r in rows}

    def status(*rs: dict) -> str:
        bad = [r.get("status") for r in rs if r and r.get("status", "ok") != "ok"]
        return "; ".join(bad) if bad else "ok"

    cubes = [r for r in rows if r.get("set") == "cube" and r.get("mode") == "whole"]
    if cubes:
        lines += [
            "| size | width (params M) | op | whole s | chunked s | chunked / whole time | whole peak MB "
            "| chunked peak MB | chunked / whole peak | output MB | max abs(chunked - whole) "
            "| slow_conv3d whole / chunked | RSS growth whole / chunked MB | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for w in cubes:
            c = by.get(("cube", tuple(w["shape"]), w["width"], w["op"], "chunked"), {})
            lines.append(
                f"| {_shape(w['shape'])} | {w['width']} ({fmt(w.get('parameters_M'), '.2f')}) | {w['op']} "
                f"| {fmt(w.get('median_s'), '.3f')} | {fmt(c.get('median_s'), '.3f')} "
                f"| {_ratio(c.get('median_s'), w.get('median_s'))} | {fmt(w.get('peak_mb'), '.0f')} "
                f"| {fmt(c.get('peak_mb'), '.0f')} | {_ratio(c.get('peak_mb'), w.get('peak_mb'))} "
                f"| {fmt(w.get('output_mb') or c.get('output_mb'), '.1f')} | {fmt(c.get('max_abs_diff'), '.1e')} "
                f"| {_share(w)} / {_share(c)} "
                f"| {fmt(w.get('rss_peak_mb'), '.0f')} / {fmt(c.get('rss_peak_mb'), '.0f')} "
                f"| {status(w, c)} |"
            )
        lines.append("")
    sweep = [r for r in rows if r.get("set") == "sweep" and r.get("mode") == "whole" and r.get("op") == "encode"]
    if sweep:
        lines += [
            f"Depth sweep, D x {args.depth_hw} x {args.depth_hw}, width {args.depth_width}:",
            "",
            "| D x H x W | encode whole MB | encode chunked MB | decode whole MB | decode chunked MB "
            "| decode output MB | encode whole s | encode chunked s | decode whole s | decode chunked s "
            "| max abs diff enc / dec | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for w in sweep:
            s, wd = tuple(w["shape"]), w["width"]
            ec = by.get(("sweep", s, wd, "encode", "chunked"), {})
            dw = by.get(("sweep", s, wd, "decode", "whole"), {})
            dc = by.get(("sweep", s, wd, "decode", "chunked"), {})
            lines.append(
                f"| {'x'.join(map(str, s))} | {fmt(w.get('peak_mb'), '.0f')} | {fmt(ec.get('peak_mb'), '.0f')} "
                f"| {fmt(dw.get('peak_mb'), '.0f')} | {fmt(dc.get('peak_mb'), '.0f')} "
                f"| {fmt(dw.get('output_mb') or dc.get('output_mb'), '.1f')} "
                f"| {fmt(w.get('median_s'), '.3f')} | {fmt(ec.get('median_s'), '.3f')} "
                f"| {fmt(dw.get('median_s'), '.3f')} | {fmt(dc.get('median_s'), '.3f')} "
                f"| {fmt(ec.get('max_abs_diff'), '.1e')} / {fmt(dc.get('max_abs_diff'), '.1e')} "
                f"| {status(w, ec, dw, dc)} |"
            )
        lines.append("")
    sweep = [r for r in rows if r.get("set") == "chunks"]
    if sweep:
        s, wd = tuple(sweep[0]["shape"]), sweep[0]["width"]
        lines += [
            f"Chunk sizes at {_shape(list(s))}, width {wd} (whole first):",
            "",
            "| op | chunk (input slices) | s | x whole time | peak MB | x whole peak | slow_conv3d | max abs diff "
            "| status |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for op in ("encode", "decode"):
            w = by.get(("chunks", s, wd, op, "whole"), {})
            for r in [w] + [r for r in sweep if r.get("op") == op and r.get("mode") == "chunked"]:
                if not r:
                    continue
                f = 2**LEVELS
                ch = (
                    "whole"
                    if r.get("mode") == "whole"
                    else (
                        str(r.get("chunk"))
                        if op == "encode"
                        else f"{r.get('chunk')} latent = {f * (r.get('chunk') or 0)}"
                    )
                )
                lines.append(
                    f"| {op} | {ch} | {fmt(r.get('median_s'), '.3f')} | {_ratio(r.get('median_s'), w.get('median_s'))} "
                    f"| {fmt(r.get('peak_mb'), '.0f')} | {_ratio(r.get('peak_mb'), w.get('peak_mb'))} | {_share(r)} "
                    f"| {fmt(r.get('max_abs_diff'), '.1e')} | {status(r)} |"
                )
        lines.append("")
    if checks:
        lines += [
            f"chunked == whole, width {args.check_width}, fp32, slices {args.check_hw} x {args.check_hw} (max abs "
            "difference over the output; largest output magnitude in brackets):",
            "",
            "| op | D x H x W | chunk: max abs diff |",
            "|---|---|---|",
        ]
        keys = sorted({(c["op"], tuple(c["shape"])) for c in checks}, key=lambda k: (k[0] != "encode", k[1]))
        for op, shape in keys:
            these = [c for c in checks if c["op"] == op and tuple(c["shape"]) == shape]
            cells = [f"{c['chunk']}: {c['max_abs_diff']:.1e}" for c in these]
            lines.append(
                f"| {op} | {'x'.join(map(str, shape))} | {', '.join(cells)} "
                f"({max(c['max_abs_value'] for c in these):.2f}) |"
            )
        lines.append("")
    return "\n".join(lines)


def markdown_train(train: dict, env: dict) -> str:
    rows = train["rows"]
    ok = [r for r in rows if "final" in r]
    if not ok:
        return "Training: " + "; ".join(f"{r['model']}: {r['status']}" for r in rows) + "\n"
    r0 = ok[0]
    lines = [
        f"Machine: {machine_line(env)}. Data: {train['num_train']} training / {train['num_held_out']} held-out volumes "
        f"of {_shape(train['image_size'])} ({train['datalist']}). {r0['steps']} steps, batch {r0['batch']}, AdamW "
        f"lr {r0['lr']:g}, weight decay {r0['weight_decay']:g}, seed {r0['seed']}, same batch order, no augmentation; "
        "VAELoss defaults (L1 + 1e-6 KL, + 0.1 wavelet pyramid loss for the models that return pyramids, + 1e-4 "
        "sparsity for Wavelet-VAE); reconstruction of the posterior mean, metrics in [-1, 1] (mean +- std over the "
        "held-out cases); train wall time without the evaluations.",
        "",
        "| model | params M | s/step (median) | train wall s | train L1 first 10 -> last 10 steps | PSNR dB step 0 "
        "| PSNR dB | SSIM | MAE | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "final" not in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | {r['status']} |")
            continue
        f, e0 = r["final"], r["evals"][0]
        lines.append(
            f"| {r['model']} | {r['parameters_M']:.3f} | {r['median_s_per_step']:.3f} | {r['wall_s']:.0f} "
            f"| {r['train_recon_l1_first10']:.4f} -> {r['train_recon_l1_last10']:.4f} | {e0['psnr_mean']:.2f} "
            f"| {f['psnr_mean']:.2f} +- {f['psnr_std']:.2f} | {f['ssim_mean']:.4f} +- {f['ssim_std']:.4f} "
            f"| {f['mae_mean']:.4f} +- {f['mae_std']:.4f} | {r['status']} |"
        )
    lines += ["", "Held-out PSNR (dB) by step:", ""]
    steps = [e["step"] for e in ok[0]["evals"]]
    lines += ["| model | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for r in ok:
        lines.append(f"| {r['model']} | " + " | ".join(f"{e['psnr_mean']:.2f}" for e in r["evals"]) + " |")
    lines += ["", "Models: " + "; ".join(f"{r['model']} = {r['description']}" for r in rows), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------


def _widths(spec: list[str] | None, sizes: list[int], cuda: bool, tiny: bool) -> dict[int, list[int]]:
    out = {s: [4 if tiny else (128 if cuda else CPU_WIDTHS.get(s, 16))] for s in sizes}
    for item in spec or []:
        size, _, widths = item.partition(":")
        if not widths:
            raise SystemExit(f"--widths takes SIZE:WIDTH[,WIDTH...] (e.g. 256:16 or 64:16,32), got {item!r}")
        out[int(size)] = [int(w) for w in widths.split(",")]
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # internal: one configuration in a fresh process
        print(json.dumps(measure(json.loads(argv[1]))), flush=True)
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "mode",
        nargs="?",
        default="all",
        choices=["memory", "train", "all"],
        help="memory: whole vs chunked time/memory/equality; train: side-by-side training; all: both",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all logical cores)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, widths and models: checks the script")
    parser.add_argument("--json", default=None, help="write everything measured (and the machine) here")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="JSON",
        help="measure nothing: rebuild the tables from a JSON this script wrote (to --markdown/stdout)",
    )
    g = parser.add_argument_group("memory mode")
    g.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="cube sizes N (N^3 volumes)")
    g.add_argument(
        "--widths",
        nargs="+",
        default=None,
        metavar="SIZE:WIDTH",
        help=f"base_channels per cube size (default: CPU {CPU_WIDTHS}, CUDA 128 for every size)",
    )
    g.add_argument("--depths", type=int, nargs="+", default=[32, 64, 128, 192, 256], help="depth sweep depths")
    g.add_argument(
        "--depth-hw", type=int, default=None, help="slice size H = W of the sweep (default CPU 128, CUDA 256)"
    )
    g.add_argument("--depth-width", type=int, default=None, help="width of the sweep (default CPU 16, CUDA 128)")
    g.add_argument("--no-sweep", action="store_true", help="skip the depth sweep")
    g.add_argument("--enc-chunk", type=int, default=16, help="encoder slab, input slices (multiple of 4)")
    g.add_argument("--dec-chunk", type=int, default=4, help="decoder slab, latent slices")
    g.add_argument("--repeats", type=int, default=3, help="timed calls per cube configuration (after a first call)")
    g.add_argument("--sweep-repeats", type=int, default=1, help="timed calls per depth-sweep configuration")
    g.add_argument(
        "--max-repeat-s",
        type=float,
        default=60.0,
        help="stop repeating a configuration once its timed calls took this long (at least one)",
    )
    g.add_argument("--chunk-sweep", action="store_true", help="also time/measure several chunk sizes at one size")
    g.add_argument("--chunk-sweep-size", type=int, default=128, help="cube size of the chunk sweep")
    g.add_argument("--chunk-sweep-width", type=int, default=None, help="width of the chunk sweep (default: as cubes)")
    g.add_argument(
        "--chunk-sweep-enc",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64, 128],
        help="encoder chunks of the chunk sweep (paired with --chunk-sweep-dec)",
    )
    g.add_argument("--chunk-sweep-dec", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    g.add_argument("--bf16", action="store_true", help="run encode/decode under bf16 autocast (CUDA)")
    g.add_argument("--worker-timeout", type=float, default=900, help="seconds allowed per CPU subprocess")
    g.add_argument("--check-depths", type=int, nargs="+", default=[20, 36, 64], help="depths of the equality check")
    g.add_argument("--check-hw", type=int, default=32, help="slice size of the equality check")
    g.add_argument("--check-width", type=int, default=16, help="width of the equality check")
    g.add_argument("--check-enc-chunks", type=int, nargs="+", default=[4, 8, 12, 16, 24])
    g.add_argument("--check-dec-chunks", type=int, nargs="+", default=[1, 2, 3, 5])
    g.add_argument("--no-check", action="store_true", help="skip the equality check")
    t = parser.add_argument_group("train mode")
    t.add_argument("--datalist", default=None, help="a prepared datalist (default: the demo dataset, see --demo-dir)")
    t.add_argument(
        "--demo-dir",
        default=os.path.join(tempfile.gettempdir(), "wdm3d_vae_bench_demo"),
        help="where the demo dataset is written (reused if already there)",
    )
    t.add_argument("--demo-cases", type=int, default=24)
    t.add_argument("--demo-resolution", type=int, default=4, choices=[1, 2, 4], help="4: 32^3 volumes, 2: 64^3")
    t.add_argument("--key", default="t1n", help="datalist key of the volumes")
    t.add_argument("--train-size", type=int, default=None, help="pad/crop volumes to this cube (default: as prepared)")
    t.add_argument("--models", nargs="+", default=None, help="train only models whose name contains one of these")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch", type=int, default=2)
    t.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (the wfvae demo config's)")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval (default steps / 4)")
    t.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        old = argparse.Namespace(**saved["settings"])
        parts = [f"<!-- python benchmarks/vae.py {' '.join(saved.get('argv', []))} -->", ""]
        if "memory_rows" in saved:
            parts.append(
                markdown_memory(saved["memory_rows"], saved.get("chunk_checks", []), saved["environment"], old)
            )
        if "train" in saved:
            parts.append(markdown_train(saved["train"], saved["environment"]))
        text = "\n".join(parts)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(text)
        print(text)
        return saved
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device; use --device cpu")
    if args.bf16 and device.type != "cuda":
        parser.error("--bf16 is for CUDA (CPU bf16 convolutions are not what this benchmark measures)")
    if args.enc_chunk % 2**LEVELS:
        parser.error(f"--enc-chunk must be a multiple of {2**LEVELS}")
    args.threads = args.threads or os.cpu_count() or 1
    cuda = device.type == "cuda"
    if args.tiny:
        args.sizes, args.depths, args.repeats, args.sweep_repeats = [16, 32], [16, 32], 1, 1
        args.check_depths, args.check_hw, args.check_width = [12], 8, 4
        args.check_enc_chunks, args.check_dec_chunks = [4, 8], [1, 2]
        args.chunk_sweep_size, args.chunk_sweep_enc, args.chunk_sweep_dec = 16, [4, 8], [1, 2]
        args.steps, args.eval_every, args.log_every = min(args.steps, 3), 3, 1
        args.train_size, args.demo_cases = args.train_size or 16, min(args.demo_cases, 4)
    args.depth_hw = args.depth_hw or (8 if args.tiny else 256 if cuda else 128)
    args.depth_width = args.depth_width or (4 if args.tiny else 128 if cuda else 16)
    args.eval_every = args.eval_every or max(1, args.steps // 4)
    widths = _widths(args.widths, args.sizes, cuda, args.tiny)
    env = environment(device, args.threads)
    print(json.dumps(env), flush=True)
    result: dict = {
        "environment": env,
        "argv": list(argv),
        "settings": {k: v for k, v in vars(args).items()},
        "widths": widths,
    }
    md = [f"<!-- python benchmarks/vae.py {' '.join(argv)} -->", ""]

    def write() -> None:  # after every part, so a timeout keeps what was measured
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write("\n".join(md))

    if args.mode in ("memory", "all"):
        jobs = [
            {
                "set": "cube",
                "shape": [n, n, n],
                "width": w,
                "enc_chunk": args.enc_chunk,
                "dec_chunk": args.dec_chunk,
                "repeats": args.repeats,
            }
            for n in args.sizes
            for w in widths[n]
        ]
        if not args.no_sweep:
            jobs += [
                {
                    "set": "sweep",
                    "shape": [d, args.depth_hw, args.depth_hw],
                    "width": args.depth_width,
                    "enc_chunk": args.enc_chunk,
                    "dec_chunk": args.dec_chunk,
                    "repeats": args.sweep_repeats,
                }
                for d in args.depths
            ]
        if args.chunk_sweep:
            n = args.chunk_sweep_size
            w = args.chunk_sweep_width or widths.get(n, [args.depth_width])[0]
            for i, (ec, dc) in enumerate(zip(args.chunk_sweep_enc, args.chunk_sweep_dec)):
                jobs.append(
                    {
                        "set": "chunks",
                        "shape": [n, n, n],
                        "width": w,
                        "enc_chunk": ec,
                        "dec_chunk": dc,
                        "repeats": args.sweep_repeats,
                        "whole": i == 0,
                    }
                )
        with tempfile.TemporaryDirectory(prefix="wdm3d_vae_bench_") as tmp:
            rows = []
            for label in ("cube", "sweep", "chunks"):  # written after each set, so a timeout keeps what was measured
                rows += run_jobs([j for j in jobs if j["set"] == label], args, tmp)
                result["memory_rows"] = rows
                write()
        checks = [] if args.no_check else check_chunks(args)
        result["chunk_checks"] = checks
        md.append(markdown_memory(rows, checks, env, args))
        write()
        print(md[-1], flush=True)
    if args.mode in ("train", "all"):
        result["train"] = run_train(args)
        md.append(markdown_train(result["train"], env))
        write()
        print(md[-1], flush=True)
    return result


if __name__ == "__main__":
    main()
