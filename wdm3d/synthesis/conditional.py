"""The conditional synthesis run: settings checked up front, the frozen base (and adapter or concat model) loaded,
one sampling call per reference, outputs written on the reference's grid; the two modes' loops are in
:mod:`.paired` and :mod:`.reference_guided`."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..artifacts import load_checkpoint, resolve_checkpoint
from ..data import intensity_range as datalist_range
from ..data import read_datalist, volume_transforms
from ..diffusion import ClassifierFreeGuidance, WaveletDiffusion
from ..diffusion.conditioning import load_frozen_base
from ..io import atomic_write_text, save_nifti
from ..tracking import log_to_run
from .grid import reference_grid, restore_grid
from .paired import run_paired
from .reference_guided import run_reference_guided

__all__ = ["ConditionalSynthesis", "SYNTHESIS_METHODS", "SYNTHESIS_MODES"]

logger = logging.getLogger(__name__)

SYNTHESIS_METHODS = ("ip_adapter", "concat", "base")
SYNTHESIS_MODES = ("paired", "reference_guided")


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
            the generator seed :func:`wdm3d.engine.seeding.derive_seed` ``(seed, i)`` / ``(seed, j)`` (recorded per row):
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
            raise ValueError(
                "method 'ip_adapter' needs the adapter (an IPAdapter on network) and adapter_weights "
                "(the file adapter training wrote, e.g. output/adapter/ip_adapter.pt)."
            )
        if method == "ip_adapter" and getattr(adapter, "base", None) is not network:
            raise ValueError("the adapter must be installed on network (IPAdapter(network, ...)).")
        if mode == "reference_guided" and method != "ip_adapter":
            raise ValueError(
                f"reference-guided generation needs method 'ip_adapter' (lambda = 0 in ip_scales gives the "
                f"unconditional samples), got {method!r}."
            )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if max_cases is not None and (not isinstance(max_cases, int) or max_cases < 1):
            raise ValueError(f"max_cases must be a positive integer or None, got {max_cases!r}.")
        if len(image_size) != 3:
            raise ValueError(f"image_size must be (D, H, W), got {list(image_size)}.")
        if not hasattr(network, "tokens") or not hasattr(network, "null_context"):
            raise TypeError(
                f"network must be a ContextConditionedUNet (tokens / null_context), got {type(network).__name__}."
            )
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
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.progress = progress
        self.mlflow = mlflow
        self.mlflow_checkpoint = Path(mlflow_checkpoint) if mlflow_checkpoint is not None else None
        self._weights: dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------------------------------------------

    def _load(self) -> None:
        hint = (
            "train it first (train_base.json for 'base' / 'ip_adapter', train_base.json + concat.json for "
            "'concat') or set checkpoint."
        )
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
            raise ValueError(
                f"method {self.method!r} needs in_channels == out_channels, got {self.network.in_channels} "
                f"and {self.network.out_channels}; drop concat.json or use method 'concat'."
            )
        if self.method == "ip_adapter":
            self.adapter.load_adapter(self.adapter_weights)
            self.adapter.to(self.device).eval()
            self._weights["adapter"] = str(self.adapter_weights.resolve())
        self.network.eval()

    def _transform(self, keys: Sequence[str]) -> Callable[[dict], dict]:
        return volume_transforms(list(keys), self.image_size, self._range)

    def load_volume(self, path: str, key: str = "volume") -> torch.Tensor:
        """``path`` through the training chain -> ``(1, C, D, H, W)`` in [-1, 1] on the device.

        Args:
            path: a NIfTI volume (a reference or a true target).
            key: the dictionary key the chain reads it under.
        """
        vol = self._transform([key])({key: path})[key]
        return torch.as_tensor(vol)[None].float().to(self.device)

    # -- sampling --------------------------------------------------------------------------------------------------

    def generate(
        self, reference: torch.Tensor, modality: str, seed: int, ip_scale: float | None = None, num: int = 1
    ) -> torch.Tensor:
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
        concat, prompt = None, None
        if self.method == "ip_adapter":
            model = ClassifierFreeGuidance(
                self.adapter, self.guidance_scale, null_context=null, drop=self.guidance_drop
            )
            with torch.no_grad():
                tokens = self.adapter.encode_image(reference)
            prompt = {"image_tokens": tokens, "image_scale": self.ip_scale if ip_scale is None else ip_scale}
        else:
            model = ClassifierFreeGuidance(net, self.guidance_scale, null_context=null, drop=("context",))
            if self.method == "concat":
                concat = reference.expand(num, -1, -1, -1, -1)
        channels = net.out_channels // self.diffusion.channel_factor
        return (
            self.diffusion.sample(
                model,
                [channels, *self.image_size],
                num_samples=num,
                sampler=self.sampler,
                num_steps=self.num_steps,
                eta=self.eta,
                clip_projection=self.clip_projection,
                seed=seed,
                context=context,
                concat=concat,
                device=self.device,
                progress=self.progress,
                model_kwargs=prompt,
            )
            .float()
            .clamp(-1.0, 1.0)
        )

    def _to_range(self, vol: torch.Tensor) -> torch.Tensor:
        lo, hi = self._range
        return (vol.float().clamp(-1, 1) + 1) / 2 * (hi - lo) + lo

    def write_volume(self, vol: torch.Tensor, reference_path: str, path: Path, description: str) -> Path:
        """``vol`` ``(C, D, H, W)`` in [-1, 1] -> NIfTI on the reference's grid, affine and codes.

        Args:
            vol: a generated volume on the model grid.
            reference_path: the reference NIfTI whose grid and header geometry the output takes.
            path: the output file.
            description: the NIfTI header's description.
        """
        grid = reference_grid(reference_path)
        data = restore_grid(self._to_range(vol), grid.shape, self._range[0])
        return save_nifti(
            data[0] if data.shape[0] == 1 else data,
            grid.affine,
            path,
            description=description,
            codes=grid.codes,
            qform=grid.qform,
        )

    # -- runs ------------------------------------------------------------------------------------------------------

    def _cases(self) -> list[dict[str, Any]]:
        # not load_datalist: an entry that is not an object, or lacks a modality, is that case's failure (reported
        # with the others), not an error that stops the whole run
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
        self._range = self.intensity_range or datalist_range(self.datalist)
        self._load()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cases = self._cases()
        result = run_paired(self, cases) if self.mode == "paired" else run_reference_guided(self, cases)
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": self.mode,
            "method": self.method,
            "split": self.split,
            "datalist": str(self.datalist.resolve()),
            "reference_modality": self.reference_modality,
            "target_modality": self.target_modality if self.mode == "paired" else self.reference_modality,
            "dataset_name": self.dataset_name,
            "weights": self._weights,
            "ip_scale": self.ip_scale if self.mode == "paired" else None,
            "ip_scales": self.ip_scales if self.mode == "reference_guided" else None,
            "guidance_scale": self.guidance_scale,
            "guidance_drop": list(self.guidance_drop),
            "sampler": self.sampler,
            "num_steps": self.num_steps
            if self.num_steps is not None
            else len(self.diffusion.sampling_timesteps(self.sampler)) - 1,
            "eta": self.eta,
            "clip_projection": self.clip_projection,
            "seed": self.seed,
            "image_size": self.image_size,
            "intensity_range": list(self._range),
            "diffusion": self.diffusion.config(),
            "device": str(self.device),
            "seconds_total": round(time.perf_counter() - t0, 2),
            "versions": {"wdm3d": __version__, "torch": torch.__version__, "python": platform.python_version()},
            **result["manifest"],
        }
        atomic_write_text(self.output_dir / "manifest.json", json.dumps(manifest, indent=2))
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(result["metrics"], indent=2))
        if self.mlflow:
            self._log_mlflow(result["files"])
        n_ok, n_bad = len(result["manifest"]["cases"]), len(result["manifest"]["failures"])
        print(
            f"{self.mode} synthesis ({self.method}): {n_ok} case(s) written, {n_bad} failed -> {self.output_dir} "
            "(manifest.json, metrics.json)"
        )
        return manifest

    def _log_mlflow(self, files: Sequence[Path]) -> None:
        source = self.mlflow_checkpoint or self.checkpoint
        try:
            path = resolve_checkpoint(source)
        except FileNotFoundError:
            return  # no checkpoint there, so no run recorded to log to
        try:
            run_info = load_checkpoint(path).get("mlflow")
        except (OSError, RuntimeError, ValueError) as err:
            logger.warning("No MLflow run found in %s (%s); outputs stay on disk.", source, err)
            return
        if not run_info or not run_info.get("run_id"):
            return
        pngs = [f for f in files if f.suffix == ".png"]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        log_to_run(
            run_info,
            [self.output_dir / "manifest.json", self.output_dir / "metrics.json", *pngs],
            f"synthesis/{self.mode}-{self.method}-{stamp}",
        )
