"""Time the 3D Haar DWT / IDWT against a plain copy and against naive per-axis implementations.

The transform is memory-bound, so copying a tensor of the same size (into a freshly allocated tensor, as the
transform must) is its physical floor. Printed: median milliseconds and the ratios the targets are stated in
(DWT <= 2x copy, DWT+IDWT round trip <= 4x copy).

    python benchmarks/wavelets.py                      # CPU, 64^3 / 128^3 / 256^3, fp32
    python benchmarks/wavelets.py --device cuda        # GPU
    python benchmarks/wavelets.py --markdown out.md    # also write a Markdown table
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

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
        return (torch.as_tensor(lo, dtype=x.dtype, device=x.device), torch.as_tensor(hi, dtype=x.dtype, device=x.device))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-naive", action="store_true", help="skip the slow naive baselines")
    parser.add_argument("--markdown", default=None, help="write the table to this Markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    header = (
        "| size | copy ms | DWT ms | IDWT ms | DWT+IDWT ms | DWT / copy | round trip / copy "
        "| naive matrices ms (x DWT) | per-axis pytorch_wavelets ms (x DWT) |"
    )
    rows = [f"Device: {machine(device)}; fp32, one (1, 1, N, N, N) volume; median of {args.repeats}.", "",
            header, "|" + "---|" * 9]
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
        row = (f"| {n}^3 | {copy:.2f} | {fwd:.2f} | {inv:.2f} | {rt:.2f} | {fwd / copy:.2f} | {rt / copy:.2f} "
               f"| {naive} | {axis} |")
        rows.append(row)
        print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
