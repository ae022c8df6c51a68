"""Using a trained volume autoencoder: reconstruct a dataset (PSNR / SSIM / MAE), encode a dataset to latents,
and decode sampled latents back to volumes (latent wavelet diffusion).

Latents are written as 4D NIfTI files ``(d, h, w, Z)`` with the image's affine scaled by the downsampling factor
(a latent voxel covers ``f^3`` image voxels, its centre is the centre of that block), so they open in 3D Slicer on
top of the images. The latent datalist written by :func:`encode_dataset` records per-channel ``latent_shift`` and
``latent_scale`` (the training latents' mean and 1 / std, as the LDM scale factor) and where the latents came
from (autoencoder checkpoint and digest, the image datalist, image size and intensity range), so the latent
diffusion bundle can normalise for training and :class:`LatentDecoder` can undo it after sampling.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from .artifacts import latest_checkpoint, load_checkpoint, load_network_weights
from .io import atomic_write_bytes, atomic_write_text, save_nifti

__all__ = [
    "reconstruct", "encode_mean", "decode_latent", "latent_affine", "load_autoencoder", "reconstruct_dataset",
    "encode_dataset", "read_latent_stats", "LatentDecoder", "build_network", "ReconstructionInferer",
]

#: module prefixes a checkpoint's recorded network class may come from (nothing else is imported)
_TRUSTED_MODULES = ("wdm3d.networks.", "monai.networks.")

logger = logging.getLogger(__name__)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _check_chunk(model: nn.Module, chunk: int | None, what: str) -> None:
    if chunk is not None and not hasattr(_unwrap(model), f"{what}_chunked"):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no {what}_chunked (no causal cache); set chunk to null.")


@torch.no_grad()
def encode_mean(model: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The posterior mean of ``x``: ``(B, C, D, H, W) -> (B, Z, D/f, H/f, W/f)``.

    Args:
        model: an autoencoder (:mod:`wdm3d.networks.vae_base`).
        x: volumes in the model's intensity range.
        chunk: encode slab by slab along depth with the causal cache (WF-VAE; exact), this many slices at a time.
    """
    net = _unwrap(model)
    _check_chunk(net, chunk, "encode")
    posterior = net.encode_chunked(x, chunk) if chunk else net.encode(x)
    return posterior.mean


@torch.no_grad()
def decode_latent(model: nn.Module, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Decode latents ``(B, Z, d, h, w) -> (B, C, d*f, h*f, w*f)`` (chunked along depth when ``chunk`` is set)."""
    net = _unwrap(model)
    _check_chunk(net, chunk, "decode")
    return net.decode_chunked(z, chunk) if chunk else net.decode(z)


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, chunk: int | None = None, latent_chunk: int | None = None) -> torch.Tensor:
    """Deterministic reconstruction ``decode(encode(x).mean)``, same shape as ``x``."""
    return decode_latent(model, encode_mean(model, x, chunk), latent_chunk)


class ReconstructionInferer(Inferer):
    """``inferer(x, network)``: the autoencoder's reconstruction of ``x`` from the posterior mean (:func:`reconstruct`),
    ``(B, C, D, H, W) -> (B, C, D, H, W)``; the ``inferer`` of the VAE bundles' ``inference.json``.

    MONAI's ``SimpleInferer`` calls ``network(x)``, which samples the posterior and returns a ``VAEOutput``;
    reconstruction metrics need the deterministic mean path and, for WF-VAE, the chunked one.

    Args:
        chunk: encode slab by slab along depth, this many slices at a time (WF-VAE's causal cache; exact);
            None: the whole volume at once.
        latent_chunk: decode this many latent slices at a time (None: the whole latent).
    """

    def __init__(self, chunk: int | None = None, latent_chunk: int | None = None) -> None:
        for name, value in (("chunk", chunk), ("latent_chunk", latent_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of slices or null (whole volume), got {value!r}.")
        super().__init__()
        self.chunk, self.latent_chunk = chunk, latent_chunk

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return reconstruct(network, inputs, self.chunk, self.latent_chunk)


def latent_affine(affine: np.ndarray | torch.Tensor, factor: int) -> np.ndarray:
    """The voxel-to-world matrix of a latent grid downsampled ``factor`` times per axis from ``affine``.

    Latent voxel ``i`` covers image voxels ``f*i ... f*i + f - 1``; its centre is image voxel ``f*i + (f-1)/2``.
    """
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    scale = np.diag([float(factor)] * 3 + [1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return a @ scale


def _checkpoint_file(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"No checkpoint (*.pt) in {path}; train the autoencoder first or set the path.")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"Autoencoder checkpoint {path} does not exist; train the autoencoder first.")
    return path


def build_network(checkpoint: str | os.PathLike) -> nn.Module:
    """Rebuild the network a wdm3d checkpoint was trained with, from its ``run_config`` (class and settings).

    Only classes under ``wdm3d.networks`` or ``monai.networks`` are built; the weights are not loaded (see
    :func:`load_autoencoder`). Lets a latent-diffusion config use an autoencoder without restating its settings.
    """
    import importlib

    path = _checkpoint_file(checkpoint)
    settings = dict((load_checkpoint(path).get("run_config") or {}).get("network") or {})
    cls_name = settings.pop("class", None)
    if not cls_name:
        raise ValueError(f"Checkpoint {path} records no network settings (run_config); pass the network explicitly.")
    if not cls_name.startswith(_TRUSTED_MODULES):
        raise ValueError(f"Checkpoint {path} names network class {cls_name!r}, outside {_TRUSTED_MODULES}; refusing "
                         "to build it. Pass the network explicitly.")
    module_name, _, attr = cls_name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Checkpoint {path} names network class {cls_name!r}, which does not exist here: {err}") from err
    # only network classes: a module path alone would also admit functions there (monai.networks.utils.save_state
    # writes files), which a crafted checkpoint could call with arguments of its choosing
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Checkpoint {path} names {cls_name!r}, which is not a network class (torch.nn.Module); "
                         "refusing to call it. Pass the network explicitly.")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Cannot rebuild {cls_name} from the settings in {path} ({settings}): {err}") from err


def load_autoencoder(
    network: nn.Module, checkpoint: str | os.PathLike, use_ema: bool = True, device: str | torch.device | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load trained weights into ``network`` (EMA first if ``use_ema``), freeze it, and put it in eval mode.

    Returns:
        ``(network, info)`` with ``info`` = ``{"checkpoint", "weights", "sha256"}`` for manifests.
    """
    path = _checkpoint_file(checkpoint)
    keys = ("ema", "model", "network") if use_ema else ("model", "network", "ema")
    used = load_network_weights(network, path, keys)
    if device is not None:
        network.to(device)
    network.eval().requires_grad_(False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return network, {"checkpoint": str(path.resolve()), "weights": used, "sha256": digest}


def _case_loader(image_key: str, image_size: Sequence[int], intensity_range: Sequence[float]):
    from .data import volume_transforms

    return volume_transforms(image_key, image_size, intensity_range)


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
    from .data import load_datalist

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

    Returns:
        The ``metrics.json`` contents.
    """
    from .metrics import reconstruction_metrics, summarize_cases

    if inferer is None:
        inferer = ReconstructionInferer(chunk, latent_chunk)
    elif chunk is not None or latent_chunk is not None:
        raise ValueError("Give chunk / latent_chunk to the inferer (ReconstructionInferer(chunk, latent_chunk)) or to "
                         "reconstruct_dataset, not to both.")
    chunk, latent_chunk = getattr(inferer, "chunk", None), getattr(inferer, "latent_chunk", None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, info = load_autoencoder(network, checkpoint, use_ema, device)
    entries = _entries(datalist, split, image_key)[:max_cases]
    named = [(_case_name(entry, image_key), entry) for entry in entries]
    _check_unique_names(named, image_key, datalist)
    load = _case_loader(image_key, image_size, intensity_range)
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
                row["nifti"] = save_nifti(vol, affine, out_dir / f"{name}_recon.nii.gz",
                                          description="reconstruction (wdm3d)").name
            rows.append(row)
        except Exception as err:  # one bad case must not end the run: report it and go on
            logger.error("Case %s (%s) failed: %s: %s", name, entry.get(image_key), type(err).__name__, err)
            failures.append({"case": name, "file": str(entry.get(image_key)), "error": f"{type(err).__name__}: {err}"})
    if not rows:
        raise RuntimeError(f"No case of split {split!r} in {datalist} could be reconstructed; failures: {failures}")
    metrics_rows = [{k: v for k, v in r.items() if k not in ("case", "nifti")} for r in rows]
    result = {"split": split, "datalist": str(datalist), "summary": summarize_cases(metrics_rows), "cases": rows,
              "failures": failures, "autoencoder": info, "chunk": chunk, "latent_chunk": latent_chunk,
              "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    buf = io.StringIO()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "metrics.csv", buf.getvalue().encode())
    s = result["summary"]
    print(f"Reconstructed {len(rows)} volumes ({len(failures)} failed): PSNR {s['psnr_mean']:.2f} dB, "
          f"SSIM {s['ssim_mean']:.4f}, MAE {s['mae_mean']:.4f} -> {out_dir / 'metrics.json'}")
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

    Returns:
        The path of ``datalist_latents.json``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, info = load_autoencoder(network, checkpoint, use_ema, device)
    factor = int(_unwrap(network).downsample_factor)
    load = _case_loader(image_key, image_size, intensity_range)
    out_dir = Path(output_dir)
    by_split: dict[str, list[dict]] = {}
    for split in splits:
        try:
            by_split[split] = _entries(datalist, split, image_key)
        except (KeyError, ValueError) as err:
            logger.warning("Skipping split %s: %s", split, err)
    _check_unique_names([(_case_name(e, image_key), e) for rows in by_split.values() for e in rows], image_key,
                        datalist)
    (out_dir / "latents").mkdir(parents=True, exist_ok=True)
    _claim_latent_folder(out_dir, {"sha256": info["sha256"], "weights": info["weights"], "image_key": image_key,
                                   "image_size": [int(v) for v in image_size],
                                   "intensity_range": [float(v) for v in intensity_range]}, overwrite)
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
                    import nibabel as nib

                    arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
                    # save_nifti writes (Z, d, h, w) as d x h x w x Z, and a single channel as a 3D volume
                    z = torch.from_numpy(arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0))
                    if z.shape[0] != int(_unwrap(network).latent_channels):
                        raise ValueError(f"existing latent {path} has {z.shape[0]} channels, the autoencoder "
                                         f"{_unwrap(network).latent_channels}; pass overwrite=True to re-encode")
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
    net = _unwrap(network)
    result.update({
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
    })
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
        elif (out_dir / "datalist_latents.json").is_file():  # written before the stamp existed
            data = json.loads((out_dir / "datalist_latents.json").read_text())
            old = {**{k: data.get(k) for k in ("image_key", "image_size", "intensity_range")},
                   **{k: (data.get("autoencoder") or {}).get(k) for k in ("sha256", "weights")}}
        elif any((out_dir / "latents").glob("*_latent.nii.gz")):
            raise ValueError(f"{out_dir / 'latents'} holds latents of unknown origin (no {_STAMP}); pass "
                             "overwrite=True to re-encode them or choose another output folder.")
        if old is not None and old != stamp:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in stamp.items() if old.get(k) != v)
            raise ValueError(f"{out_dir} holds latents encoded differently ({diff}); pass overwrite=True to "
                             "re-encode them or choose another output folder.")
    atomic_write_text(stamp_file, json.dumps(stamp, indent=2))


def read_latent_stats(path: str | os.PathLike) -> dict[str, Any]:
    """The normalisation and provenance entries of a latent datalist (see :func:`encode_dataset`)."""
    data = json.loads(Path(path).read_text())
    for key in ("latent_shift", "latent_scale", "latent_channels", "downsample_factor", "autoencoder"):
        if key not in data:
            raise KeyError(f"{path} has no {key!r}: it is not a latent datalist written by wdm3d's encode step.")
    return data


class LatentDecoder(nn.Module):
    """Normalised latents from the diffusion -> volumes in [-1, 1]: undo shift/scale, then decode (optionally
    chunked along depth, exact for WF-VAE).

    Args:
        autoencoder: the autoencoder network (built from the autoencoder bundle's ``network_def``); None: rebuilt
            from the checkpoint's recorded settings (:func:`build_network`).
        latent_datalist: the ``datalist_latents.json`` the diffusion was trained on (normalisation, checkpoint).
        checkpoint: the autoencoder checkpoint; None: the one recorded in the latent datalist.
        chunk: latent slices decoded at a time (None: whole volume).
        use_ema: prefer the checkpoint's EMA weights.
    """

    def __init__(
        self,
        autoencoder: nn.Module | None,
        latent_datalist: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        chunk: int | None = None,
        use_ema: bool = True,
    ) -> None:
        super().__init__()
        stats = read_latent_stats(latent_datalist)
        checkpoint = checkpoint or stats["autoencoder"]["checkpoint"]
        if autoencoder is None:
            autoencoder = build_network(checkpoint)
        self.autoencoder, self.info = load_autoencoder(autoencoder, checkpoint, use_ema)
        if stats.get("autoencoder", {}).get("sha256") not in (None, self.info["sha256"]):
            logger.warning("Autoencoder checkpoint %s differs from the one the latents were encoded with (%s).",
                           checkpoint, stats["autoencoder"].get("checkpoint"))
        _check_chunk(self.autoencoder, chunk, "decode")
        self.chunk = chunk
        self.downsample_factor = int(stats["downsample_factor"])
        self.latent_channels = int(stats["latent_channels"])
        self.register_buffer("shift", torch.tensor(stats["latent_shift"], dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("scale", torch.tensor(stats["latent_scale"], dtype=torch.float32).view(1, -1, 1, 1, 1))

    def latent_shape(self, image_size: Sequence[int]) -> list[int]:
        """``(Z, D/f, H/f, W/f)`` for an image size."""
        f = self.downsample_factor
        if any(int(s) % f for s in image_size):
            raise ValueError(f"image_size {list(image_size)} must be divisible by the downsample factor {f}.")
        return [self.latent_channels] + [int(s) // f for s in image_size]

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float() / self.scale.to(z.device) + self.shift.to(z.device)
        self.autoencoder.to(z.device)
        return decode_latent(self.autoencoder, z, self.chunk)
