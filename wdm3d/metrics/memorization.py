"""Memorization audit: is a synthetic volume a copy of a training volume?

For each synthetic volume its nearest training volume by normalised cross-correlation (NCC, the Pearson correlation
of all voxels: 1 for an exact copy, unchanged by a global intensity scale/shift), and optionally by cosine similarity
of embeddings (e.g. the FID features). The reference is the real-to-real nearest-neighbour NCC (each training volume
against the other training volumes): a synthetic volume closer to a training scan than two different patients' scans
ever are is a suspected copy.

Threshold (``threshold=None``): halfway between the largest real-to-real NN NCC and 1, and at least ``min_threshold``
(0.95). An exact copy (NCC 1) is therefore always above it; a copy with slight noise is too while its NCC stays
above that midpoint. A fixed ``threshold`` can be given instead.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["standardize_flat", "ncc_matrix", "nearest_neighbours", "memorization_audit"]


def standardize_flat(volumes, downsample: int = 1) -> torch.Tensor:
    """``(N, D, H, W)`` -> ``(N, V)`` float32 rows with zero mean and unit norm (so that row dot products are NCCs).

    ``downsample`` > 1 average-pools by that factor first (faster, for large sets); constant volumes give zero rows.
    """
    x = torch.as_tensor(np.asarray(volumes, dtype=np.float32))
    if x.ndim == 5 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 4:
        raise ValueError(f"volumes must be (N, D, H, W), got shape {tuple(x.shape)}.")
    rows = []
    for v in x:  # one volume at a time in float64: no float64 copy of the whole set
        if downsample > 1:
            v = torch.nn.functional.avg_pool3d(v[None, None], downsample)[0, 0]
        flat = v.flatten().double()
        flat = flat - flat.mean()
        rows.append((flat / flat.norm().clamp_min(1e-12)).float())
    return torch.stack(rows)


@torch.no_grad()
def ncc_matrix(
    a: torch.Tensor, b: torch.Tensor, chunk: int = 32, device: str | torch.device | None = None
) -> np.ndarray:
    """NCC of every row of ``a`` ``(N, V)`` with every row of ``b`` ``(M, V)`` (both from :func:`standardize_flat`).

    Computed in chunks of ``chunk`` rows on ``device`` (default: CUDA when present), accumulated in float64 (a
    float32 dot product of two 128^3 rows is off by ~1e-5, enough for an exact copy to miss a threshold near
    1); returns float64 ``(N, M)``.
    """
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    out = np.zeros((a.shape[0], b.shape[0]))
    for i in range(0, a.shape[0], chunk):
        ai = a[i : i + chunk].to(device, torch.float64)
        for j in range(0, b.shape[0], chunk):
            out[i : i + chunk, j : j + chunk] = (ai @ b[j : j + chunk].to(device, torch.float64).T).cpu().numpy()
    return np.clip(out, -1.0, 1.0)


def nearest_neighbours(sim: np.ndarray, exclude_diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise most similar column: ``(index (N,), similarity (N,))``; the diagonal excluded for a set with itself."""
    sim = np.array(sim, dtype=np.float64)
    if exclude_diagonal:
        np.fill_diagonal(sim, -np.inf)
    idx = sim.argmax(axis=1)
    return idx, sim[np.arange(len(sim)), idx]


def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, float)
    return {
        "mean": float(v.mean()),
        "min": float(v.min()),
        "p05": float(np.quantile(v, 0.05)),
        "median": float(np.median(v)),
        "p95": float(np.quantile(v, 0.95)),
        "max": float(v.max()),
    }


def memorization_audit(
    fake,
    train,
    fake_names: list[str] | None = None,
    train_names: list[str] | None = None,
    threshold: float | None = None,
    min_threshold: float = 0.95,
    downsample: int = 1,
    fake_embeddings: np.ndarray | None = None,
    train_embeddings: np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Nearest training volume of each synthetic volume, compared with real-to-real nearest neighbours.

    Args:
        fake: ``(N, D, H, W)`` synthetic volumes.
        train: ``(M, D, H, W)`` training volumes (M >= 2 for the real-to-real reference).
        fake_names, train_names: labels for the listing (default: indices).
        threshold: NCC at or above which a synthetic volume is a suspected copy (None: see the module docstring).
        min_threshold: lower bound of the automatic threshold.
        downsample: average-pool factor before the NCC (1: full resolution).
        fake_embeddings, train_embeddings: optional ``(N, F)`` / ``(M, F)`` features; adds the nearest neighbour by
            cosine similarity.
        device: for the NCC products.

    Returns:
        ``{"threshold", "threshold_rule", "n_fake", "n_train", "copy_fraction", "suspected_copies" [{"fake", "train",
        "ncc"}], "fake_nn_ncc" / "real_nn_ncc" (summaries), "fake_nn_values", "real_nn_values",
        "fraction_closer_than_any_real_pair", "per_sample" [{"fake", "nearest_train", "ncc", ...}]}``.
    """
    f = standardize_flat(fake, downsample)
    t = standardize_flat(train, downsample)
    if f.shape[1] != t.shape[1]:
        raise ValueError(f"synthetic and training volumes differ in size ({f.shape[1]} vs {t.shape[1]} voxels).")
    if t.shape[0] < 2:
        raise ValueError("the memorization audit needs at least 2 training volumes (for the real-to-real reference).")
    fake_names = fake_names or [str(i) for i in range(f.shape[0])]
    train_names = train_names or [str(i) for i in range(t.shape[0])]
    idx_f, ncc_f = nearest_neighbours(ncc_matrix(f, t, device=device))
    _, ncc_r = nearest_neighbours(ncc_matrix(t, t, device=device), exclude_diagonal=True)
    real_max = float(ncc_r.max())
    if threshold is None:
        threshold = max(min_threshold, (real_max + 1.0) / 2)
        rule = f"max(min_threshold {min_threshold}, midpoint of the largest real-to-real NN NCC {real_max:.4f} and 1)"
    else:
        rule = "given"
    tol = 1e-6  # round-off of the unit rows (stored in float32): an exact copy must not miss a threshold of 1
    per_sample = [
        {
            "fake": fake_names[i],
            "nearest_train": train_names[int(idx_f[i])],
            "ncc": float(ncc_f[i]),
            "percentile_vs_real_nn": float((ncc_r < ncc_f[i]).mean() * 100),
        }
        for i in range(len(ncc_f))
    ]
    if fake_embeddings is not None and train_embeddings is not None:
        fe = np.asarray(fake_embeddings, np.float64)
        te = np.asarray(train_embeddings, np.float64)
        fe = fe / np.linalg.norm(fe, axis=1, keepdims=True).clip(1e-12)
        te = te / np.linalg.norm(te, axis=1, keepdims=True).clip(1e-12)
        idx_e, cos_e = nearest_neighbours(fe @ te.T)
        for i, row in enumerate(per_sample):
            row["nearest_train_embedding"] = train_names[int(idx_e[i])]
            row["embedding_cosine"] = float(cos_e[i])
    copies = [
        {"fake": r["fake"], "train": r["nearest_train"], "ncc": r["ncc"]}
        for r in per_sample
        if r["ncc"] >= threshold - tol
    ]
    copies.sort(key=lambda r: -r["ncc"])
    return {
        "threshold": float(threshold),
        "threshold_rule": rule,
        "downsample": downsample,
        "n_fake": int(f.shape[0]),
        "n_train": int(t.shape[0]),
        "copy_fraction": len(copies) / f.shape[0],
        "suspected_copies": copies,
        "fake_nn_ncc": _summary(ncc_f),
        "real_nn_ncc": _summary(ncc_r),
        "fraction_closer_than_any_real_pair": float((ncc_f > real_max).mean()),
        "fake_nn_values": ncc_f.tolist(),
        "real_nn_values": ncc_r.tolist(),
        "per_sample": per_sample,
    }
