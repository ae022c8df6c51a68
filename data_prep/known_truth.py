"""Procedural 3D volumes whose generating parameters follow known laws: data with a known truth for the quality
benchmark (``benchmarks/quality.py``).

Each volume (``n^3``, ``n`` = 32 or 64, values in [0, 1], background exactly 0) holds, in units of ``s = n / 32``
voxels:

- a sphere ("organ") of radius ``r ~ exp(N(log 5.5, 0.22^2))``, clipped to ``[3.5, 9]`` (**long-tailed**), centred
  at the grid centre plus an offset ``U(-3, 3)`` per axis (**position**), with intensity ``a`` drawn from the
  **bimodal** mixture ``0.5 N(0.45, 0.03^2) + 0.5 N(0.70, 0.03^2)``;
- ``k ~ Binomial(3, 0.4)`` bright lesions (**count**: 0 to 3; radius 1.2, intensity 1.0) at ``0.6 r`` from the
  centre, 120 degrees apart in the axial plane, with a random phase;
- **texture** inside the organ: Gaussian noise smoothed with sigma 1 voxel, rescaled to a standard deviation
  ``tau ~ U(0.01, 0.05)``;
- a **thin structure**: a rod one voxel thick (``s`` voxels) along the first axis at ``(2, 2) s`` in the other two,
  of intensity 0.6 and length ``L ~ U(8, 24)``, starting at ``4 s``.

Edges are partial-volume (a voxel's value falls linearly over one voxel across the boundary). :func:`measure`
re-measures every parameter from a volume the way it was made, so a generator's samples can be compared with the law
parameter by parameter (:func:`measure` on real draws gives the reference, which cancels the measurement's own bias).

    >>> vols, params = make_volumes(4, size=32, seed=0)
    >>> vols.shape, sorted(params)[:3]
    ((4, 32, 32, 32), ['center', 'count', 'intensity'])

:func:`make_pairs` makes (reference, target) pairs for a conditioning (IP-Adapter) benchmark: the parameters named
in ``shared`` are identical within a pair, everything else (the other parameters, the lesions' phase and the
texture's noise field) is drawn independently for the two volumes.

    >>> refs, tgts, ref_params, tgt_params = make_pairs(2, seed=0, shared=("radius",))
    >>> bool((ref_params["radius"] == tgt_params["radius"]).all())
    True
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["PARAMETERS", "SHAREABLE", "make_pairs", "make_volumes", "measure", "measure_many"]

#: The generating parameters that :func:`measure` recovers, in report order.
PARAMETERS: tuple[str, ...] = ("radius", "intensity", "center", "count", "texture", "rod_length")

#: The names :func:`make_pairs` accepts in ``shared``: the drawn parameters (``"offset"`` is the organ's position,
#: reported as ``"center"``, so ``"center"`` is accepted as the same parameter). The lesions' phase and the noise
#: field are never shared.
SHAREABLE: tuple[str, ...] = ("radius", "intensity", "offset", "center", "count", "texture", "rod_length")

_LESION_RADIUS = 1.2
_LESION_VALUE = 1.0
_ROD_VALUE = 0.6
_ROD_START = 4


def _check_size(size: int) -> float:
    if size not in (32, 64):
        raise ValueError(f"size must be 32 or 64, got {size!r}.")
    return size / 32


def _draw(rng: np.random.Generator) -> dict:
    radius = float(np.clip(math.exp(rng.normal(math.log(5.5), 0.22)), 3.5, 9.0))
    mode = rng.random() < 0.5
    return {
        "radius": radius,
        "intensity": float(rng.normal(0.45 if mode else 0.70, 0.03)),
        "offset": rng.uniform(-3, 3, size=3),
        "count": int(rng.binomial(3, 0.4)),
        "phase": float(rng.uniform(0, 2 * math.pi)),
        "texture": float(rng.uniform(0.01, 0.05)),
        "rod_length": float(rng.uniform(8, 24)),
    }


def _render(p: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    s = size / 32
    grid = np.stack(np.meshgrid(*(np.arange(size) + 0.5,) * 3, indexing="ij"))
    centre = size / 2 + p["offset"] * s
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    organ = np.clip(p["radius"] * s - dist + 0.5, 0, 1)
    noise = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), sigma=s)
    noise *= p["texture"] / noise.std()
    vol = organ * (p["intensity"] + noise)
    for j in range(p["count"]):
        angle = p["phase"] + 2 * math.pi * j / 3
        at = centre + 0.6 * p["radius"] * s * np.array([0.0, math.cos(angle), math.sin(angle)])
        d = np.sqrt(((grid - at[:, None, None, None]) ** 2).sum(0))
        lesion = np.clip(_LESION_RADIUS * s - d + 0.5, 0, 1)
        vol = vol * (1 - lesion) + _LESION_VALUE * lesion
    t = max(1, round(s))
    start = round(_ROD_START * s)
    length = p["rod_length"] * s
    x = np.arange(size) + 0.5 - start
    rod = np.clip(np.minimum(x, length - x + 1), 0, 1)  # partial volume at the far end
    lo = round(2 * s)
    vol[:, lo : lo + t, lo : lo + t] = np.maximum(vol[:, lo : lo + t, lo : lo + t], _ROD_VALUE * rod[:, None, None])
    return np.clip(vol, 0, 1).astype(np.float32)


def make_volumes(num: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``num`` volumes ``(num, size, size, size)`` in [0, 1] and their generating parameters.

    Args:
        num: how many volumes.
        size: 32 or 64 (the laws are stated for 32 and scale with the grid).
        seed: the random stream (volume ``i`` depends only on ``seed`` and ``i``).

    Returns:
        volumes, and ``{name: (num,) array}`` for every name in :data:`PARAMETERS` (radius and rod length in voxels
        of this grid; centre as the offset along the first axis in voxels).
    """
    s = _check_size(size)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}.")
    vols = np.empty((num, size, size, size), np.float32)
    params: dict[str, list] = {k: [] for k in PARAMETERS}
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        p = _draw(rng)
        vols[i] = _render(p, size, rng)
        _record(params, p, s)
    return vols, {k: np.asarray(v, np.float64) for k, v in params.items()}


def _record(params: dict[str, list], p: dict, s: float) -> None:
    """Append one draw ``p`` to ``params`` in the units :func:`make_volumes` reports (grid voxels)."""
    params["radius"].append(p["radius"] * s)
    params["intensity"].append(p["intensity"])
    params["center"].append(p["offset"][0] * s)
    params["count"].append(p["count"])
    params["texture"].append(p["texture"])
    params["rod_length"].append(p["rod_length"] * s)


def _shared_keys(shared) -> tuple[str, ...]:
    """The keys of :func:`_draw` named by ``shared`` (a name or a sequence of names from :data:`SHAREABLE`)."""
    names = (shared,) if isinstance(shared, str) else tuple(shared)
    for name in names:
        if name not in SHAREABLE:
            raise ValueError(f"shared: unknown parameter {name!r}; accepted names are {', '.join(SHAREABLE)}.")
    return tuple(dict.fromkeys("offset" if name == "center" else name for name in names))


def make_pairs(
    num: int, size: int = 32, seed: int = 0, shared=("radius", "intensity")
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``num`` (reference, target) pairs of volumes that share the parameters named in ``shared``.

    Within a pair the shared parameters are identical; every other parameter (of offset, count, texture, rod
    length), the lesions' phase and the texture's noise field are drawn independently from the same laws as
    :func:`make_volumes`. Pair ``i`` depends only on ``seed`` and ``i``: the reference and the target use the two
    children ``np.random.SeedSequence([seed, i]).spawn(2)``, so their streams differ from each other and from volume
    ``i`` of ``make_volumes(seed=seed)`` (which uses that parent sequence itself). (``default_rng([seed, i, 0])``
    would not do: numpy pads short entropy with zeros, so it is the same stream as ``default_rng([seed, i])``.)

    Args:
        num: how many pairs.
        size: 32 or 64.
        seed: the random stream.
        shared: the names shared within a pair, from :data:`SHAREABLE` (``"center"`` and ``"offset"`` both name the
            organ's position, shared on all three axes); a single name may be given as a string, ``()`` gives
            independent pairs.

    Returns:
        ``(references, targets, reference_params, target_params)``: two ``(num, size, size, size)`` arrays in
        [0, 1] and two ``{name: (num,) array}`` dicts as :func:`make_volumes` returns.

    Raises:
        ValueError: for a name in ``shared`` that is not in :data:`SHAREABLE`, or a bad ``num`` or ``size``.
    """
    s = _check_size(size)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}.")
    keys = _shared_keys(shared)
    refs = np.empty((num, size, size, size), np.float32)
    tgts = np.empty_like(refs)
    ref_params: dict[str, list] = {k: [] for k in PARAMETERS}
    tgt_params: dict[str, list] = {k: [] for k in PARAMETERS}
    for i in range(num):
        ref_rng, tgt_rng = (np.random.default_rng(c) for c in np.random.SeedSequence([seed, i]).spawn(2))
        p_ref = _draw(ref_rng)
        p_tgt = _draw(tgt_rng)
        for k in keys:
            p_tgt[k] = np.copy(p_ref[k]) if k == "offset" else p_ref[k]
        refs[i] = _render(p_ref, size, ref_rng)
        tgts[i] = _render(p_tgt, size, tgt_rng)
        _record(ref_params, p_ref, s)
        _record(tgt_params, p_tgt, s)
    ref_arrays = {k: np.asarray(v, np.float64) for k, v in ref_params.items()}
    return refs, tgts, ref_arrays, {k: np.asarray(v, np.float64) for k, v in tgt_params.items()}


def measure(volume: np.ndarray) -> dict[str, float]:
    """Re-measure the generating parameters of one volume ``(n, n, n)`` (n = 32 or 64).

    Returns every name of :data:`PARAMETERS` (NaN where the volume has no organ) and ``valid``: 1.0 when the volume
    has exactly one component of an organ's size (a sphere of radius 3 to 10 at 32^3) and nothing else outside the
    rod, else 0.0 (a "broken shape").

    Args:
        volume: one generated volume, ``(n, n, n)``.
    """
    v = np.asarray(volume, np.float64)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise ValueError(f"volume must be a cube (n, n, n), got {v.shape}.")
    n = v.shape[0]
    s = _check_size(n)
    out = {k: math.nan for k in PARAMETERS}
    t = max(1, round(s))
    lo = round(2 * s)
    out["rod_length"] = float(np.clip(v[:, lo : lo + t, lo : lo + t].mean(axis=(1, 2)) / _ROD_VALUE, 0, 1).sum())
    body = v.copy()
    body[:, : round(4 * s), : round(4 * s)] = 0  # the rod's corner
    labels, num = ndimage.label(body > 0.2)
    if num == 0:
        out["valid"] = 0.0
        return out
    sizes = ndimage.sum_labels(np.ones_like(body), labels, index=np.arange(1, num + 1))
    organ = labels == (1 + int(np.argmax(sizes)))
    smallest, largest = (4 / 3 * math.pi * (r * s) ** 3 for r in (3.0, 10.0))  # the law's radii are 3.5 to 9
    out["valid"] = float(int((sizes >= 8).sum()) == 1 and smallest <= sizes.max() <= largest)
    bright = organ & (v > 0.88)
    lesion_labels, num_lesions = ndimage.label(bright)
    lesion_sizes = ndimage.sum_labels(np.ones_like(v), lesion_labels, index=np.arange(1, num_lesions + 1))
    out["count"] = float((lesion_sizes >= 2 * s**3).sum()) if num_lesions else 0.0
    core = ndimage.binary_erosion(organ, iterations=max(1, round(s))) & ~ndimage.binary_dilation(
        bright, iterations=max(1, round(s))
    )
    if core.sum() < 8:
        core = organ & ~bright
    if core.sum() < 2:
        return out
    a = float(np.median(v[core]))
    out["intensity"] = a
    out["texture"] = float(v[core].std())
    # organ volume: voxels past half the organ's intensity (partial volume is linear), lesions counted as organ
    filled = organ & (v > a / 2)
    out["radius"] = float((3 * filled.sum() / (4 * math.pi)) ** (1 / 3))
    centroid = ndimage.center_of_mass(filled.astype(np.float64))
    out["center"] = float(centroid[0] + 0.5 - n / 2)
    return out


def measure_many(volumes: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`measure` over ``(N, n, n, n)`` (or ``(N, 1, n, n, n)``): ``{name: (N,) array}`` incl. ``valid``.

    Args:
        volumes: the volumes, with or without a channel axis.
    """
    volumes = np.asarray(volumes)
    if volumes.ndim == 5:
        volumes = volumes[:, 0]
    rows = [measure(v) for v in volumes]
    return {k: np.asarray([r[k] for r in rows], np.float64) for k in (*PARAMETERS, "valid")}
