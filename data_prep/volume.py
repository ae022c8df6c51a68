"""Array-and-affine maths shared by the preparation tools: checks, intensity scaling, centre pad/crop, pooling.

Every function takes a ``(X, Y, Z)`` array with its 4x4 voxel-to-world affine and returns the new affine with the
new array, so that each output voxel keeps its place in the world (see :func:`pad_or_crop` and :func:`pool_volume`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "SEG_POOL_MODES",
    "check_array3d",
    "check_affine",
    "check_percentiles",
    "check_spatial_size",
    "check_pool",
    "normalize_intensity",
    "pad_or_crop",
    "pool_volume",
    "voxel_spacing",
]

#: How the label map is pooled (never averaged).
SEG_POOL_MODES: tuple[str, ...] = ("mode", "max", "nearest")


def check_array3d(x: np.ndarray, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``x`` is a 3D numpy array.

    Args:
        x: the array to check.
        name: what it is called in the message (``"x"``, ``"seg"``).
    """
    if not isinstance(x, np.ndarray) or x.ndim != 3:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 3D numpy array (X, Y, Z), got {type(x).__name__} with shape {shape}.")


def check_affine(affine: np.ndarray) -> np.ndarray:
    """``affine`` as a float64 4x4 matrix; a ValueError unless it is finite and 4x4.

    Args:
        affine: a voxel-to-world matrix.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 voxel-to-world matrix, got shape {a.shape}.")
    return a


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats with ``0 <= low < high <= 100``; a ValueError saying what is wrong otherwise.

    Args:
        percentiles: the clip percentiles.
    """
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ValueError(
            f"percentiles must be two numbers (low, high) such as (0.1, 99.9), got {percentiles!r}."
        ) from None
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(
            f"percentiles must satisfy 0 <= low < high <= 100, got ({lo}, {hi}); (0, 100) disables clipping."
        )
    return lo, hi


def check_spatial_size(spatial_size: Sequence[int]) -> tuple[int, int, int]:
    """Three integers, each positive or -1 (keep that axis); a ValueError saying what is wrong otherwise.

    Args:
        spatial_size: the target ``(X, Y, Z)``.
    """
    try:
        size = tuple(int(s) for s in spatial_size)
    except (TypeError, ValueError):
        raise ValueError(f"spatial_size must be three integers (X, Y, Z), got {spatial_size!r}.") from None
    fractional = any(float(s) != float(o) for s, o in zip(size, spatial_size))
    if len(size) != 3 or any(s == 0 or s < -1 for s in size) or fractional:
        raise ValueError(
            f"spatial_size must be three positive integers (X, Y, Z), -1 keeping that axis as it is, "
            f"got {spatial_size!r}."
        )
    return size  # type: ignore[return-value]


def check_pool(pool: int) -> int:
    """``pool`` as an int >= 1; a ValueError otherwise (a bool is not a pooling factor).

    Args:
        pool: the pooling factor.
    """
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1:
        raise ValueError(f"pool must be an integer >= 1 (1: no pooling, 2: 256^3 -> 128^3), got {pool!r}.")
    return int(pool)


def normalize_intensity(x: np.ndarray, percentiles: Sequence[float] = (0.1, 99.9)) -> np.ndarray:
    """Clip to percentiles of the whole volume (background included), then min-max to [0, 1] (WDM's preprocessing).

    Args:
        x: image, any shape, real-valued and finite.
        percentiles: ``(low, high)`` in [0, 100]; the clip bounds are ``np.percentile(x, low)`` and
            ``np.percentile(x, high)`` (linear interpolation). ``(0, 100)`` is a plain min-max.

    Returns:
        float32 array of the same shape in [0, 1]; all zeros when the clipped volume is constant.
    """
    lo_p, hi_p = check_percentiles(percentiles)
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError("normalize_intensity got an empty array.")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the image has {int(np.size(x) - np.isfinite(x).sum())} non-finite values (NaN/inf).")
    lo, hi = (float(v) for v in np.percentile(x, (lo_p, hi_p)))
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    out = (np.clip(x.astype(np.float64, copy=False), lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32)


def pad_or_crop(
    x: np.ndarray, affine: np.ndarray, spatial_size: Sequence[int], value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-pad (with ``value``) or centre-crop each axis of ``x`` to ``spatial_size``, and move the affine with it.

    Where ``n`` voxels become ``s``: padding puts ``(s - n) // 2`` voxels before and the rest after; cropping drops
    ``(n - s) // 2`` voxels before. The new first voxel is old voxel ``-pad_before`` (or ``+crop_before``), so the
    new affine is ``affine @ translate(offset)`` and every kept voxel keeps its world position.

    Args:
        x: ``(X, Y, Z)`` array.
        affine: its 4x4 voxel-to-world matrix.
        spatial_size: target ``(X, Y, Z)``; ``-1`` keeps that axis.
        value: the padding value (0: background after [0, 1] scaling, and the label map's background).

    Returns:
        ``(array of shape spatial_size, new 4x4 affine)``.
    """
    check_array3d(x, "x")
    affine = check_affine(affine)
    size = check_spatial_size(spatial_size)
    offset = np.zeros(3)
    crop, pad = [], []
    for ax, (n, s) in enumerate(zip(x.shape, size)):
        s = n if s == -1 else s
        if s <= n:
            start = (n - s) // 2
            crop.append(slice(start, start + s))
            pad.append((0, 0))
            offset[ax] = start
        else:
            before = (s - n) // 2
            crop.append(slice(None))
            pad.append((before, s - n - before))
            offset[ax] = -before
    out = x[tuple(crop)]
    if any(p != (0, 0) for p in pad):
        out = np.pad(out, pad, mode="constant", constant_values=value)
    shift = np.eye(4)
    shift[:3, 3] = offset
    return np.ascontiguousarray(out), affine @ shift


def pool_volume(
    x: np.ndarray, affine: np.ndarray, factor: int, mode: str = "mean", pad_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pool non-overlapping ``factor^3`` blocks: ``(X, Y, Z) -> (X/f, Y/f, Z/f)``, and update the affine.

    Output voxel ``j`` covers input voxels ``f*j .. f*j + f - 1``, so its centre is input voxel ``f*j + (f - 1)/2``:
    the new affine is ``affine @ [[f, 0, 0, (f-1)/2], [0, f, 0, (f-1)/2], [0, 0, f, (f-1)/2], [0, 0, 0, 1]]``
    (voxel size times ``f``, first centre moved by half a block). An axis that is not a multiple of ``f`` is padded
    at its end with ``pad_value`` first (which does not move the affine).

    Args:
        x: ``(X, Y, Z)`` array.
        affine: its 4x4 voxel-to-world matrix.
        factor: integer block size ``f`` >= 1 (1 returns the input unchanged).
        mode: ``"mean"`` (images), or for label maps ``"mode"`` (most frequent label of the block, ties to the
            larger label, so small lesions are not erased by a tie with background), ``"max"``, or ``"nearest"``
            (the voxel at offset ``f // 2`` in each block, the one nearest the block centre).
        pad_value: value of the end padding.

    Returns:
        ``(pooled array, new 4x4 affine)``; ``"mean"`` gives float32, the label modes keep the input dtype.
    """
    check_array3d(x, "x")
    affine = check_affine(affine)
    f = check_pool(factor)
    if mode not in ("mean",) + SEG_POOL_MODES:
        raise ValueError(f"mode must be 'mean' (images) or one of {SEG_POOL_MODES} (label maps), got {mode!r}.")
    if f == 1:
        return x, affine
    extra = [(0, (-n) % f) for n in x.shape]
    if any(e for _, e in extra):
        x = np.pad(x, extra, mode="constant", constant_values=pad_value)
    X, Y, Z = (n // f for n in x.shape)
    if mode == "nearest":
        o = f // 2
        out = x[o::f, o::f, o::f]
    else:
        blocks = x.reshape(X, f, Y, f, Z, f)
        if mode == "mean":
            out = blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
        elif mode == "max":
            out = blocks.max(axis=(1, 3, 5))
        else:
            blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(X, Y, Z, f**3)
            out = np.zeros((X, Y, Z), dtype=x.dtype)
            best = np.full((X, Y, Z), -1, dtype=np.int32)
            for label in np.unique(x)[::-1]:  # descending, and strict '>' below: ties go to the larger label
                count = np.count_nonzero(blocks == label, axis=-1)
                better = count > best
                out[better] = label
                best[better] = count[better]
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2.0
    return np.ascontiguousarray(out), affine @ scale


def voxel_spacing(affine: np.ndarray) -> list[float]:
    """The voxel size along each array axis (column norms of the affine), rounded to 6 decimals for the reports.

    Args:
        affine: a voxel-to-world matrix.
    """
    return [round(float(v), 6) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]
