"""Using a trained volume autoencoder on a dataset: reconstruct a split (PSNR / SSIM / MAE) and encode a dataset
to latents for latent wavelet diffusion.

Latents are written as 4D NIfTI files ``(d, h, w, Z)`` with the image's affine scaled by the downsampling factor
(a latent voxel covers ``f^3`` image voxels, its centre is the centre of that block), so they open in 3D Slicer on
top of the images. The latent datalist written by :func:`encode_dataset` records per-channel ``latent_shift`` and
``latent_scale`` (the training latents' mean and 1 / std, as the LDM scale factor) and where the latents came
from (autoencoder checkpoint and digest, the image datalist, image size and intensity range), so the latent
diffusion bundle can normalise for training and :class:`LatentDecoder` can undo it after sampling.

The latent operations themselves (:func:`encode_mean`, :func:`decode_latent`, :func:`reconstruct`,
:class:`LatentDecoder`, ...) live in :mod:`wdm3d.networks.vae_ops`, so that training and diffusion can use them
from below this layer; they are re-exported here because the bundles' configs name them as ``wdm3d.autoencoder.*``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from .artifacts import build_network, load_frozen, unwrap
from .data import load_datalist, volume_transforms
from .io import atomic_write_bytes, atomic_write_text, save_nifti
from .metrics import reconstruction_metrics, summarize_cases
from .networks.vae_ops import (
    AUTOENCODER_HINT,
    LatentDecoder,
    ReconstructionInferer,
    decode_latent,
    encode_mean,
    latent_affine,
    read_latent_stats,
    reconstruct,
)

__all__ = [
    "reconstruct",
    "encode_mean",
    "decode_latent",
    "latent_affine",
    "reconstruct_dataset",
    "encode_dataset",
    "read_latent_stats",
    "LatentDecoder",
    "build_network",
    "ReconstructionInferer",
]

logger = logging.getLogger(__name__)


def _case_name(entry: Mapping, key: str) -> str:
    if entry.get("case"):
        return str(entry["case"])
    src = entry[key]
    src = src[0] if isinstance(src, (list, tuple)) else src
    name = Path(str(src)).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _check_unique_names(named: Sequence[tuple[str, Mapping]], key: str, datalist: str | os.PathLike) -> None:
    """Two entries with the same output name would overwrite each other's file: refuse, naming both sources."""
    seen: dict[str, str] = {}
    for name, entry in named:
        src = str(entry.get(key))
        if seen.setdefault(name, src) != src:
            raise ValueError(
                f"{datalist}: {seen[name]} and {src} would both be written as case {name!r} (named after the file "
                "name); give each entry a unique 'case' (data_prep's datalists do)."
            )


def _entries(datalist: str | os.PathLike, split: str, key: str) -> list[dict]:
    # missing files become per-case failures (reported, the rest go on), not an error for the whole run
    return load_datalist(datalist, split, [key], check_files=False)


def reconstruct_dataset(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike,
    image_key: str,
    output_dir: str | os.PathLike,
    image_size: Sequence[int],
    intensity_range: Sequence[float] = (0.0, 1.0),
    split: str = "validation",
    physical_range: Sequence[float] | None = None,
    chunk: int | None = None,
    latent_chunk: int | None = None,
    save_volumes: bool = True,
    max_cases: int | None = None,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Reconstruct every volume of a datalist split and report PSNR / SSIM / MAE per case and on average.

    Volumes go through the training transforms (``intensity_range`` -> [-1, 1], pad/crop to ``image_size``); the
    metrics are computed in [-1, 1] (``mae_hu`` too when ``physical_range`` is given, e.g. the CT datalist's
    ``hu_clip``). Written to ``output_dir``: ``metrics.json`` (summary, per-case rows, failures, checkpoint),
    ``metrics.csv``, and with ``save_volumes`` ``<case>_recon.nii.gz`` in the data's intensity range and geometry.
    A case that fails to load or reconstruct is reported in ``failures`` and the rest continue.
    ``inferer`` (``(x, network) -> reconstruction``, e.g. :class:`ReconstructionInferer`) does the reconstruction;
    without one it is ``ReconstructionInferer(chunk, latent_chunk)``. Give the chunks to one or the other.

    Args:
        network: the autoencoder (the bundle's ``network_def``); its weights come from ``checkpoint``.
        checkpoint: a checkpoint file, or a training folder (its newest ``*.pt``).
        datalist, image_key, split: the volumes to reconstruct.
        output_dir: where the metrics and volumes go (created).
        image_size, intensity_range: the training transforms' size and the data's range.
        physical_range: the physical range ``intensity_range`` maps to (HU for CT), for ``mae_hu``.
        chunk, latent_chunk: slices encoded / decoded at a time (without ``inferer``).
        save_volumes: write each reconstruction as NIfTI.
        max_cases: only the first cases of the split.
        use_ema: prefer the checkpoint's EMA weights.
        device: None: CUDA when present.
        inferer: ``(x, network) -> reconstruction``.

    Returns:
        The ``metrics.json`` contents.
    """
    if inferer is None:
        inferer = ReconstructionInferer(chunk, latent_chunk)
    elif chunk is not None or latent_chunk is not None:
        raise ValueError(
            "Give chunk / latent_chunk to the inferer (ReconstructionInferer(chunk, latent_chunk)) or to "
            "reconstruct_dataset, not to both."
        )
    chunk, latent_chunk = getattr(inferer, "chunk", None), getattr(inferer, "latent_chunk", None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, info = load_frozen(network, checkpoint, use_ema, device, what="autoencoder", hint=AUTOENCODER_HINT)
    entries = _entries(datalist, split, image_key)[:max_cases]
    named = [(_case_name(entry, image_key), entry) for entry in entries]
    _check_unique_names(named, image_key, datalist)
    load = volume_transforms(image_key, image_size, intensity_range)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = (float(v) for v in intensity_range)
    rows, failures, t0 = [], [], time.perf_counter()
    for name, entry in named:
        try:
            x = load(dict(entry))[image_key]
            affine = x.affine.numpy() if hasattr(x, "affine") else np.eye(4)
            xt = torch.as_tensor(x)[None].float().to(device)
            recon = inferer(xt, network).float()
            row = {"case": name, **reconstruction_metrics(recon, xt, (-1.0, 1.0), physical_range)[0]}
            if save_volumes:
                vol = (recon[0, 0].clamp(-1, 1).cpu().numpy() + 1) / 2 * (hi - lo) + lo
                row["nifti"] = save_nifti(
                    vol, affine, out_dir / f"{name}_recon.nii.gz", description="reconstruction (wdm3d)"
                ).name
            rows.append(row)
        except Exception as err:  # one bad case must not end the run: report it and go on
            logger.error("Case %s (%s) failed: %s: %s", name, entry.get(image_key), type(err).__name__, err)
            failures.append({"case": name, "file": str(entry.get(image_key)), "error": f"{type(err).__name__}: {err}"})
    if not rows:
        raise RuntimeError(f"No case of split {split!r} in {datalist} could be reconstructed; failures: {failures}")
    metrics_rows = [{k: v for k, v in r.items() if k not in ("case", "nifti")} for r in rows]
    result = {
        "split": split,
        "datalist": str(datalist),
        "summary": summarize_cases(metrics_rows),
        "cases": rows,
        "failures": failures,
        "autoencoder": info,
        "chunk": chunk,
        "latent_chunk": latent_chunk,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    buf = io.StringIO()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "metrics.csv", buf.getvalue().encode())
    s = result["summary"]
    print(
        f"Reconstructed {len(rows)} volumes ({len(failures)} failed): PSNR {s['psnr_mean']:.2f} dB, "
        f"SSIM {s['ssim_mean']:.4f}, MAE {s['mae_mean']:.4f} -> {out_dir / 'metrics.json'}"
    )
    return result


def encode_dataset(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    datalist: str | os.PathLike,
    image_key: str,
    output_dir: str | os.PathLike,
    image_size: Sequence[int],
    intensity_range: Sequence[float] = (0.0, 1.0),
    splits: Sequence[str] = ("training", "validation"),
    chunk: int | None = None,
    use_ema: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Encode the volumes of a datalist to latents (posterior means) and write a latent datalist.

    Written to ``output_dir``: ``latents/<case>_latent.nii.gz`` (4D, see the module docstring) and
    ``datalist_latents.json`` with the splits (``{"latent": ..., "source": ...}`` per case), the per-channel
    ``latent_shift`` / ``latent_scale`` of the training split (mean and 1 / std), ``latent_channels``,
    ``downsample_factor``, ``latent_size``, ``image_size``, ``intensity_range``, ``image_datalist``,
    ``image_key`` and ``autoencoder`` (checkpoint, weights, sha256). Existing latent files are kept (not
    recomputed) unless ``overwrite``; a case that fails is reported and skipped.

    Args:
        network: the autoencoder (the bundle's ``network_def``); its weights come from ``checkpoint``.
        checkpoint: a checkpoint file, or a training folder (its newest ``*.pt``).
        datalist, image_key, splits: the volumes to encode.
        output_dir: where the latents and the latent datalist go (created).
        image_size, intensity_range: the training transforms' size and the data's range.
        chunk: image slices encoded at a time (None: the whole volume).
        use_ema: prefer the checkpoint's EMA weights.
        overwrite: re-encode existing latents (and accept a folder encoded differently).
        device: None: CUDA when present.

    Returns:
        The path of ``datalist_latents.json``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, info = load_frozen(network, checkpoint, use_ema, device, what="autoencoder", hint=AUTOENCODER_HINT)
    factor = int(unwrap(network).downsample_factor)
    load = volume_transforms(image_key, image_size, intensity_range)
    out_dir = Path(output_dir)
    by_split: dict[str, list[dict]] = {}
    for split in splits:
        try:
            by_split[split] = _entries(datalist, split, image_key)
        except (KeyError, ValueError) as err:
            logger.warning("Skipping split %s: %s", split, err)
    _check_unique_names(
        [(_case_name(e, image_key), e) for rows in by_split.values() for e in rows], image_key, datalist
    )
    (out_dir / "latents").mkdir(parents=True, exist_ok=True)
    _claim_latent_folder(
        out_dir,
        {
            "sha256": info["sha256"],
            "weights": info["weights"],
            "image_key": image_key,
            "image_size": [int(v) for v in image_size],
            "intensity_range": [float(v) for v in intensity_range],
        },
        overwrite,
    )
    result: dict[str, Any] = {}
    failures = []
    total, total_sq, count = None, None, 0
    for split, entries in by_split.items():
        rows = []
        for entry in entries:
            name = _case_name(entry, image_key)
            path = out_dir / "latents" / f"{name}_latent.nii.gz"
            try:
                if path.is_file() and not overwrite:
                    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
                    # save_nifti writes (Z, d, h, w) as d x h x w x Z, and a single channel as a 3D volume
                    z = torch.from_numpy(arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0))
                    if z.shape[0] != int(unwrap(network).latent_channels):
                        raise ValueError(
                            f"existing latent {path} has {z.shape[0]} channels, the autoencoder "
                            f"{unwrap(network).latent_channels}; pass overwrite=True to re-encode"
                        )
                else:
                    x = load(dict(entry))[image_key]
                    affine = x.affine.numpy() if hasattr(x, "affine") else np.eye(4)
                    z = encode_mean(network, torch.as_tensor(x)[None].float().to(device), chunk)[0].float().cpu()
                    save_nifti(z.numpy(), latent_affine(affine, factor), path, description="wdm3d latent")
            except Exception as err:  # report and continue with the other cases
                logger.error("Case %s (%s) failed: %s: %s", name, entry.get(image_key), type(err).__name__, err)
                failures.append({"case": name, "split": split, "error": f"{type(err).__name__}: {err}"})
                continue
            rows.append({"latent": str(path.relative_to(out_dir)), "source": str(entry[image_key])})
            if split == "training":
                zz = z.double().flatten(1)
                total = zz.sum(1) if total is None else total + zz.sum(1)
                total_sq = zz.square().sum(1) if total_sq is None else total_sq + zz.square().sum(1)
                count += zz.shape[1]
            latent_size = list(z.shape[1:])
        result[split] = rows
    if count == 0:
        raise RuntimeError(f"No training latents were written from {datalist} (failures: {failures}).")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    net = unwrap(network)
    result.update(
        {
            "latent_shift": mean.tolist(),
            "latent_scale": (1.0 / std).tolist(),
            "latent_channels": int(net.latent_channels),
            "downsample_factor": factor,
            "latent_size": latent_size,
            "image_size": [int(s) for s in image_size],
            "intensity_range": [float(v) for v in intensity_range],
            "image_datalist": str(Path(datalist).resolve()),
            "image_key": image_key,
            "autoencoder": info,
            "chunk": chunk,
            "failures": failures,
        }
    )
    out = atomic_write_text(out_dir / "datalist_latents.json", json.dumps(result, indent=2))
    n = sum(len(result.get(s, [])) for s in splits)
    print(f"Encoded {n} volumes to latents {latent_size} x {net.latent_channels} ({len(failures)} failed) -> {out}")
    return out


_STAMP = "encoded_with.json"


def _claim_latent_folder(out_dir: Path, stamp: dict[str, Any], overwrite: bool) -> None:
    """Latents already in ``out_dir`` are reused only if they were encoded with the same checkpoint and settings.

    The stamp (``latents/encoded_with.json``) is written before the first latent, so a folder from an interrupted
    run is still recognised; a folder of latents without it (or with another stamp) is refused unless
    ``overwrite``, since reusing them would put one autoencoder's latents under another's checksum.
    """
    stamp_file = out_dir / "latents" / _STAMP
    if not overwrite:
        old = None
        if stamp_file.is_file():
            old = json.loads(stamp_file.read_text())
        elif (out_dir / "datalist_latents.json").is_file():  # no stamp: compare what the latent datalist records
            data = json.loads((out_dir / "datalist_latents.json").read_text())
            old = {
                **{k: data.get(k) for k in ("image_key", "image_size", "intensity_range")},
                **{k: (data.get("autoencoder") or {}).get(k) for k in ("sha256", "weights")},
            }
        elif any((out_dir / "latents").glob("*_latent.nii.gz")):
            raise ValueError(
                f"{out_dir / 'latents'} holds latents of unknown origin (no {_STAMP}); pass "
                "overwrite=True to re-encode them or choose another output folder."
            )
        if old is not None and old != stamp:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in stamp.items() if old.get(k) != v)
            raise ValueError(
                f"{out_dir} holds latents encoded differently ({diff}); pass overwrite=True to "
                "re-encode them or choose another output folder."
            )
    atomic_write_text(stamp_file, json.dumps(stamp, indent=2))
