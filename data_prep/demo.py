"""The embedded demo dataset: BraTS-like brain MRI built from a real template, no downloads.

    python -m data_prep.demo --dst DIR [--num-cases 16] [--seed 0] [--no-lesions] [--resolution {1,2,4}] [--raw-only]

Source: the MNI152 2009a symmetric T1 template and its grey/white-matter probability maps
(``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197x233x189 at 1 mm, RAS) that ship inside the
nilearn wheel. They are located with ``importlib.util.find_spec`` without importing nilearn (its import is slow).

Per case (case ``i`` depends only on ``(seed, i)``, so a smaller ``num_cases`` gives the first cases of a larger one):

- brain mask (skull-stripping): ``fill_holes((T1 > 0.05) & dilate(smooth(GM + WM) > 0.1))``, largest component.
  nilearn's copy of the template is already zero outside the brain, so ``T1 > 0.05`` alone would do; the
  tissue-map term keeps skull and scalp out should a template with them ever be shipped;
- ``t1n``: the template inside the mask; ``t2w``: a synthetic T2 contrast from the tissue maps with
  ``CSF = mask - GM - WM``: CSF bright (1.0), GM intermediate (~0.55), WM dark (~0.38), weights jittered per case;
- lesion (unless ``lesions=False``): an irregular, randomly oriented ellipsoid in cerebral white matter with BraTS
  2023 nested labels, 2 = oedema (outer), 3 = enhancing rim, 1 = necrotic core; it lowers T1 (core darkest) and
  raises T2 (oedema and core bright, rim intermediate). Without lesions the ``seg`` files are written all-zero, so
  the layout stays the same;
- torchio augmentation, one draw per case applied to every modality of it (a ``tio.Subject``): RandomAffine (small
  rotation, scaling, shift), mild RandomElasticDeformation, RandomBiasField, RandomGamma, RandomNoise; the
  background is set back to exactly 0 afterwards with the transformed brain mask, as in skull-stripped BraTS;
- written in a BraTS-like geometry: 240x240x155 at 1 mm (``resolution=1``), 120x120x78 at 2 mm (``resolution=2``,
  the default) or 60x60x39 at 4 mm (``resolution=4``, the tiny setting for tests), centred on the brain, keeping
  the template's RAS orientation and MNI world coordinates (the template is average-pooled to 2 or 4 mm first);
  images as int16 with a random per-case intensity scale (like scanner units), ``seg`` as uint8.

:func:`make_demo_dataset` writes that raw folder to ``DST/raw`` and prepares it with
:func:`data_prep.brats.prepare_brats` (the code real data goes through) into ``DST/prepared``: WDM preset, centre
pad to 256 mm (``256 / resolution`` voxels per axis), then average-pool by 2: 128^3 at 2 mm, 64^3 at 4 mm (the
default), or 32^3 at 8 mm (tiny).

Time on a 2-core CPU: ``make_demo_dataset(num_cases=16)`` (resolution 2) about 17-28 s; the tiny setting
(``num_cases=4, resolution=4``) about 5 s; ``resolution=1`` about 16 s per case.

One module because it is one concept, the demo dataset; template, lesion, augmentation and layout are the steps of
one seeded case and read in order.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from wdm3d.io.nifti import save_nifti

from .brats import prepare_brats
from .volume import pool_volume

__all__ = [
    "TEMPLATE_FILES",
    "RAW_SHAPES",
    "template_paths",
    "demo_case_id",
    "make_demo_raw",
    "make_demo_dataset",
    "main",
]

#: The nilearn files the demo is built from (in ``nilearn/datasets/data``).
TEMPLATE_FILES: dict[str, str] = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Raw volume shape per resolution (mm): BraTS' 240x240x155 at 1 mm, and half of it at 2 mm.
RAW_SHAPES: dict[int, tuple[int, int, int]] = {1: (240, 240, 155), 2: (120, 120, 78), 4: (60, 60, 39)}

_MARKER = "demo_info.json"
_MARGIN_MM = 12.0  # room around the brain for rotation / scaling / shifts before the BraTS-like crop
_CASE_RE = re.compile(r"^BraTS-GLI-\d{5}-000$")


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 T1 / GM / WM files inside the installed nilearn package (nilearn is not imported).

    Raises:
        FileNotFoundError: nilearn is not installed, or its wheel lacks one of :data:`TEMPLATE_FILES`.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The demo dataset is built from the MNI152 template shipped in the nilearn wheel, and nilearn is not "
            "installed: pip install nilearn"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn is installed but lacks the template file(s) {missing}; reinstall it with: "
            "pip install --force-reinstall 'nilearn>=0.10'"
        )
    return paths


def demo_case_id(index: int) -> str:
    """Case id of demo case ``index``: ``BraTS-GLI-{index:05d}-000``.

    Args:
        index: the case index, from 0.
    """
    return f"BraTS-GLI-{int(index):05d}-000"


# --------------------------------------------------------------------------------------------------------------------
# the template at the working resolution (cached per process)
# --------------------------------------------------------------------------------------------------------------------


class _Template(NamedTuple):
    t1: np.ndarray  # (X, Y, Z) float32 in [0, 1], 0 outside the brain
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    affine: np.ndarray
    spacing: float
    lesion_centres: np.ndarray  # (N, 3) voxel indices where a lesion may be centred


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@functools.lru_cache(maxsize=2)
def _template(resolution: int) -> _Template:
    paths = template_paths()
    imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    affine = np.asarray(imgs["t1"].affine, dtype=np.float64)
    vol = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in imgs.items()}
    scale = {k: float(v.max()) or 1.0 for k, v in vol.items()}  # the wheel stores them as uint8 0..255
    t1, gm, wm = (vol[k] / scale[k] for k in ("t1", "gm", "wm"))
    support = ndi.binary_dilation(ndi.gaussian_filter(gm + wm, 2.0) > 0.1, iterations=2)
    brain = _largest_component(ndi.binary_fill_holes((t1 > 0.05) & support))
    soft = brain.astype(np.float32)
    if resolution != 1:
        f = int(resolution)
        # average-pool (partial volumes kept) rather than point-sample, so the 2 mm template is not aliased
        t1, _ = pool_volume(t1, affine, f)
        gm, _ = pool_volume(gm, affine, f)
        wm, _ = pool_volume(wm, affine, f)
        soft, affine = pool_volume(soft, affine, f)
        brain = soft > 0.5
    # crop to the brain's bounding box plus a margin for the augmentation to move into (less to resample)
    spacing = float(resolution)
    margin = int(np.ceil(_MARGIN_MM / spacing))
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, gm, wm, soft, brain = t1[box], gm[box], wm[box], soft[box], brain[box]
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    t1 = np.where(brain, t1, 0.0).astype(np.float32)
    gm, wm = gm * brain, wm * brain
    csf = np.clip(soft - gm - wm, 0.0, 1.0) * brain
    # lesion centres: white matter at least 18 mm inside the brain, in the cerebrum (MNI z > -10 mm)
    depth = ndi.distance_transform_edt(brain, sampling=spacing)
    z_world = affine[2, 2] * np.arange(brain.shape[2]) + affine[2, 3]
    ok = (wm > 0.5) & (depth > 18.0) & (z_world[None, None, :] > -10.0)
    centres = np.argwhere(ok)
    return _Template(
        t1, gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32), brain, affine, spacing, centres
    )


# --------------------------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------------------------


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _add_lesion(tpl: _Template, t1: np.ndarray, t2: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> None:
    """Paint one nested lesion (labels 2 > 3 > 1 from outside in) into ``seg`` and change ``t1`` / ``t2`` in place."""
    sp = tpl.spacing
    centre = tpl.lesion_centres[rng.integers(len(tpl.lesion_centres))]
    radii = rng.uniform(12.0, 24.0, size=3) / sp  # oedema semi-axes, voxels
    half = int(np.ceil(1.5 * radii.max()))
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, seg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), axis=-1) - centre
    local = grid @ _random_rotation(rng)  # coordinates along the ellipsoid's own axes
    dist = np.sqrt(((local / radii) ** 2).sum(-1))
    noise = ndi.gaussian_filter(rng.standard_normal(dist.shape).astype(np.float32), 4.0 / sp)
    noise /= noise.std() + 1e-8
    dist = dist * (1.0 + 0.15 * noise)  # irregular border
    brain = tpl.brain[box]
    tissue = (tpl.gm[box] + tpl.wm[box]) > 0.2
    rim = rng.uniform(0.45, 0.65)  # enhancing region, relative to the oedema
    core = rim * rng.uniform(0.35, 0.7)  # necrotic core inside it
    oedema = (dist < 1.0) & brain & tissue
    enhancing = (dist < rim) & brain
    necrosis = (dist < core) & brain
    labels = np.zeros(dist.shape, dtype=np.uint8)
    labels[oedema] = 2
    labels[enhancing] = 3
    labels[necrosis] = 1
    seg[box] = labels

    def soft(mask: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(mask.astype(np.float32), 0.8)

    s_any, s_enh, s_nec = soft(labels > 0), soft(enhancing), soft(necrosis)
    tex = 0.04 * noise
    a, b = t1[box], t2[box]
    a *= 1.0 - 0.25 * s_any  # oedema: T1-hypointense (white matter drops to about grey-matter level)
    a *= 1.0 - 0.1 * s_enh  # no contrast agent in t1n: the rim stays a little darker
    a[:] = a * (1.0 - s_nec) + s_nec * (0.25 + tex)  # necrosis: close to CSF
    b[:] = b * (1.0 - s_any) + s_any * (0.8 + tex)  # oedema: T2-hyperintense
    b[:] = b * (1.0 - s_enh) + s_enh * (0.62 + tex)
    b[:] = b * (1.0 - s_nec) + s_nec * (0.95 + tex)  # fluid-like core
    a *= brain
    b *= brain


def _augment(arrays: dict[str, np.ndarray], affine: np.ndarray, seed: int, resolution: int) -> tuple[dict, np.ndarray]:
    """One torchio draw applied to every volume of a case, then crop/pad to the BraTS-like grid around the brain."""
    import torchio as tio  # about 2 s to import: paid when a case is built, not by --help or a refused argument

    # the brain mask rides in the label map as label 4 (the lesion lies inside it): one resampling fewer
    labels = np.where(arrays["seg"] > 0, arrays["seg"], 4 * arrays["brain"]).astype(np.uint8)
    subject = tio.Subject(
        t1n=tio.ScalarImage(tensor=torch.from_numpy(arrays["t1n"])[None], affine=affine),
        t2w=tio.ScalarImage(tensor=torch.from_numpy(arrays["t2w"])[None], affine=affine),
        labels=tio.LabelMap(tensor=torch.from_numpy(labels)[None], affine=affine),
    )
    transform = tio.Compose(
        [
            tio.RandomAffine(scales=(0.92, 1.04), degrees=6, translation=4, default_pad_value=0.0, copy=False),
            tio.RandomElasticDeformation(num_control_points=7, max_displacement=4.0, copy=False),
            tio.RandomBiasField(coefficients=0.25, order=2, copy=False),
            tio.RandomGamma(log_gamma=0.12, copy=False),
            tio.RandomNoise(std=(0.005, 0.02), copy=False),
            tio.CropOrPad(RAW_SHAPES[resolution], padding_mode=0, mask_name="labels", copy=False),
        ],
        copy=False,
    )
    with torch.random.fork_rng(devices=[]):  # torchio draws from torch's global RNG; keep the caller's untouched
        torch.manual_seed(seed)
        out = transform(subject)
    lab = out["labels"].data[0].numpy().astype(np.uint8)
    brain = lab > 0
    result = {
        "t1n": np.clip(out["t1n"].data[0].numpy(), 0.0, None) * brain,
        "t2w": np.clip(out["t2w"].data[0].numpy(), 0.0, None) * brain,
        "seg": np.where(lab == 4, 0, lab).astype(np.uint8),
    }
    return result, np.asarray(out["t1n"].affine, dtype=np.float64)


def _make_case(index: int, seed: int, lesions: bool, resolution: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Arrays (``t1n``, ``t2w`` in scanner-like units, ``seg``) and the affine of demo case ``index``."""
    tpl = _template(resolution)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    t1 = tpl.t1.copy()
    w = {"csf": 1.0, "gm": 0.55 + 0.04 * rng.standard_normal(), "wm": 0.38 + 0.03 * rng.standard_normal()}
    t2 = (w["csf"] * tpl.csf + w["gm"] * tpl.gm + w["wm"] * tpl.wm).astype(np.float32)
    seg = np.zeros(t1.shape, dtype=np.uint8)
    if lesions:
        _add_lesion(tpl, t1, t2, seg, rng)
    arrays = {"t1n": t1, "t2w": t2, "seg": seg, "brain": tpl.brain}
    torch_seed = int(rng.integers(2**31 - 1))
    out, affine = _augment(arrays, tpl.affine, torch_seed, resolution)
    for key, lo_hi in (("t1n", (400.0, 1500.0)), ("t2w", (600.0, 2500.0))):
        out[key] = np.rint(out[key] * rng.uniform(*lo_hi)).astype(np.int16)  # scanner-like units
    return out, affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    save_nifti(data, affine, path, dtype=data.dtype)  # atomic, sform/qform code 1, mm units


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------


def _check_args(num_cases: int, seed: int, resolution: int) -> None:
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or not 1 <= num_cases <= 99999:
        raise ValueError(f"num_cases must be an integer in 1..99999, got {num_cases!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if resolution not in RAW_SHAPES:
        raise ValueError(f"resolution must be one of {sorted(RAW_SHAPES)} (mm), got {resolution!r}.")


def _prepare_folder(folder: Path, keep: set[str]) -> None:
    """Create ``folder``, or reuse it if it is a demo folder (marker present): remove stale demo cases from it."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} exists and is not a folder; pick another --dst.")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / _MARKER).is_file():
            raise ValueError(
                f"{str(folder)!r} is not empty and was not written by data_prep.demo (no {_MARKER}); pick an empty "
                "or new folder so that nothing of yours is overwritten."
            )
        for child in folder.iterdir():
            if child.is_dir() and _CASE_RE.match(child.name) and child.name not in keep:
                shutil.rmtree(child)
    folder.mkdir(parents=True, exist_ok=True)


def _prepared_before_the_marker(prepared: Path, raw: Path) -> bool:
    """Whether ``prepared`` is an earlier demo's output written before the marker existed: its
    ``prepare_summary.json`` names this demo's raw folder as the source."""
    summary = prepared / "prepare_summary.json"
    if (prepared / _MARKER).is_file() or not summary.is_file():
        return False
    try:
        src = json.loads(summary.read_text()).get("src")
    except (OSError, ValueError):
        return False
    return bool(src) and Path(src).resolve() == Path(raw).resolve()


def make_demo_raw(
    dst: str | os.PathLike,
    num_cases: int = 16,
    seed: int = 0,
    lesions: bool = True,
    resolution: int = 2,
    progress: bool = True,
) -> Path:
    """Write a raw BraTS-2023-layout demo folder: ``dst/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t2w,seg}.nii.gz``.

    Args:
        dst: output folder; created, or reused if an earlier call wrote it (a ``demo_info.json`` marks it). A
            non-empty folder without that marker is refused, so nothing else gets overwritten.
        num_cases: number of cases (patients, one timepoint each).
        seed: the same seed gives identical arrays; case ``i`` depends only on ``(seed, i)``.
        lesions: paint a synthetic tumour into each case (labels 1/2/3); False writes all-zero ``seg`` files.
        resolution: voxel size in mm: 1 (240x240x155, like BraTS), 2 (120x120x78, about 8x faster; the default)
            or 4 (60x60x39: the tiny setting the tests use).
        progress: show a tqdm bar and print where the output went.

    Returns:
        ``dst`` as a Path.
    """
    _check_args(num_cases, seed, resolution)
    root = Path(dst)
    ids = [demo_case_id(i) for i in range(num_cases)]
    _prepare_folder(root, set(ids))
    info = {
        "source": "MNI152 2009a symmetric template, GM and WM maps from the nilearn wheel",
        "num_cases": int(num_cases),
        "seed": int(seed),
        "lesions": bool(lesions),
        "resolution_mm": int(resolution),
        "shape": list(RAW_SHAPES[resolution]),
        "cases": ids,
    }
    (root / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
    for i in tqdm(range(num_cases), desc="demo cases", unit="case", disable=not progress):
        arrays, affine = _make_case(i, seed, lesions, resolution)
        case_dir = root / ids[i]
        case_dir.mkdir(exist_ok=True)
        for key in ("t1n", "t2w", "seg"):
            _save(arrays[key], affine, case_dir / f"{ids[i]}-{key}.nii.gz")
    if progress:
        shape = "x".join(str(s) for s in RAW_SHAPES[resolution])
        print(f"Wrote {num_cases} raw demo cases (t1n, t2w, seg; {shape} at {resolution} mm) to {root}")
    return root


def make_demo_dataset(
    dst: str | os.PathLike,
    num_cases: int = 16,
    seed: int = 0,
    lesions: bool = True,
    resolution: int = 2,
    pool: int = 2,
    progress: bool = True,
) -> Path:
    """Write the raw demo to ``dst/raw`` and prepare it with :func:`~data_prep.brats.prepare_brats` into ``prepared/``.

    Preparation is WDM's: clip to the 0.1/99.9 percentiles, [0, 1], centre zero-pad to 256 mm (``256 / resolution``
    voxels per axis), average-pool by ``pool``: 64^3 at 4 mm for ``resolution=2`` (the default), 128^3 at 2 mm for
    ``resolution=1``, 32^3 at 8 mm for ``resolution=4``. The patient split (0.8 / 0.1 / 0.1) uses ``seed`` too.

    Args:
        dst: output folder (``raw/`` and ``prepared/`` are written inside it).
        num_cases, seed, lesions, resolution: as in :func:`make_demo_raw`.
        pool: pooling factor of the preparation (must divide ``256 / resolution``).
        progress: show progress bars and print where the output went.

    Returns:
        Path of ``dst/prepared/datalist.json``.
    """
    _check_args(num_cases, seed, resolution)
    size = 256 // resolution
    if isinstance(pool, bool) or not isinstance(pool, (int, np.integer)) or pool < 1 or size % pool:
        raise ValueError(f"pool must be an integer >= 1 that divides {size} (256 mm at {resolution} mm), got {pool!r}.")
    root = Path(dst)
    raw = make_demo_raw(
        root / "raw", num_cases=num_cases, seed=seed, lesions=lesions, resolution=resolution, progress=progress
    )
    prepared = root / "prepared"
    # drop cases an earlier, larger demo left behind, but only in a folder the demo wrote: real data prepared
    # there has the same case names and would otherwise be deleted or overwritten
    marker = json.dumps({"prepared_from": str(Path(raw).resolve())}, indent=2) + "\n"
    if _prepared_before_the_marker(prepared, raw):
        (prepared / _MARKER).write_text(marker)  # adopt it, so that _prepare_folder accepts it
    _prepare_folder(prepared, {demo_case_id(i) for i in range(num_cases)})
    (prepared / _MARKER).write_text(marker)
    summary = prepare_brats(
        raw, prepared, preset="wdm", spatial_size=(size,) * 3, pool=pool, seed=seed, progress=progress
    )
    return Path(summary["datalist"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo",
        description="Write the embedded demo dataset (BraTS-like T1/T2/seg built from the MNI152 template in the "
        "nilearn wheel; no downloads) and prepare it like real BraTS data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dst", required=True, help="output folder (raw/ and prepared/ are written inside it)")
    parser.add_argument("--num-cases", type=int, default=16, help="number of cases (default: 16)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed writes the same data (default: 0)"
    )
    parser.add_argument("--no-lesions", action="store_true", help="healthy brains (all-zero seg)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=2,
        choices=sorted(RAW_SHAPES),
        help="raw voxel size in mm: 1 (240x240x155, like BraTS), 2 (120x120x78; default) or "
        "4 (60x60x39, tiny, for tests)",
    )
    parser.add_argument("--raw-only", action="store_true", help="write only the raw BraTS-layout folder into --dst")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        num_cases=args.num_cases,
        seed=args.seed,
        lesions=not args.no_lesions,
        resolution=args.resolution,
        progress=not args.quiet,
    )
    try:
        if args.raw_only:
            out = make_demo_raw(args.dst, **kwargs)
        else:
            out = make_demo_dataset(args.dst, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Demo dataset ready in {time.perf_counter() - start:.1f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
