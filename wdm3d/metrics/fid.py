"""3D FID: input normalisation presets, batched feature extraction, and a stable Fréchet distance.

FID (Heusel et al. 2017, eq. 6) between Gaussians fitted to two feature sets:

    d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

MONAI's ``FIDMetric`` takes ``scipy.linalg.sqrtm`` of the non-symmetric product ``S_1 S_2`` and drops an imaginary
part afterwards; with fewer volumes than feature dimensions (2048 for MedicalNet) the product is singular and that
route is fragile. Here ``tr((S_1 S_2)^{1/2}) = tr((A S_2 A)^{1/2})`` with ``A = S_1^{1/2}``: both matrices are
symmetric positive semi-definite, so two ``eigh`` calls in float64 give it with real eigenvalues (negatives from
round-off clipped to 0) and no complex leftovers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "NORMALIZATION_PRESETS",
    "normalize_volumes",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
]

# the intensity range each protocol feeds to MedicalNet: WDM [0, 1], HA-GAN [-1, 1]
NORMALIZATION_PRESETS = {"wdm": (0.0, 1.0), "hagan": (-1.0, 1.0)}


def normalize_volumes(
    volumes: np.ndarray | torch.Tensor, value_range: Sequence[float], preset: str = "wdm"
) -> torch.Tensor:
    """Map intensities from ``value_range`` to the preset's range, clipping outside values.

    Args:
        volumes: ``(N, D, H, W)`` (or ``(N, 1, D, H, W)``) in the data's intensity units.
        value_range: ``(low, high)`` of the data (e.g. the datalist's ``intensity_range``; HU window for CT).
        preset: ``"wdm"`` -> [0, 1], ``"hagan"`` -> [-1, 1].

    Returns:
        float32 tensor ``(N, 1, D, H, W)``.
    """
    if preset not in NORMALIZATION_PRESETS:
        raise ValueError(f"preset must be one of {sorted(NORMALIZATION_PRESETS)}, got {preset!r}.")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
    x = torch.as_tensor(np.asarray(volumes) if not isinstance(volumes, torch.Tensor) else volumes, dtype=torch.float32)
    if x.ndim == 4:
        x = x[:, None]
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"volumes must be (N, D, H, W) or (N, 1, D, H, W), got shape {tuple(x.shape)}.")
    a, b = NORMALIZATION_PRESETS[preset]
    return ((x - lo) / (hi - lo)).clamp(0, 1) * (b - a) + a


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module,
    volumes: np.ndarray | torch.Tensor,
    value_range: Sequence[float],
    preset: str = "wdm",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Features of every volume, batched, on ``device`` (default: CUDA when present), as float64 ``(N, F)``.

    Args:
        extractor: ``(B, 1, D, H, W) -> (B, F)`` (e.g. :class:`wdm3d.networks.MedicalNetResNet50`).
        volumes: ``(N, D, H, W)`` in data units (normalised per batch with :func:`normalize_volumes`).
        value_range, preset: see :func:`normalize_volumes`.
        batch_size: volumes per forward pass.
        device: where to run.
        progress: a tqdm bar.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    extractor = extractor.to(device).eval()
    n = len(volumes)
    out = []
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, desc="features", unit="batch")
    for s in starts:
        x = normalize_volumes(volumes[s : s + batch_size], value_range, preset).to(device)
        out.append(extractor(x).double().cpu().numpy())
    return np.concatenate(out, axis=0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``(N, F)`` features, in float64, sized to the real N."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2 volumes, got shape {f.shape}.")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf; check the input volumes and the extractor.")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues below 0 from round-off set to 0)."""
    sym = (matrix + matrix.T) / 2
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance (squared, as FID reports it) between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``; shapes ``(F,)`` and ``(F, F)``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"shapes do not fit: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}.")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)  # round-off can leave -1e-12 for identical sets


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> dict:
    """FID between two feature sets ``(N_real, F)`` and ``(N_fake, F)``, with the N of each side reported.

    A FID from few volumes is biased upwards (and noisy); publications use ~1000. ``n_real`` / ``n_fake`` say what
    this value rests on.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) with the same F, got {real.shape} and {fake.shape}.")
    mu_r, s_r = feature_statistics(real)
    mu_f, s_f = feature_statistics(fake)
    return {
        "fid": frechet_distance(mu_r, s_r, mu_f, s_f),
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "feature_dim": int(real.shape[1]),
    }
