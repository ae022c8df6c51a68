"""Generation for bundles: load a checkpoint, sample volumes, write NIfTI + PNG + a manifest."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .artifacts import check_diffusion_matches, load_checkpoint, load_network_weights, resolve_checkpoint, weight_keys
from .data import hu_range
from .data import intensity_range as datalist_range
from .diffusion import WaveletDiffusion
from .engine.config_check import check_image_size
from .engine.geometry import DataGeometry, reference_geometry
from .engine.seeding import derive_seed
from .io import atomic_write_text, save_montage, save_nifti, write_dicom_series
from .io.staging import MANIFEST, StagedOutput
from .tracking import log_to_run

__all__ = ["VolumeGenerator", "AUTOCAST_DTYPES", "batch_seed"]

logger = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: the generator seed of the batch that starts at sample ``first`` of a run with ``seed``: the project's one rule for
#: per-batch and per-case seeds (:func:`wdm3d.engine.seeding.derive_seed`), under the name inference's callers use
batch_seed = derive_seed


class VolumeGenerator:
    """Sample synthetic volumes from a trained checkpoint and write them where a clinician can open them.

    For each sample: ``sample_XXXX.nii.gz`` (float32, in the training data's intensity range, with the training
    data's affine: spacing, orientation and origin), ``sample_XXXX.png`` (axial / coronal / sagittal mid-slices);
    with ``dicom`` on, ``sample_XXXX_dicom/`` (the same volume as a DICOM series marked synthetic);
    and one ``manifest.json`` (checkpoint, weights used, sampler, steps, seeds, geometry, timings, versions).

    Geometry, in order of preference: ``reference_image``; the first training volume of ``datalist`` (read through
    the training transforms); the geometry stored in the checkpoint. Each batch's random generator is seeded with
    :func:`batch_seed` ``(seed, index of its first sample)``: independent streams for different run seeds (runs with
    seeds 0, 1, 2, ... share no sample, as they would with ``seed + i``), recorded per sample in the manifest; with
    ``batch_size`` 1 (the default) any single sample can be regenerated on its own.

    A run replaces an earlier run's output in ``output_dir`` as a whole, and only once it is complete: it writes
    into a fresh hidden folder beside ``output_dir``, the manifest last, and swaps that in at the end, carrying over
    the files in ``output_dir`` that are not an earlier run's (anything but ``sample_NNNN*`` and ``manifest.json``).
    A run that fails or is killed (out of memory, a full disk, a pre-empted job) leaves the previous run's output
    as it was, never a mixture of two runs' samples. Multi-channel networks write ``(C, D, H, W)`` volumes (4D NIfTI,
    channels last). The files get the mode the umask gives a new file (the folder, that of the folder it replaces).

    Args:
        network: the network to load the weights into (built from the bundle's ``network_def``).
        diffusion: the process it was trained with.
        checkpoint: a checkpoint file, or a folder (its newest file is used).
        output_dir: where the files go (created).
        image_size: ``(D, H, W)``; must equal the reference geometry's shape.
        num_samples: how many volumes.
        sampler: ``"ddpm"``, ``"ddim"`` or ``"rflow"`` (must fit the trained process).
        num_steps: sampler steps (None: the sampler's default).
        seed: base seed.
        batch_size: volumes sampled together.
        eta: DDIM noise.
        clip_projection: WDM's IDWT -> clamp -> DWT of each predicted x0.
        use_ema: prefer the EMA weights of the checkpoint.
        datalist, image_key: the training datalist and image key (for the geometry).
        reference_image: a NIfTI whose geometry to use instead.
        intensity_range: output range; None: the checkpoint's / datalist's ([0, 1] if neither has one).
        device: where to sample.
        autocast: None, ``"bf16"`` or ``"fp16"``: autocast the network on CUDA (ignored on CPU).
        progress: progress bars.
        mlflow: log the manifest and previews to the MLflow run that trained the checkpoint (its id is stored in
            the checkpoint), under ``inference/<time>/``; a failure to reach MLflow only warns.
        mlflow_log_volumes: also upload the NIfTI volumes.
        dicom: also write each sample as a DICOM series, ``sample_XXXX_dicom/`` next to its NIfTI (same geometry,
            marked synthetic, see :func:`wdm3d.io.write_dicom_series`); the manifest lists them. A folder left by an
            earlier run into the same ``output_dir`` is replaced, as the NIfTI beside it is.
        dicom_modality: ``"MR"`` (the run's intensity range stored as [0, 4095]) or ``"CT"``.
        dicom_hu_window: CT only: ``(low, high)`` HU that [0, 1] maps back to (the LIDC prep's clip range); None:
            the datalist's ``hu_clip`` when both its ends are numbers, else the values are written as they are
            (``RescaleType`` US, not HU) with a warning.
        decoder: latent wavelet diffusion: a :class:`wdm3d.networks.vae_ops.LatentDecoder`. The diffusion then samples
            latents of ``decoder.latent_shape(image_size)`` (no clip projection: latents have no fixed range) and
            the decoder turns them into volumes, written with the image geometry as above.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        diffusion: WaveletDiffusion,
        checkpoint: str | os.PathLike,
        output_dir: str | os.PathLike,
        image_size: Sequence[int] = (128, 128, 128),
        num_samples: int = 1,
        sampler: str | None = None,
        num_steps: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        eta: float = 0.0,
        clip_projection: bool = True,
        use_ema: bool = True,
        datalist: str | os.PathLike | None = None,
        image_key: str = "image",
        reference_image: str | os.PathLike | None = None,
        intensity_range: Sequence[float] | None = None,
        device: str | torch.device | None = None,
        autocast: str | None = None,
        progress: bool = True,
        mlflow: bool = True,
        mlflow_log_volumes: bool = True,
        dicom: bool = False,
        dicom_modality: str = "MR",
        dicom_hu_window: Sequence[float] | None = None,
        decoder: torch.nn.Module | None = None,
    ) -> None:
        if dicom_modality not in ("MR", "CT"):
            raise ValueError(f"dicom_modality must be 'MR' or 'CT', got {dicom_modality!r}.")
        if dicom_hu_window is not None and (len(dicom_hu_window) != 2 or not dicom_hu_window[0] < dicom_hu_window[1]):
            raise ValueError(f"dicom_hu_window must be (low, high) HU with low < high, got {dicom_hu_window!r}.")
        if dicom_hu_window is not None and dicom_modality != "CT":
            raise ValueError(f"dicom_hu_window is for dicom_modality 'CT', got {dicom_modality!r}.")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {autocast!r}.")
        self.sampler = sampler or ("ddpm" if diffusion.process == "ddpm" else "rflow")
        diffusion.sampling_timesteps(self.sampler, num_steps)  # fail now on a sampler/process mismatch
        self.network, self.diffusion = network, diffusion
        self.checkpoint = Path(checkpoint)
        self.output_dir = Path(output_dir)
        self.image_size = [int(s) for s in image_size]
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_steps, self.seed, self.eta = num_steps, int(seed), eta
        self.clip_projection, self.use_ema = clip_projection, use_ema
        self.datalist, self.image_key = datalist, image_key
        self.reference_image = reference_image
        self.intensity_range = intensity_range
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.autocast = autocast
        self.progress = progress
        self.mlflow, self.mlflow_log_volumes = mlflow, mlflow_log_volumes
        self.dicom, self.dicom_modality = bool(dicom), dicom_modality
        self.dicom_hu_window = [float(v) for v in dicom_hu_window] if dicom_hu_window is not None else None
        self.decoder = decoder
        grid, size_name = self.image_size, "image_size"
        if decoder is not None:
            grid = decoder.latent_shape(self.image_size)[1:]  # fail now on a size the autoencoder cannot decode
            size_name = f"latent size (of image_size {self.image_size})"
            self.clip_projection = False
        channel_mult = getattr(network, "channel_mult", None)
        if channel_mult is not None and isinstance(getattr(diffusion, "levels", None), int):
            check_image_size(grid, diffusion.levels, channel_mult, size_name)  # before a checkpoint is even read

    def _hu_window(self) -> list[float] | None:
        """The HU window for CT DICOM: the argument, else the datalist's numeric ``hu_clip``, else None."""
        return self.dicom_hu_window if self.dicom_hu_window is not None else hu_range(self.datalist)

    def _resolve_checkpoint(self) -> Path:
        # a path that is not there gets inference's own wording: it names where training writes its checkpoints
        if not self.checkpoint.exists():
            raise FileNotFoundError(
                f"No checkpoint: {self.checkpoint} does not exist; train first (the training config writes to "
                "ckpt_dir) or set checkpoint to a .pt file."
            )
        return resolve_checkpoint(self.checkpoint, hint="train first or set checkpoint.")

    def _geometry(self, ckpt: dict) -> tuple[np.ndarray, list[int], list[float], str]:
        stored = DataGeometry()
        stored.load_state_dict(ckpt.get("geometry", {}))
        irange = list(self.intensity_range) if self.intensity_range is not None else None
        has_datalist = self.datalist is not None and Path(self.datalist).is_file()
        if self.reference_image is not None or has_datalist:
            if irange is None:  # a datalist that is not there says nothing: the checkpoint's range, then [0, 1]
                irange = datalist_range(self.datalist) if has_datalist else stored.intensity_range
            affine, shape = reference_geometry(
                self.reference_image, self.datalist, self.image_key, self.image_size, irange
            )
            source = str(self.reference_image or self.datalist)
        elif stored.affine is not None:
            affine, shape = stored.affine, stored.shape
            irange = irange or stored.intensity_range
            source = "checkpoint"
        else:
            raise FileNotFoundError(
                f"No geometry for the output volumes: datalist {self.datalist} does not exist, no reference_image was "
                "given, and the checkpoint stores none. Set dataset_dir (or reference_image) to the training data."
            )
        if list(shape) != self.image_size:
            raise ValueError(
                f"image_size {self.image_size} differs from the reference geometry's shape {list(shape)} ({source}); "
                "set image_size to the size the model was trained on."
            )
        return affine, list(shape), irange, source

    def run(self) -> dict:
        """Generate, write, and return the manifest (also written to ``output_dir/manifest.json``)."""
        ckpt_path = self._resolve_checkpoint()
        # read once here, not through load_frozen: the geometry and the MLflow run come from the same file, and a
        # geometry mismatch is reported before the (large) weights are put on the device
        ckpt = load_checkpoint(ckpt_path)
        check_diffusion_matches(ckpt, self.diffusion, ckpt_path)
        affine, shape, (lo, hi), geometry_source = self._geometry(ckpt)
        self.network.to(self.device)
        weights = load_network_weights(self.network, ckpt_path, weight_keys(self.use_ema), checkpoint=ckpt)
        self.network.eval()
        factor = getattr(self.diffusion, "channel_factor", 8)  # 8 wavelet channels per image channel per level
        channels = self.network.out_channels // factor if hasattr(self.network, "out_channels") else 1
        sample_shape = [channels, *shape]
        if self.decoder is not None:
            self.decoder.to(self.device)
            sample_shape = self.decoder.latent_shape(shape)
            if sample_shape[0] != channels:
                raise ValueError(
                    f"the diffusion network makes {channels} latent channels but the autoencoder takes "
                    f"{sample_shape[0]}; check network_def's in_channels (8 per level x latent channels)."
                )
        staging = StagedOutput(self.output_dir)
        for p in staging.leftovers():
            logger.warning(
                "%s was left by an inference run into %s that was killed before it finished (or is one "
                "still running): a .partial- folder is an unfinished output, a .old- folder the complete "
                "output before that run; move or delete it.",
                p,
                self.output_dir,
            )
        try:
            manifest = self._generate(
                staging.dir, ckpt, ckpt_path, weights, affine, shape, lo, hi, geometry_source, sample_shape
            )
        except BaseException:
            staging.discard()
            raise
        staging.publish()
        if self.mlflow and manifest["mlflow_run_id"]:
            run_info = ckpt.get("mlflow") or {}
            samples = manifest["samples"]
            files = [self.output_dir / MANIFEST] + [self.output_dir / s["png"] for s in samples]
            if self.mlflow_log_volumes:
                files += [self.output_dir / s["nifti"] for s in samples]
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            if log_to_run(
                run_info,
                files,
                f"inference/{stamp}",
                {
                    "inference_seconds_per_volume": manifest["seconds_total"] / self.num_samples,
                    "inference_network_evaluations": manifest["network_evaluations"],
                },
            ):
                print(f"Logged the samples to MLflow run {manifest['mlflow_run_id']} ({run_info.get('tracking_uri')})")
        kinds = "NIfTI + PNG + DICOM" if self.dicom else "NIfTI + PNG"
        print(
            f"Wrote {self.num_samples} synthetic volumes ({kinds}, {manifest['network_evaluations']} network "
            f"evaluations each: {self.sampler}) and manifest.json to {self.output_dir}"
        )
        return manifest

    def _generate(
        self,
        folder: Path,
        ckpt: dict,
        ckpt_path: Path,
        weights: str,
        affine: np.ndarray,
        shape: list[int],
        lo: float,
        hi: float,
        geometry_source: str,
        sample_shape: list[int],
    ) -> dict:
        """Sample every volume into ``folder``, then write its manifest there (last); return the manifest."""
        c_lo, c_hi = self.diffusion.clip_range or (-1.0, 1.0)
        use_autocast = self.autocast is not None and self.device.type == "cuda"
        ctx = torch.autocast("cuda", dtype=AUTOCAST_DTYPES[self.autocast]) if use_autocast else nullcontext()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        hu_window = self._hu_window() if self.dicom and self.dicom_modality == "CT" else None
        if self.dicom and self.dicom_modality == "CT" and hu_window is None:
            logger.warning(
                "DICOM CT without an HU window (dicom_hu_window, or a numeric hu_clip in the datalist): "
                "the series store the volumes' own intensities, marked RescaleType US, not HU."
            )
        samples, t_start = [], time.perf_counter()
        for first in range(0, self.num_samples, self.batch_size):
            n = min(self.batch_size, self.num_samples - first)
            seed = batch_seed(self.seed, first)
            t0 = time.perf_counter()
            with ctx:
                vols = self.diffusion.sample(
                    self.network,
                    sample_shape,
                    num_samples=n,
                    sampler=self.sampler,
                    num_steps=self.num_steps,
                    eta=self.eta,
                    clip_projection=self.clip_projection,
                    seed=seed,
                    device=self.device,
                    progress=self.progress,
                )
                if self.decoder is not None:
                    vols = self.decoder(vols.float())
            seconds = (time.perf_counter() - t0) / n
            # diffusion range -> the training data's intensity range
            vols = (vols.float().clamp(c_lo, c_hi) - c_lo) / (c_hi - c_lo) * (hi - lo) + lo
            for j in range(n):
                i = first + j
                vol = vols[j, 0].cpu().numpy()  # the first channel: previews and DICOM
                data = vols[j].cpu().numpy() if vols.shape[1] > 1 else vol  # NIfTI: every channel
                nii = save_nifti(data, affine, folder / f"sample_{i:04d}.nii.gz", description="synthetic (wdm3d)")
                png = save_montage(folder / f"sample_{i:04d}.png", [vol], affine=affine, value_range=(lo, hi))
                entry = {
                    "index": i,
                    "seed": seed,
                    "batch_position": j,
                    "nifti": nii.name,
                    "png": png.name,
                    "seconds": round(seconds, 3),
                }
                if self.dicom:
                    series = write_dicom_series(
                        (vol - lo) / (hi - lo) if hu_window is not None else vol,  # [0, 1] for the HU window
                        affine,
                        folder / f"sample_{i:04d}_dicom",
                        modality=self.dicom_modality,
                        series_description=f"sample {i} seed {seed}",
                        value_range=(lo, hi) if self.dicom_modality == "MR" else None,
                        hu_window=hu_window,
                        overwrite=True,
                        series_number=i + 1,
                    )
                    entry["dicom"] = series["dir"].name
                    entry["dicom_series_uid"] = series["series_uid"]
                    entry["dicom_num_files"] = series["num_slices"]
                samples.append(entry)
            logger.info("Wrote samples %d-%d of %d (for %s)", first, first + n - 1, self.num_samples, self.output_dir)
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": str(ckpt_path.resolve()),
            "weights": weights,
            "sampler": self.sampler,
            "num_steps": self.num_steps
            if self.num_steps is not None
            else len(self.diffusion.sampling_timesteps(self.sampler)) - 1,
            "network_evaluations": self.diffusion.network_evaluations(self.sampler, self.num_steps),
            "eta": self.eta,
            "clip_projection": self.clip_projection,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "diffusion": self.diffusion.config(),
            "image_size": shape,
            "affine": np.asarray(affine).tolist(),
            "geometry_source": geometry_source,
            "intensity_range": [lo, hi],
            "dicom": {"modality": self.dicom_modality, "hu_window": hu_window} if self.dicom else None,
            "latent": (
                {"shape": sample_shape, "chunk": self.decoder.chunk, "autoencoder": self.decoder.info}
                if self.decoder is not None
                else None
            ),
            "device": str(self.device),
            "autocast": self.autocast if use_autocast else None,
            "seconds_total": round(time.perf_counter() - t_start, 3),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            if self.device.type == "cuda"
            else None,
            "versions": {"wdm3d": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "samples": samples,
        }
        manifest["mlflow_run_id"] = (ckpt.get("mlflow") or {}).get("run_id") or None
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
        return manifest
