"""Time the 3D Haar DWT / IDWT against a plain copy and against naive per-axis implementations.

The transform is memory-bound, so copying a tensor of the same size (into a freshly allocated tensor, as the
transform must) is its physical floor. Printed: median milliseconds and the ratios the targets are stated in
(DWT <= 2x copy, DWT+IDWT round trip <= 4x copy).

    python benchmarks/wavelets.py                      # CPU, 64^3 / 128^3 / 256^3, fp32
    python benchmarks/wavelets.py --device cuda        # GPU: fused Triton kernel vs the torch path, + equality checks
    python benchmarks/wavelets.py --markdown out.md    # also write a Markdown table

On a GPU a single 128^3 volume is 8 MB: the copy takes microseconds, less than launching a kernel from Python, so
wall-clock time per call measures the launch overhead, not the transform. The GPU table therefore gives the GPU
time per call, from CUDA graphs of 20 back-to-back calls (launch overhead removed), beside the eager wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from wdm3d import wavelets as wv
from wdm3d.wavelets import _generic_forward, dwt3d, idwt3d


def naive_matrix_dwt(x: torch.Tensor) -> torch.Tensor:
    """Per-axis dense Haar matrices built on every call (the approach WDM's code takes), then matmuls along each
    axis and a stack of the 8 subbands. Written here only as a baseline."""

    def mats(n: int):
        lo = np.zeros((n // 2, n))
        hi = np.zeros((n // 2, n))
        for i in range(n // 2):
            lo[i, 2 * i] = lo[i, 2 * i + 1] = 1 / np.sqrt(2)
            hi[i, 2 * i], hi[i, 2 * i + 1] = 1 / np.sqrt(2), -1 / np.sqrt(2)
        return (
            torch.as_tensor(lo, dtype=x.dtype, device=x.device),
            torch.as_tensor(hi, dtype=x.dtype, device=x.device),
        )

    d, h, w = x.shape[-3:]
    (ld, hd), (lh, hh), (lw, hw) = mats(d), mats(h), mats(w)
    bands = []
    for md in (ld, hd):
        a = torch.einsum("id,bcdhw->bcihw", md, x)
        for mh in (lh, hh):
            b = torch.einsum("jh,bcihw->bcijw", mh, a)
            for mw in (lw, hw):
                bands.append(torch.einsum("kw,bcijw->bcijk", mw, b))
    return torch.cat(bands, dim=1)


def timeit(fn, x, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        out = fn(x)
        del out
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x)
        sync()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times) * 1e3


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------------------------
# GPU: fused Triton kernel vs the torch path
# ----------------------------------------------------------------------------------------------------------------------


def gpu_time_ms(fn, x, calls: int = 20, replays: int = 7) -> float:
    """GPU milliseconds per ``fn(x)``: a CUDA graph of ``calls`` back-to-back calls, median over ``replays``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn(x)
    del out
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del g
    return statistics.median(times)


def torch_path_dwt(x):
    return wv._haar_forward_kernel(x)


def torch_path_idwt(y):
    return wv._haar_inverse_kernel(y)


def fused(split: bool, inverse: bool):
    def fn(v):
        wv._FUSED_CONFIG["split"] = split
        return wv._fused_haar_launch(v, inverse)

    return fn


def equality_checks(device: torch.device) -> list[dict]:
    """Fused kernel vs the torch path (and vs float64) on this GPU, both kernel layouts, three dtypes, odd shapes."""
    rows = []
    default_split = wv._FUSED_CONFIG["split"]
    for split in (True, False):
        for shape in [(2, 3, 8, 6, 4), (1, 2, 16, 10, 300), (10, 1, 128, 128, 128)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                torch.manual_seed(0)
                x = torch.randn(shape, device=device).to(dtype)
                y = fused(split, False)(x)
                y_torch = torch_path_dwt(x)
                y_ref = torch_path_dwt(x.double())
                # the fused kernel computes half types in float32 and rounds once: compare with that rounding too
                y_once = torch_path_dwt(x.float()).to(dtype)
                r = fused(split, True)(y)
                r_torch = torch_path_idwt(y)
                rows.append(
                    {
                        "split": split,
                        "shape": list(shape),
                        "dtype": str(dtype).replace("torch.", ""),
                        "dwt_max_abs_vs_torch_path": (y.double() - y_torch.double()).abs().max().item(),
                        "dwt_equal_torch_path": bool(torch.equal(y, y_torch)),
                        "dwt_equal_fp32_rounded_once": bool(torch.equal(y, y_once)),
                        "dwt_max_abs_vs_fp64": (y.double() - y_ref).abs().max().item(),
                        "torch_path_dwt_max_abs_vs_fp64": (y_torch.double() - y_ref).abs().max().item(),
                        "idwt_max_abs_vs_torch_path": (r.double() - r_torch.double()).abs().max().item(),
                        "round_trip_max_abs": (r.double() - x.double()).abs().max().item(),
                    }
                )
    wv._FUSED_CONFIG["split"] = default_split
    # autograd through the public functions (fused path): gradient of the DWT is the IDWT of the upstream gradient
    x = torch.randn(2, 2, 16, 16, 16, device=device, requires_grad=True)
    g = torch.randn(2, 16, 8, 8, 8, device=device)
    (dwt3d(x) * g).sum().backward()
    rows.append(
        {
            "check": "grad(DWT) == IDWT(grad), cuda fp32",
            "max_abs": (x.grad - idwt3d(g)).abs().max().item(),
            "fused_used": wv.fused_haar_available(x),
            "fused_failed": wv._fused_haar["failed"],
        }
    )
    return rows


def cuda_main(args, device: torch.device) -> None:
    env = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "fused_available": wv.fused_haar_available(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    checks = equality_checks(device) if env["fused_available"] else []
    for c in checks:
        print(json.dumps(c), flush=True)
    header = (
        "| input | dtype | copy us | DWT fused us | IDWT fused us | DWT+IDWT fused us | DWT / copy "
        "| round trip / copy | DWT fused (strided) us | DWT torch path us | round trip torch path us "
        "| DWT eager wall us (fused / torch path / copy) |"
    )
    rows = [
        f"Device: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}. GPU time per "
        "call from CUDA graphs of 20 calls (median of 7 replays); eager wall time: median of "
        f"{args.repeats} synchronised calls.",
        "",
        header,
        "|" + "---|" * 12,
    ]
    print(header, flush=True)
    results = []
    split_default = wv._FUSED_CONFIG["split"]
    for batch, n in [(1, s) for s in args.sizes] + [(10, 128)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, 1, n, n, n, device=device).to(dtype)
            y = torch_path_dwt(x)
            copy = gpu_time_ms(torch.clone, x) * 1e3
            if env["fused_available"]:
                fwd = gpu_time_ms(fused(split_default, False), x) * 1e3
                inv = gpu_time_ms(fused(split_default, True), y) * 1e3
                rt = gpu_time_ms(lambda v: fused(split_default, True)(fused(split_default, False)(v)), x) * 1e3
                other = gpu_time_ms(fused(not split_default, False), x) * 1e3
                wv._FUSED_CONFIG["split"] = split_default
            else:
                fwd = inv = rt = other = float("nan")
            tfwd = gpu_time_ms(torch_path_dwt, x) * 1e3
            trt = gpu_time_ms(lambda v: torch_path_idwt(torch_path_dwt(v)), x) * 1e3
            wall = [timeit(f, x, args.repeats, device) * 1e3 for f in (dwt3d, torch_path_dwt, torch.clone)]
            row = (
                f"| ({batch}, 1, {n}^3) | {str(dtype).replace('torch.', '')} | {copy:.1f} | {fwd:.1f} | {inv:.1f} "
                f"| {rt:.1f} | {fwd / copy:.2f} | {rt / copy:.2f} | {other:.1f} | {tfwd:.1f} | {trt:.1f} "
                f"| {wall[0]:.0f} / {wall[1]:.0f} / {wall[2]:.0f} |"
            )
            rows.append(row)
            results.append(
                {
                    "batch": batch,
                    "size": n,
                    "dtype": str(dtype),
                    "copy_us": copy,
                    "dwt_fused_us": fwd,
                    "idwt_fused_us": inv,
                    "round_trip_fused_us": rt,
                    ("dwt_fused_strided_us" if split_default else "dwt_fused_split_us"): other,
                    "dwt_torch_path_us": tfwd,
                    "round_trip_torch_path_us": trt,
                    "wall_us_fused_torch_copy": wall,
                }
            )
            print(row, flush=True)
            del x, y
            torch.cuda.empty_cache()
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(rows) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "equality": checks, "timings": results}, fh, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-naive", action="store_true", help="skip the slow naive baselines")
    parser.add_argument("--markdown", default=None, help="write the table to this Markdown file")
    parser.add_argument("--json", default=None, help="(GPU) write timings and the equality checks to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        cuda_main(args, device)
        return

    header = (
        "| size | copy ms | DWT ms | IDWT ms | DWT+IDWT ms | DWT / copy | round trip / copy "
        "| naive matrices ms (x DWT) | per-axis pytorch_wavelets ms (x DWT) |"
    )
    rows = [
        f"Device: {machine(device)}; fp32, one (1, 1, N, N, N) volume; median of {args.repeats}.",
        "",
        header,
        "|" + "---|" * 9,
    ]
    print(rows[0])
    print(header)
    for n in args.sizes:
        x = torch.randn(1, 1, n, n, n, device=device)
        y = dwt3d(x)
        copy = timeit(torch.clone, x, args.repeats, device)
        fwd = timeit(dwt3d, x, args.repeats, device)
        inv = timeit(idwt3d, y, args.repeats, device)
        rt = timeit(lambda v: idwt3d(dwt3d(v)), x, args.repeats, device)
        if args.no_naive:
            naive = axis = "-"
        else:
            reps = max(3, args.repeats // 3)
            nm = timeit(naive_matrix_dwt, x, reps, device)
            pa = timeit(lambda v: _generic_forward(v, "haar", "periodization"), x, reps, device)
            naive, axis = f"{nm:.1f} ({nm / fwd:.1f}x)", f"{pa:.1f} ({pa / fwd:.1f}x)"
        row = (
            f"| {n}^3 | {copy:.2f} | {fwd:.2f} | {inv:.2f} | {rt:.2f} | {fwd / copy:.2f} | {rt / copy:.2f} "
            f"| {naive} | {axis} |"
        )
        rows.append(row)
        print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
