"""MS-SSIM diversity: mean 3D MS-SSIM over pairs of volumes of one set, with a bootstrap confidence interval.

The protocol of WDM / HA-GAN: MONAI's ``MultiScaleSSIMMetric(spatial_dims=3, data_range=1, kernel_size=7)`` over
pairs of generated volumes (lower = more diverse); the real-vs-real value is reported beside it, and the goal is to
match it. WDM averages all ordered pairs; MS-SSIM is symmetric in its two inputs, so unordered pairs give the same
mean at half the cost. The default here is ``K`` random unordered pairs plus a bootstrap CI over them.

Size limit: MONAI refuses volumes whose side ``s`` has ``s // (n_scales - 1)**2 <= kernel_size - 1`` (5 scales,
kernel 7: sides under 112 voxels). With ``adapt=True`` fewer scales are used (the first weights, renormalised to
sum to 1), then a smaller odd kernel; the settings used are part of the result. ``adapt=False`` raises an error that
names the minimum size instead.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "MS_SSIM_WEIGHTS",
    "ms_ssim_min_size",
    "ms_ssim_settings",
    "sample_pairs",
    "pairwise_ms_ssim",
    "bootstrap_ci",
    "pair_bootstrap_ci",
    "ms_ssim_diversity",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def ms_ssim_min_size(kernel_size: int = 7, num_scales: int = 5) -> int:
    """Smallest side (voxels) that MS-SSIM with ``num_scales`` scales and ``kernel_size`` accepts.

    MONAI's own check is ``side // (num_scales - 1)**2 > kernel_size - 1``; the coarsest scale must also still hold a
    full kernel after ``num_scales - 1`` halvings. 5 scales, kernel 7: 112; kernel 11: 176.
    """
    return kernel_size * max(1, (num_scales - 1) ** 2, 2 ** (num_scales - 1))


def ms_ssim_settings(
    shape: Sequence[int], kernel_size: int = 7, weights: Sequence[float] = MS_SSIM_WEIGHTS, adapt: bool = True
) -> dict:
    """Scales, weights and kernel that fit volumes of ``shape`` ``(D, H, W)``; see the module docstring.

    Returns:
        ``{"kernel_size", "weights", "num_scales", "adapted" (bool), "note" (what was changed, or "")}``.
    """
    side = min(int(s) for s in shape)
    if side >= ms_ssim_min_size(kernel_size, len(weights)):
        return {
            "kernel_size": kernel_size,
            "weights": list(weights),
            "num_scales": len(weights),
            "adapted": False,
            "note": "",
        }
    if not adapt:
        raise ValueError(
            f"MS-SSIM with {len(weights)} scales and kernel_size {kernel_size} needs every side >= "
            f"{ms_ssim_min_size(kernel_size, len(weights))} voxels; these volumes are {tuple(shape)}. Use larger volumes, "
            "or adapt=True (the default of `wdm3d evaluate` without --no-ms-ssim-adapt; bundle key ms_ssim_adapt) to use "
            "fewer scales / a smaller kernel (then not comparable with papers)."
        )
    for n in range(len(weights) - 1, 0, -1):
        if side >= ms_ssim_min_size(kernel_size, n):
            w = np.asarray(weights[:n], float)
            w = (w / w.sum()).round(6).tolist()
            return {
                "kernel_size": kernel_size,
                "weights": w,
                "num_scales": n,
                "adapted": True,
                "note": f"volumes of side {side} < {ms_ssim_min_size(kernel_size, len(weights))}: {n} scale(s) "
                f"with the first weights renormalised, kernel {kernel_size}; not comparable with papers",
            }
    k = side if side % 2 else side - 1
    if k < 3:
        raise ValueError(
            f"volumes of shape {tuple(shape)} are too small for MS-SSIM (a side of at least 3 voxels is needed)."
        )
    return {
        "kernel_size": k,
        "weights": [1.0],
        "num_scales": 1,
        "adapted": True,
        "note": f"volumes of side {side} < {kernel_size}: single-scale SSIM with kernel {k}; not comparable with papers",
    }


def sample_pairs(n: int, pairs: int | str = 100, seed: int = 0) -> list[tuple[int, int]]:
    """Unordered pairs ``(i, j)``, ``i < j``: ``"all"``, or ``pairs`` drawn without replacement (all if fewer exist)."""
    if n < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 volumes, got {n}.")
    total = n * (n - 1) // 2
    if pairs == "all":
        return list(itertools.combinations(range(n), 2))
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be a positive integer or 'all', got {pairs!r}.")
    if pairs >= total:
        return list(itertools.combinations(range(n), 2))
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(total, size=pairs, replace=False))
    # flat index -> (i, j) in the order of itertools.combinations
    out, idx, base = [], 0, 0
    for i in range(n - 1):
        row = n - 1 - i
        while idx < len(flat) and flat[idx] < base + row:
            out.append((i, i + 1 + int(flat[idx] - base)))
            idx += 1
        base += row
    return out


@torch.no_grad()
def pairwise_ms_ssim(
    volumes: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    settings: dict,
    batch_size: int = 1,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """MS-SSIM of each pair, ``(len(pairs),)``; batches of pairs run in parallel CPU threads (or on ``device``).

    Args:
        volumes: ``(N, 1, D, H, W)`` in [0, 1] (``data_range`` 1).
        pairs: index pairs.
        settings: from :func:`ms_ssim_settings`.
        batch_size: pairs per MONAI call (1 suits CPU threads; more on a GPU).
        num_threads: CPU threads, one pair batch each, torch's intra-op threads set to 1 meanwhile (default: the
            number of cores); torch's convolutions release the GIL.
        device: None: CUDA when present.
    """
    # monai takes seconds to import: kept off `import wdm3d.metrics`
    from monai.metrics.regression import compute_ms_ssim

    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    chunks = [list(pairs[s : s + batch_size]) for s in range(0, len(pairs), batch_size)]

    def run(chunk):
        a = torch.stack([volumes[i] for i, _ in chunk]).to(device)
        b = torch.stack([volumes[j] for _, j in chunk]).to(device)
        val = compute_ms_ssim(
            a, b, spatial_dims=3, data_range=1.0, kernel_size=settings["kernel_size"], weights=settings["weights"]
        )
        return val.reshape(-1).double().cpu().numpy()

    threads = min(num_threads or (os.cpu_count() or 1), len(chunks))
    if device.type == "cuda" or threads < 2:
        results = [run(c) for c in chunks]
    else:
        # one pair per thread, torch's intra-op threads off meanwhile: MS-SSIM's single-channel 3D convolutions use
        # intra-op threads poorly (measured at 128^3 on 2 cores: 0.43 s per pair sequential, 0.37-0.42 threaded)
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                results = list(pool.map(run, chunks))
        finally:
            torch.set_num_threads(intra)
    return np.concatenate(results) if results else np.zeros(0)


def bootstrap_ci(
    values: np.ndarray, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pair_bootstrap_ci(
    values: np.ndarray,
    pairs: np.ndarray,
    n_volumes: int,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of the mean of a pairwise statistic, resampling *volumes*, not pairs.

    Pairs that share a volume are not independent (a volume unlike the others lowers all its pairs), so resampling
    pairs as if they were gives intervals several times too narrow. Each resample draws ``n_volumes`` volumes with
    replacement; a pair ``(i, j)`` counts ``w_i * w_j`` times (``w``: how often each was drawn), which is the mean
    over the pairs of distinct draws. Resamples in which no measured pair was drawn are skipped.

    Args:
        values: the statistic of each pair, ``(P,)``.
        pairs: the volume indices of each pair, ``(P, 2)``.
        n_volumes: how many volumes the pairs were drawn from.
    """
    values = np.asarray(values, float)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(values) == 0:
        return (math.nan, math.nan)
    if len(values) != len(pairs):
        raise ValueError(f"one pair per value: got {len(values)} values and {len(pairs)} pairs.")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_volumes, np.full(n_volumes, 1.0 / n_volumes), size=n_boot).astype(float)
    weights = counts[:, pairs[:, 0]] * counts[:, pairs[:, 1]]
    total = weights.sum(axis=1)
    means = (weights @ values)[total > 0] / total[total > 0]
    if len(means) == 0:
        return (float(values.mean()), float(values.mean()))
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def ms_ssim_diversity(
    volumes: torch.Tensor | np.ndarray,
    pairs: int | str = 100,
    kernel_size: int = 7,
    adapt: bool = True,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int | None = None,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Mean MS-SSIM over pairs of one set of volumes, with a bootstrap CI (lower = more diverse).

    Args:
        volumes: ``(N, 1, D, H, W)`` or ``(N, D, H, W)`` in [0, 1] (see :func:`wdm3d.metrics.normalize_volumes`).
        pairs: number of random unordered pairs (all if fewer exist), or ``"all"``.
        kernel_size: Gaussian kernel (the protocol: 7).
        adapt: fewer scales / smaller kernel for small volumes instead of an error (stated in the result).
        confidence: CI level.
        n_boot: bootstrap resamples (over the volumes, see :func:`pair_bootstrap_ci`).
        seed: pair sampling and bootstrap.
        batch_size: pairs per MONAI call (default: 1 on CPU, 4 on CUDA).
        num_threads, device: see :func:`pairwise_ms_ssim`.

    Returns:
        ``{"mean", "std", "ci_low", "ci_high", "confidence", "n_pairs", "n_volumes", "pairs" ("all" or
        "random"), "kernel_size", "weights", "num_scales", "adapted", "note", "values"}``.
    """
    x = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes, dtype=torch.float32)
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"volumes must be (N, D, H, W) or (N, 1, D, H, W), got shape {tuple(x.shape)}.")
    settings = ms_ssim_settings(x.shape[2:], kernel_size, adapt=adapt)
    index_pairs = sample_pairs(x.shape[0], pairs, seed)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    batch_size = batch_size or (4 if device.type == "cuda" else 1)
    values = pairwise_ms_ssim(x, index_pairs, settings, batch_size, num_threads, device)
    lo, hi = pair_bootstrap_ci(values, np.asarray(index_pairs), int(x.shape[0]), confidence, n_boot, seed)
    total = x.shape[0] * (x.shape[0] - 1) // 2
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n_pairs": len(index_pairs),
        "n_volumes": int(x.shape[0]),
        "pairs": "all" if len(index_pairs) == total else "random",
        **settings,
        "values": values.tolist(),
    }
