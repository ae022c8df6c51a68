"""Paired reconstruction / synthesis metrics: PSNR, SSIM (3D) and MAE, optionally in physical units (HU).

Used by the autoencoder bundles (reconstruction of a validation set) and the image-conditioned synthesis bundle
(output against the true target). MONAI's ``SSIMMetric`` computes the 3D SSIM (Gaussian window 11, sigma 1.5,
k1 0.01, k2 0.03, as Wang et al. 2004); PSNR and MAE are one line each and are computed here per volume so that a
batch gives per-case values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["psnr", "ssim3d", "mae", "reconstruction_metrics", "summarize_cases"]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"the two volumes must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.ndim != 5:
        raise ValueError(f"volumes must have shape (B, C, D, H, W), got {tuple(x.shape)}.")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per volume, ``10 log10(data_range^2 / MSE)`` in dB.

    Args:
        x, y: ``(B, C, D, H, W)``.
        data_range: the span of valid intensities (2.0 for volumes in [-1, 1]).

    Returns:
        ``(B,)``; ``inf`` where the volumes are identical.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def ssim3d(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int = 11) -> torch.Tensor:
    """Structural similarity per volume (3D Gaussian window), averaged over channels: ``(B,)``.

    The window shrinks to the smallest spatial size (odd) for volumes smaller than ``win_size``.
    """
    # monai takes seconds to import: kept off `import wdm3d.metrics`
    from monai.metrics import SSIMMetric

    _check_pair(x, y)
    win = min(win_size, *x.shape[2:])
    win = win if win % 2 else win - 1
    if win < 3:
        raise ValueError(f"volumes of spatial size {tuple(x.shape[2:])} are too small for SSIM (need >= 3 per axis).")
    metric = SSIMMetric(spatial_dims=3, data_range=float(data_range), win_size=win)
    return metric(x.float(), y.float()).reshape(x.shape[0], -1).mean(1)


def mae(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean absolute error per volume, multiplied by ``scale`` (units per intensity unit, e.g. HU): ``(B,)``."""
    _check_pair(x, y)
    return (x.double() - y.double()).abs().flatten(1).mean(1).float() * float(scale)


def reconstruction_metrics(
    x: torch.Tensor,
    y: torch.Tensor,
    value_range: Sequence[float] = (-1.0, 1.0),
    physical_range: Sequence[float] | None = None,
    physical_unit: str = "HU",
) -> list[dict[str, float]]:
    """PSNR, SSIM and MAE of each volume of ``x`` against ``y``.

    Args:
        x: output volumes ``(B, C, D, H, W)`` (reconstructions, synthesised modalities).
        y: the truth, same shape.
        value_range: the intensity range both live in (clipped to it first; PSNR/SSIM use its width).
        physical_range: what ``value_range`` maps to physically (e.g. the HU window ``[-1000, 1000]`` of a CT
            datalist's ``hu_clip``); adds ``mae_<unit>``.
        physical_unit: name of that unit in the result keys.

    Returns:
        One dict per volume: ``psnr``, ``ssim``, ``mae`` (in ``value_range`` units) and optionally ``mae_hu``.
    """
    lo, hi = (float(v) for v in value_range)
    if not lo < hi:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
    x = x.detach().float().clamp(lo, hi).cpu()
    y = y.detach().float().clamp(lo, hi).cpu()
    width = hi - lo
    p, s, m = psnr(x, y, width), ssim3d(x, y, width), mae(x, y)
    out = [{"psnr": float(p[i]), "ssim": float(s[i]), "mae": float(m[i])} for i in range(x.shape[0])]
    if physical_range is not None:
        plo, phi = (float(v) for v in physical_range)
        scale = (phi - plo) / width
        for row, v in zip(out, m.tolist()):
            row[f"mae_{physical_unit.lower()}"] = v * scale
    return out


def summarize_cases(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean and standard deviation of each metric over cases: ``{"psnr_mean": ..., "psnr_std": ..., ...}``."""
    if not rows:
        raise ValueError("no cases to summarise.")
    out: dict[str, float] = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows if isinstance(r.get(key), (int, float))], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    out["num_cases"] = len(rows)
    return out
