"""Image-conditioned generation for bundles: paired cross-modality synthesis and reference-guided generation.

Two modes of :class:`ConditionalSynthesis`:

- ``"paired"``: for each case of a datalist split, take its reference volume (e.g. T1n) and generate the target
  modality (e.g. T2w) of the same patient, written as NIfTI on the reference's voxel grid with its header geometry
  (qform and sform, each with its code), a PNG (reference | synthesis | truth), ``manifest.json``, and where the
  true target exists PSNR / SSIM / MAE per case and their mean and standard deviation (``metrics.json``). A failing
  case is reported and the rest continue.
- ``"reference_guided"``: for each reference, ``num_samples`` new volumes of the reference's modality at each image
  prompt strength lambda in ``ip_scales``, with the same seeds at every lambda (lambda = 0 is the base model: the
  unconditional samples of the comparison). Reported: SSIM / PSNR of each sample to its reference, to the other
  cases of the split (same modality), and between the samples of one reference (diversity).

Three methods generate: ``"ip_adapter"`` (the IP-Adapter on the frozen context-conditioned base; guidance scale and
lambda settable), ``"concat"`` (the cWDM-style baseline: reference coefficients concatenated to the noisy input) and
``"base"`` (the base alone, conditioned on the target modality only: unconditional with respect to the reference).
Metrics are computed in the diffusion range [-1, 1] on the ``image_size`` grid, over the whole volume (background
included, as in the autoencoder bundles).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from . import __version__
from .diffusion import ClassifierFreeGuidance, WaveletDiffusion
from .inference import batch_seed
from .io import atomic_write_text, nifti_geometry, save_montage, save_nifti

__all__ = ["ConditionalSynthesis", "ReferenceGrid", "SYNTHESIS_METHODS", "SYNTHESIS_MODES", "reference_grid"]

logger = logging.getLogger(__name__)

SYNTHESIS_METHODS = ("ip_adapter", "concat", "base")
SYNTHESIS_MODES = ("paired", "reference_guided")


class ReferenceGrid(NamedTuple):
    """The voxel grid and orientation header of a reference NIfTI file (see :func:`reference_grid`)."""

    affine: np.ndarray  # 4x4, what nibabel uses (the sform when its code is set, else the qform)
    shape: tuple[int, int, int]
    codes: tuple[int, int]  # (qform_code, sform_code)
    qform: np.ndarray  # 4x4, the qform's own matrix (may differ from the sform)


def reference_grid(path: str | os.PathLike) -> ReferenceGrid:
    """The voxel grid of a NIfTI file: ``(affine, (D, H, W), (qform_code, sform_code), qform)``, so that an output
    written with it (:func:`wdm3d.io.save_nifti` with ``codes`` and ``qform``) carries the same header geometry."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:
        raise RuntimeError(f"Could not read the reference volume {path}: {type(err).__name__}: {err}") from err
    if len(img.shape) < 3 or any(int(s) != 1 for s in img.shape[3:]):
        raise ValueError(f"The reference volume {path} must be 3D, got shape {img.shape}.")
    affine, codes, qform = nifti_geometry(img)
    return ReferenceGrid(affine, tuple(int(s) for s in img.shape[:3]), codes, qform)


def _axis_positions(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loading chain's centre pad/crop (``ResizeWithPadOrCrop``, size ``n`` -> ``m`` along one axis) puts
    the original voxels: ``(positions in the model grid, their positions in the original grid)``.

    Read off the transform itself (applied to an index ramp) rather than restated: its pad puts the odd voxel after
    the volume and its crop drops it before, so applying the same transform backwards is off by one voxel for odd
    differences.
    """
    from monai.transforms import ResizeWithPadOrCrop

    ramp = torch.arange(1, n + 1, dtype=torch.float32)[None]  # (channel, one spatial axis); 0 marks padding
    landed = torch.as_tensor(ResizeWithPadOrCrop(spatial_size=[m], mode="constant", constant_values=0)(ramp))[0]
    model_pos = torch.nonzero(landed > 0)[:, 0]
    return model_pos, landed[model_pos].round().long() - 1


def _restore_grid(volume: torch.Tensor, shape: Sequence[int], fill: float) -> torch.Tensor:
    """Undo the centre pad/crop of the loading chain exactly: ``(C, D', H', W') -> (C, *shape)``; every voxel that
    came from the reference grid goes back to its place, voxels cropped away by the chain are ``fill``."""
    volume = torch.as_tensor(volume)
    maps = [_axis_positions(int(n), int(m)) for n, m in zip(shape, volume.shape[1:])]
    out = volume.new_full((volume.shape[0], *(int(n) for n in shape)), float(fill))
    (m0, o0), (m1, o1), (m2, o2) = maps
    out[:, o0[:, None, None], o1[None, :, None], o2[None, None, :]] = \
        volume[:, m0[:, None, None], m1[None, :, None], m2[None, None, :]]
    return out


def _pairwise(metric, vols: Sequence[torch.Tensor]) -> float | None:
    vals = [metric(vols[i], vols[j]) for i in range(len(vols)) for j in range(i + 1, len(vols))]
    return float(np.mean(vals)) if vals else None


class ConditionalSynthesis:
    """Generate target modalities from reference volumes with a trained conditional model, and measure them.

    Args:
        network: the base network (``network_def`` of the bundle: a
            :class:`~wdm3d.diffusion.conditioning.ContextConditionedUNet`; for ``"concat"`` the one with twice the
            input channels). Its weights come from ``checkpoint``.
        diffusion: the process the models were trained with.
        checkpoint: the base (``"ip_adapter"``, ``"base"``) or concat model checkpoint, a file or a folder (newest).
        output_dir: where the files go (created).
        datalist: the paired datalist (one entry per case, one key per modality).
        method: one of :data:`SYNTHESIS_METHODS`.
        mode: one of :data:`SYNTHESIS_MODES`.
        adapter: for ``"ip_adapter"``: the :class:`~wdm3d.networks.IPAdapter` installed on ``network``.
        adapter_weights: the adapter file written by training (``{"image_proj", "ip_adapter"}``).
        split: the datalist split to run on.
        reference_modality: the datalist key of the reference (e.g. ``"t1n"``).
        target_modality: the modality to generate (paired mode), the base context.
        dataset_name: the dataset condition (None: the null token).
        image_size: ``(D, H, W)`` the models were trained on.
        intensity_range: the prepared data's range; None: the datalist's ``intensity_range`` ([0, 1] if absent).
        ip_scale: lambda, the image prompt's weight (paired mode; 0 gives exactly the base).
        ip_scales: the lambdas of reference-guided mode.
        guidance_scale: classifier-free guidance scale g (1: none).
        guidance_drop: what the unconditional branch drops for the IP-Adapter (``["image"]``: guide on the image
            prompt, keeping the target modality; ``["context", "image"]``: both). ``"concat"`` and ``"base"`` guide
            on the context.
        num_samples: volumes per reference and lambda (reference-guided mode).
        sampler, num_steps, eta, clip_projection: the sampler (see :meth:`WaveletDiffusion.sample`).
        seed: case ``i`` (paired) or sample ``j`` (reference-guided, the same for every reference and lambda) uses
            the generator seed :func:`wdm3d.inference.batch_seed` ``(seed, i)`` / ``(seed, j)`` (recorded per row):
            runs with nearby seeds give unrelated samples.
        use_ema: prefer the checkpoint's EMA weights.
        max_cases: only the first cases of the split.
        device: where to sample.
        progress: progress bars.
        mlflow: log the manifest, metrics and previews to the MLflow run recorded in ``mlflow_checkpoint`` (default:
            ``checkpoint``); a failure to reach MLflow only warns.
        mlflow_checkpoint: a checkpoint file or folder whose ``"mlflow"`` entry names the run (the adapter's
            training checkpoints for ``"ip_adapter"``).
    """

    def __init__(
        self,
        network: nn.Module,
        diffusion: WaveletDiffusion,
        checkpoint: str | os.PathLike,
        output_dir: str | os.PathLike,
        datalist: str | os.PathLike,
        method: str = "ip_adapter",
        mode: str = "paired",
        adapter: nn.Module | None = None,
        adapter_weights: str | os.PathLike | None = None,
        split: str = "test",
        reference_modality: str = "t1n",
        target_modality: str = "t2w",
        dataset_name: str | None = "brats",
        image_size: Sequence[int] = (128, 128, 128),
        intensity_range: Sequence[float] | None = None,
        ip_scale: float = 1.0,
        ip_scales: Sequence[float] = (0.0, 0.5, 1.0),
        guidance_scale: float = 1.0,
        guidance_drop: Sequence[str] = ("image",),
        num_samples: int = 3,
        sampler: str = "ddim",
        num_steps: int | None = 50,
        eta: float = 0.0,
        clip_projection: bool = True,
        seed: int = 0,
        use_ema: bool = True,
        max_cases: int | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        mlflow: bool = True,
        mlflow_checkpoint: str | os.PathLike | None = None,
    ) -> None:
        if method not in SYNTHESIS_METHODS:
            raise ValueError(f"method must be one of {SYNTHESIS_METHODS}, got {method!r}.")
        if mode not in SYNTHESIS_MODES:
            raise ValueError(f"mode must be one of {SYNTHESIS_MODES}, got {mode!r}.")
        if method == "ip_adapter" and (adapter is None or adapter_weights is None):
            raise ValueError("method 'ip_adapter' needs the adapter (an IPAdapter on network) and adapter_weights "
                             "(the file adapter training wrote, e.g. output/adapter/ip_adapter.pt).")
        if method == "ip_adapter" and getattr(adapter, "base", None) is not network:
            raise ValueError("the adapter must be installed on network (IPAdapter(network, ...)).")
        if mode == "reference_guided" and method != "ip_adapter":
            raise ValueError(f"reference-guided generation needs method 'ip_adapter' (lambda = 0 in ip_scales gives the "
                             f"unconditional samples), got {method!r}.")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if max_cases is not None and (not isinstance(max_cases, int) or max_cases < 1):
            raise ValueError(f"max_cases must be a positive integer or None, got {max_cases!r}.")
        if len(image_size) != 3:
            raise ValueError(f"image_size must be (D, H, W), got {list(image_size)}.")
        if not hasattr(network, "tokens") or not hasattr(network, "null_context"):
            raise TypeError(f"network must be a ContextConditionedUNet (tokens / null_context), got {type(network).__name__}.")
        diffusion.sampling_timesteps(sampler, num_steps)  # fail now on a sampler / process mismatch
        self.network, self.diffusion, self.adapter = network, diffusion, adapter
        self.checkpoint = Path(checkpoint)
        self.adapter_weights = Path(adapter_weights) if adapter_weights is not None else None
        self.output_dir = Path(output_dir)
        self.datalist = Path(datalist)
        self.method, self.mode, self.split = method, mode, split
        self.reference_modality, self.target_modality = reference_modality, target_modality
        self.dataset_name = dataset_name
        self.image_size = [int(s) for s in image_size]
        self.intensity_range = list(intensity_range) if intensity_range is not None else None
        self.ip_scale, self.ip_scales = float(ip_scale), [float(s) for s in ip_scales]
        self.guidance_scale = float(guidance_scale)
        self.guidance_drop = (guidance_drop,) if isinstance(guidance_drop, str) else tuple(guidance_drop)
        self.num_samples = num_samples
        self.sampler, self.num_steps, self.eta = sampler, num_steps, float(eta)
        self.clip_projection, self.seed, self.use_ema = clip_projection, int(seed), use_ema
        self.max_cases = max_cases
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.mlflow = mlflow
        self.mlflow_checkpoint = Path(mlflow_checkpoint) if mlflow_checkpoint is not None else None
        self._weights: dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        from .diffusion.conditioning import load_frozen_base

        hint = ("train it first (train_base.json for 'base' / 'ip_adapter', train_base.json + concat.json for "
                "'concat') or set checkpoint.")
        try:
            load_frozen_base(self.network, self.checkpoint, self.use_ema, self.device, diffusion=self.diffusion)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} ({self.method}: {hint})") from None
        self._weights = {"checkpoint": self.network.base_checkpoint}
        if self.method == "concat" and self.network.in_channels != 2 * self.network.out_channels:
            raise ValueError(
                f"method 'concat' needs a network with twice the input channels (reference concatenated), got "
                f"in_channels={self.network.in_channels}, out_channels={self.network.out_channels}; add concat.json."
            )
        if self.method != "concat" and self.network.in_channels != self.network.out_channels:
            raise ValueError(f"method {self.method!r} needs in_channels == out_channels, got {self.network.in_channels} "
                             f"and {self.network.out_channels}; drop concat.json or use method 'concat'.")
        if self.method == "ip_adapter":
            self.adapter.load_adapter(self.adapter_weights)
            self.adapter.to(self.device).eval()
            self._weights["adapter"] = str(self.adapter_weights.resolve())
        self.network.eval()

    def _transform(self, keys: Sequence[str]):
        from .data import volume_transforms

        return volume_transforms(list(keys), self.image_size, self._range)

    def _load_volume(self, path: str, key: str = "volume") -> torch.Tensor:
        """``path`` through the training chain -> ``(1, C, D, H, W)`` in [-1, 1] on the device."""
        vol = self._transform([key])({key: path})[key]
        return torch.as_tensor(vol)[None].float().to(self.device)

    # -- sampling --------------------------------------------------------------------------------------------------

    def generate(self, reference: torch.Tensor, modality: str, seed: int, ip_scale: float | None = None,
                 num: int = 1) -> torch.Tensor:
        """Sample ``num`` volumes of ``modality`` for one reference.

        Args:
            reference: ``(1, C, D, H, W)`` in [-1, 1] (unused by ``"base"``).
            modality: the target modality (base context).
            seed: sampling seed.
            ip_scale: lambda (IP-Adapter), default ``self.ip_scale``.
            num: volumes sampled together (same reference).

        Returns:
            ``(num, C, D, H, W)`` in [-1, 1].
        """
        net = self.network
        conditions = {"modality": modality}
        if self.dataset_name is not None and "dataset" in net.fields:
            conditions["dataset"] = self.dataset_name
        with torch.no_grad():
            context = net.tokens(conditions).to(self.device)
            null = net.null_context(1).to(self.device)
        concat = None
        if self.method == "ip_adapter":
            model = ClassifierFreeGuidance(self.adapter, self.guidance_scale, null_context=null, drop=self.guidance_drop)
            model.set_image_prompt(image=reference, scale=self.ip_scale if ip_scale is None else ip_scale)
        else:
            model = ClassifierFreeGuidance(net, self.guidance_scale, null_context=null, drop=("context",))
            if self.method == "concat":
                concat = reference.expand(num, -1, -1, -1, -1)
        channels = net.out_channels // self.diffusion.channel_factor
        return self.diffusion.sample(
            model, [channels, *self.image_size], num_samples=num, sampler=self.sampler, num_steps=self.num_steps,
            eta=self.eta, clip_projection=self.clip_projection, seed=seed, context=context, concat=concat,
            device=self.device, progress=self.progress,
        ).float().clamp(-1.0, 1.0)

    def _to_range(self, vol: torch.Tensor) -> torch.Tensor:
        lo, hi = self._range
        return (vol.float().clamp(-1, 1) + 1) / 2 * (hi - lo) + lo

    def _write(self, vol: torch.Tensor, reference_path: str, path: Path, description: str) -> Path:
        """``vol`` ``(C, D, H, W)`` in [-1, 1] -> NIfTI on the reference's grid, affine and codes."""
        grid = reference_grid(reference_path)
        data = _restore_grid(self._to_range(vol), grid.shape, self._range[0])
        return save_nifti(data[0] if data.shape[0] == 1 else data, grid.affine, path, description=description,
                          codes=grid.codes, qform=grid.qform)

    # -- runs ------------------------------------------------------------------------------------------------------

    def _cases(self) -> list[dict[str, Any]]:
        from .data import read_datalist

        data = read_datalist(self.datalist)
        entries = data.get(self.split)
        if not isinstance(entries, list) or not entries:
            lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            raise KeyError(f"Datalist {self.datalist} has no (non-empty) split {self.split!r}; it has {lists}.")
        out = []
        for i, entry in enumerate(entries[: self.max_cases]):
            entry = dict(entry) if isinstance(entry, Mapping) else {"error": f"entry {i} is not an object: {entry!r}"}
            for key, value in list(entry.items()):
                if key in (self.reference_modality, self.target_modality) and isinstance(value, str):
                    entry[key] = value if os.path.isabs(value) else str(self.datalist.parent / value)
            entry.setdefault("case", f"case{i:04d}")
            out.append(entry)
        return out

    def run(self) -> dict[str, Any]:
        """Load the weights, generate, write, measure; returns the manifest (also ``output_dir/manifest.json``)."""
        from .data import intensity_range as datalist_range

        self._range = self.intensity_range or datalist_range(self.datalist)
        self._load()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cases = self._cases()
        result = self._run_paired(cases) if self.mode == "paired" else self._run_reference_guided(cases)
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": self.mode, "method": self.method, "split": self.split, "datalist": str(self.datalist.resolve()),
            "reference_modality": self.reference_modality,
            "target_modality": self.target_modality if self.mode == "paired" else self.reference_modality,
            "dataset_name": self.dataset_name, "weights": self._weights,
            "ip_scale": self.ip_scale if self.mode == "paired" else None,
            "ip_scales": self.ip_scales if self.mode == "reference_guided" else None,
            "guidance_scale": self.guidance_scale, "guidance_drop": list(self.guidance_drop),
            "sampler": self.sampler,
            "num_steps": self.num_steps if self.num_steps is not None
            else len(self.diffusion.sampling_timesteps(self.sampler)) - 1,
            "eta": self.eta, "clip_projection": self.clip_projection, "seed": self.seed,
            "image_size": self.image_size, "intensity_range": list(self._range), "diffusion": self.diffusion.config(),
            "device": str(self.device), "seconds_total": round(time.perf_counter() - t0, 2),
            "versions": {"wdm3d": __version__, "torch": torch.__version__, "python": platform.python_version()},
            **result["manifest"],
        }
        atomic_write_text(self.output_dir / "manifest.json", json.dumps(manifest, indent=2))
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(result["metrics"], indent=2))
        if self.mlflow:
            self._log_mlflow(result["files"])
        n_ok, n_bad = len(result["manifest"]["cases"]), len(result["manifest"]["failures"])
        print(f"{self.mode} synthesis ({self.method}): {n_ok} case(s) written, {n_bad} failed -> {self.output_dir} "
              "(manifest.json, metrics.json)")
        return manifest

    def _run_paired(self, cases: list[dict]) -> dict[str, Any]:
        from .metrics import reconstruction_metrics, summarize_cases

        rows, failures, metric_rows, files = [], [], [], []
        tgt = self.target_modality
        for i, entry in enumerate(cases):
            name = str(entry["case"])
            try:
                if "error" in entry:
                    raise ValueError(entry["error"])
                ref_path = entry.get(self.reference_modality)
                if not isinstance(ref_path, str):
                    raise KeyError(f"case {name} has no reference {self.reference_modality!r} (keys {sorted(entry)}).")
                reference = self._load_volume(ref_path)
                t_case = time.perf_counter()
                seed = batch_seed(self.seed, i)
                synth = self.generate(reference, tgt, seed)[0]
                seconds = time.perf_counter() - t_case
                nii = self._write(synth, ref_path, self.output_dir / f"{name}_{tgt}.nii.gz",
                                  f"synthetic {tgt} from {self.reference_modality} (wdm3d {self.method})")
                row: dict[str, Any] = {"case": name, "index": i, "seed": seed, "reference": ref_path,
                                       "nifti": nii.name, "seconds": round(seconds, 2)}
                shown = [reference[0, 0], synth[0]]
                truth_path = entry.get(tgt)
                if isinstance(truth_path, str) and os.path.isfile(truth_path):
                    truth = self._load_volume(truth_path)
                    values = reconstruction_metrics(synth[None], truth, (-1.0, 1.0))[0]
                    row.update(truth=truth_path, **values)
                    metric_rows.append({"case": name, **values})
                    shown.append(truth[0, 0])
                png = save_montage(self.output_dir / f"{name}_{tgt}.png", [v.cpu() for v in shown],
                                   affine=reference_grid(ref_path)[0], value_range=(-1.0, 1.0))
                row["png"] = png.name
                files += [nii, png]
                rows.append(row)
                logger.info("Case %s: %s%s", name, nii, "" if "psnr" not in row else
                            f" (PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, MAE {row['mae']:.4f})")
            except Exception as err:  # one bad case must not end the run: report it and go on
                logger.error("Case %s failed: %s: %s", name, type(err).__name__, err)
                failures.append({"case": name, "file": str(entry.get(self.reference_modality)),
                                 "error": f"{type(err).__name__}: {err}"})
        if not rows:
            raise RuntimeError(f"No case of split {self.split!r} in {self.datalist} could be synthesised; "
                               f"failures: {failures}")
        summary = summarize_cases([{k: v for k, v in r.items() if k != "case"} for r in metric_rows]) if metric_rows else None
        metrics = {"mode": "paired", "method": self.method, "target_modality": tgt,
                   "reference_modality": self.reference_modality, "ip_scale": self.ip_scale,
                   "guidance_scale": self.guidance_scale, "value_range": [-1.0, 1.0], "summary": summary,
                   "cases": metric_rows, "failures": failures}
        if summary:
            print(f"{self.method} {self.reference_modality}->{tgt} on {summary['num_cases']} case(s): PSNR "
                  f"{summary['psnr_mean']:.2f} dB, SSIM {summary['ssim_mean']:.4f}, MAE {summary['mae_mean']:.4f}")
        return {"manifest": {"cases": rows, "failures": failures}, "metrics": metrics, "files": files}

    def _run_reference_guided(self, cases: list[dict]) -> dict[str, Any]:
        from .metrics.reconstruction import psnr, ssim3d

        mod = self.reference_modality
        refs: dict[str, tuple[str, torch.Tensor]] = {}
        failures = []
        for entry in cases:
            name = str(entry["case"])
            try:
                if "error" in entry:
                    raise ValueError(entry["error"])
                path = entry.get(mod)
                if not isinstance(path, str):
                    raise KeyError(f"case {name} has no reference {mod!r} (keys {sorted(entry)}).")
                refs[name] = (path, self._load_volume(path).cpu())
            except Exception as err:
                logger.error("Case %s failed: %s: %s", name, type(err).__name__, err)
                failures.append({"case": name, "file": str(entry.get(mod)), "error": f"{type(err).__name__}: {err}"})
        if not refs:
            raise RuntimeError(f"No reference of split {self.split!r} in {self.datalist} could be read: {failures}")

        def ssim(a, b):
            return float(ssim3d(a, b, 2.0)[0])

        def psnr_(a, b):
            return float(psnr(a, b, 2.0)[0])

        seeds = [batch_seed(self.seed, j) for j in range(self.num_samples)]  # sample j: one seed for every reference
        rows, files, cache = [], [], {}
        for name, (path, ref) in refs.items():
            others = [v for n, (_, v) in refs.items() if n != name]
            for scale in self.ip_scales:
                try:
                    key = ("unconditional", self.seed) if scale == 0.0 else None  # lambda 0 is the base: same for all
                    t_case = time.perf_counter()
                    if key in cache:
                        vols = cache[key]
                    else:
                        vols = torch.cat([self.generate(ref.to(self.device), mod, seeds[j], scale).cpu()
                                          for j in range(self.num_samples)])
                        if key is not None:
                            cache[key] = vols
                    seconds = time.perf_counter() - t_case
                    folder = self.output_dir / name / f"lambda_{scale:g}"
                    for j in range(self.num_samples):
                        v = vols[j : j + 1]
                        nii = self._write(v[0], path, folder / f"sample_{j:02d}.nii.gz",
                                          f"reference-guided {mod} lambda {scale:g} (wdm3d)")
                        files.append(nii)
                        rows.append({
                            "case": name, "ip_scale": scale, "sample": j, "seed": seeds[j],
                            "nifti": str(nii.relative_to(self.output_dir)),
                            "ssim_to_reference": ssim(v, ref), "psnr_to_reference": psnr_(v, ref),
                            "ssim_to_others": float(np.mean([ssim(v, o) for o in others])) if others else None,
                            "psnr_to_others": float(np.mean([psnr_(v, o) for o in others])) if others else None,
                            "seconds": round(seconds / self.num_samples, 2),
                        })
                    png = save_montage(folder / "montage.png", [ref[0, 0]] + [vols[j, 0] for j in range(len(vols))],
                                       affine=reference_grid(path)[0], value_range=(-1.0, 1.0))
                    files.append(png)
                    rows[-1]["ssim_between_samples"] = _pairwise(ssim, [vols[j : j + 1] for j in range(len(vols))])
                except Exception as err:
                    logger.error("Case %s (lambda %g) failed: %s: %s", name, scale, type(err).__name__, err)
                    failures.append({"case": name, "ip_scale": scale, "error": f"{type(err).__name__}: {err}"})
        if not rows:
            raise RuntimeError(f"Reference-guided generation failed for every reference: {failures}")
        summary = {}
        for scale in self.ip_scales:
            sel = [r for r in rows if r["ip_scale"] == scale]
            if not sel:
                continue

            def mean(key, sel=sel):
                vals = [r[key] for r in sel if isinstance(r.get(key), (int, float))]
                return float(np.mean(vals)) if vals else None

            s = {k: mean(k) for k in ("ssim_to_reference", "ssim_to_others", "psnr_to_reference", "psnr_to_others",
                                       "ssim_between_samples")}
            s["ssim_margin"] = (s["ssim_to_reference"] - s["ssim_to_others"]
                                if s["ssim_to_others"] is not None else None)
            s["num_volumes"] = len(sel)
            summary[f"{scale:g}"] = s
            print(f"reference-guided {mod}, lambda {scale:g}: SSIM to reference {s['ssim_to_reference']:.4f}"
                  + (f", to other cases {s['ssim_to_others']:.4f}" if s["ssim_to_others"] is not None else ""))
        metrics = {"mode": "reference_guided", "method": self.method, "modality": mod, "ip_scales": self.ip_scales,
                   "num_samples": self.num_samples, "guidance_scale": self.guidance_scale, "value_range": [-1.0, 1.0],
                   "summary": summary, "samples": rows, "failures": failures}
        cases_out = sorted({r["case"] for r in rows})
        return {"manifest": {"cases": cases_out, "samples": rows, "failures": failures}, "metrics": metrics,
                "files": files}

    def _log_mlflow(self, files: Sequence[Path]) -> None:
        from .artifacts import latest_checkpoint, load_checkpoint
        from .tracking import log_to_run

        source = self.mlflow_checkpoint or self.checkpoint
        try:
            path = latest_checkpoint(source) if Path(source).is_dir() else Path(source)
            run_info = load_checkpoint(path).get("mlflow") if path is not None and path.is_file() else None
        except (OSError, RuntimeError, ValueError) as err:
            logger.warning("No MLflow run found in %s (%s); outputs stay on disk.", source, err)
            return
        if not run_info or not run_info.get("run_id"):
            return
        pngs = [f for f in files if f.suffix == ".png"]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        log_to_run(run_info, [self.output_dir / "manifest.json", self.output_dir / "metrics.json", *pngs],
                   f"synthesis/{self.mode}-{self.method}-{stamp}")
