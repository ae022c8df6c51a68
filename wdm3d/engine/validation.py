"""Validation during training: sample a few volumes (diffusion) or reconstruct a validation set (autoencoder), and
write their mid-slices and statistics, so progress can be seen; a failed round is reported, not fatal."""

from __future__ import annotations

import abc
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Events

from ..artifacts import unwrap
from ..diffusion import WaveletDiffusion
from ..io import atomic_write_text, save_montage
from ..metrics import reconstruction_metrics, summarize_cases
from ..networks.vae_ops import reconstruct

__all__ = ["ReconstructionValidator", "SampleValidator"]

logger = logging.getLogger(__name__)


class _Rounds(abc.ABC):
    """A validator's round, run so that a failure (an OOM, a NaN volume, a full disk) is reported, not fatal.

    A failed round logs the error with its traceback, writes ``{"epoch", "iteration", "error"}`` to the history and
    counts ``validation_failures`` in the engine's metrics (logged every epoch, unlike the ``val_*`` of a round);
    training goes on. ``strict=True`` re-raises instead (tests). A round that succeeds bumps
    ``engine.state.val_round``, which tells the MLflow tracker its ``val_*`` are new.
    """

    output_dir: Path
    history: list[dict]
    strict: bool = False
    _last_epoch: int = -1

    @abc.abstractmethod
    def _round(self, engine) -> None:
        """One validation round (the subclass's work)."""

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch
        if epoch == self._last_epoch:  # COMPLETED right after an interval epoch: already done
            return
        self._last_epoch = epoch
        try:
            self._round(engine)
        except Exception as err:
            if self.strict:
                raise
            engine.logger.error(
                "%s at epoch %d failed; training goes on: %s: %s",
                type(self).__name__,
                epoch,
                type(err).__name__,
                err,
                exc_info=True,
            )
            engine.state.metrics["validation_failures"] = engine.state.metrics.get("validation_failures", 0) + 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            record = {"epoch": epoch, "iteration": engine.state.iteration, "error": f"{type(err).__name__}: {err}"}
            try:
                self.history = _append_history(self.output_dir / "history.json", self.history, record)
            except OSError as write_err:  # (a full disk may be why the round failed)
                engine.logger.warning(
                    "Cannot record the failed round in %s: %s", self.output_dir / "history.json", write_err
                )
            return
        engine.state.val_round = getattr(engine.state, "val_round", 0) + 1


def _append_history(path: Path, history: list[dict], record: dict) -> list[dict]:
    """``history`` + ``record``, written to ``path`` atomically. The first round of a resumed run starts from the
    file's earlier rounds (those before ``record``'s epoch), so resuming does not wipe the history."""
    if not history and path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = []
        history = (
            [
                r
                for r in earlier
                if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < record["epoch"]
            ]
            if isinstance(earlier, list)
            else []
        )
    history = [*history, record]
    atomic_write_text(path, json.dumps(history, indent=2))
    return history


class SampleValidator(_Rounds):
    """Every ``interval`` epochs, sample ``num_samples`` volumes with ``network`` and save a PNG montage.

    The montage (one row of axial / coronal / sagittal mid-slices per sample) goes to
    ``output_dir/epoch_XXXX.png``; ``output_dir/history.json`` records each round (epoch, iteration, seconds,
    intensity statistics, file). The same seed is used every time, so successive montages show the same noise
    becoming a volume as training goes on. The engine's ``state.metrics`` get ``val_sample_mean`` and
    ``val_sample_std`` (picked up by MONAI's stats and MLflow handlers).

    Args:
        diffusion: the process the network was trained with.
        network: the network to sample with, normally the EMA copy (``ema_handler.ema_model``).
        image_shape: ``(C, D, H, W)`` of one volume.
        output_dir: where montages go.
        interval: epochs between rounds (also runs after the last epoch if ``on_completed``).
        num_samples: volumes per round.
        sampler, num_steps: the sampler and its steps (a few-step sampler keeps validation cheap).
        seed: sampling seed.
        affine: voxel-to-world matrix of the training data (for correctly oriented previews), or a callable
            returning it.
        enabled: a boolean switch (e.g. False on ranks > 0 under DDP).
        on_completed: also sample when training completes.
        callbacks: functions called as ``f(engine, png_path, volumes)`` after each round (e.g. MLflow logging).
        decoder: latent diffusion: a :class:`wdm3d.networks.vae_ops.LatentDecoder` turning the sampled latents into the
            volumes shown (``image_shape`` is then the latent's shape, and the clip projection is off).
        strict: re-raise a failed round (default: report it and let training go on).
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        network: torch.nn.Module,
        image_shape: Sequence[int],
        output_dir: str | os.PathLike,
        interval: int = 1,
        num_samples: int = 2,
        sampler: str = "ddim",
        num_steps: int = 50,
        seed: int = 0,
        affine=None,
        enabled: bool = True,
        on_completed: bool = True,
        callbacks: Sequence[Callable] = (),
        decoder: Callable | None = None,
        strict: bool = False,
    ) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval!r}.")
        if len(image_shape) != 4:
            raise ValueError(f"image_shape must be (C, D, H, W), got {list(image_shape)}.")
        diffusion.sampling_timesteps(sampler, num_steps)  # validates sampler/steps now, not after an epoch
        self.diffusion, self.network = diffusion, network
        self.image_shape = [int(s) for s in image_shape]
        self.output_dir = Path(output_dir)
        self.interval, self.num_samples = interval, num_samples
        self.sampler, self.num_steps, self.seed = sampler, num_steps, seed
        self.affine = affine
        self.enabled, self.on_completed = enabled, on_completed
        self.callbacks = list(callbacks)
        self.decoder = decoder
        self.strict = strict
        self.history: list[dict] = []
        self._last_epoch = -1

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        if self.on_completed:
            engine.add_event_handler(Events.COMPLETED, self)

    def _round(self, engine) -> None:
        epoch = engine.state.epoch
        net = unwrap(self.network)
        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        try:
            volumes = self.diffusion.sample(
                net,
                self.image_shape,
                num_samples=self.num_samples,
                sampler=self.sampler,
                num_steps=self.num_steps,
                seed=self.seed,
                progress=False,
                clip_projection=self.decoder is None and self.diffusion.clip_range is not None,
            )
            if self.decoder is not None:
                volumes = self.decoder(volumes)
        finally:
            net.train(was_training)
        seconds = time.perf_counter() - t0
        affine = self.affine() if callable(self.affine) else self.affine
        png = save_montage(
            self.output_dir / f"epoch_{epoch:04d}.png",
            volumes,
            affine=affine,
            value_range=self.diffusion.clip_range or ((-1.0, 1.0) if self.decoder is not None else None),
        )
        v = volumes.float()
        record = {
            "epoch": epoch,
            "iteration": engine.state.iteration,
            "seconds": round(seconds, 3),
            "mean": v.mean().item(),
            "std": v.std().item(),
            "min": v.min().item(),
            "max": v.max().item(),
            "file": png.name,
        }
        self.history = _append_history(self.output_dir / "history.json", self.history, record)
        engine.state.metrics["val_sample_mean"] = record["mean"]
        engine.state.metrics["val_sample_std"] = record["std"]
        engine.logger.info(
            "Validation samples (epoch %d, %s-%d, %.1f s): mean %.3f std %.3f -> %s",
            epoch,
            self.sampler,
            self.num_steps,
            seconds,
            record["mean"],
            record["std"],
            png,
        )
        for fn in self.callbacks:
            fn(engine, png, volumes)


class ReconstructionValidator(_Rounds):
    """Every ``interval`` epochs, reconstruct a validation set with an autoencoder and report PSNR / SSIM / MAE.

    The autoencoder runs in eval mode on the posterior mean (``model.encode(x).mean`` then ``model.decode``).
    Written: ``output_dir/epoch_XXXX.png`` (rows alternate input / reconstruction for the first
    ``preview_cases`` cases) and ``output_dir/history.json``; the engine's ``state.metrics`` get ``val_psnr``,
    ``val_ssim``, ``val_mae`` (and ``val_mae_hu`` with ``physical_range``), which the stats and MLflow handlers
    pick up.

    Args:
        network: the autoencoder (normally the EMA copy), see :mod:`wdm3d.networks.vae_base`.
        data_loader: validation batches (dicts holding ``image_key``).
        image_key: the volume's key.
        output_dir: where montages and history go.
        interval: epochs between rounds (and once more when training completes).
        value_range: intensity range of the volumes (the bundles' [-1, 1]).
        physical_range: what ``value_range`` maps to in physical units (CT: the datalist's HU window).
        max_cases: stop after this many validation volumes (None: all).
        preview_cases: cases shown in the montage.
        affine: voxel-to-world matrix (or a callable returning it) for oriented previews.
        enabled: False turns it off (ranks > 0).
        callbacks: ``f(engine, png_path, volumes)`` after each round (MLflow).
        strict: re-raise a failed round (default: report it and let training go on).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        data_loader,
        image_key: str,
        output_dir: str | os.PathLike,
        interval: int = 1,
        value_range: Sequence[float] = (-1.0, 1.0),
        physical_range: Sequence[float] | None = None,
        max_cases: int | None = 8,
        preview_cases: int = 2,
        affine=None,
        enabled: bool = True,
        callbacks: Sequence[Callable] = (),
        strict: bool = False,
    ) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval!r}.")
        self.strict = strict
        self.network, self.data_loader, self.image_key = network, data_loader, image_key
        self.output_dir = Path(output_dir)
        self.interval = interval
        self.value_range = [float(v) for v in value_range]
        self.physical_range = physical_range
        self.max_cases, self.preview_cases = max_cases, preview_cases
        self.affine, self.enabled = affine, enabled
        self.callbacks = list(callbacks)
        self.history: list[dict] = []
        self._last_epoch = -1

    def attach(self, engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def _round(self, engine) -> None:
        epoch = engine.state.epoch
        net = unwrap(self.network)
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        rows, previews, t0 = [], [], time.perf_counter()
        try:
            for batch in self.data_loader:
                x = torch.as_tensor(batch[self.image_key]).float().to(device)
                recon = reconstruct(net, x)
                rows += reconstruction_metrics(recon, x, self.value_range, self.physical_range)
                for i in range(x.shape[0]):
                    if len(previews) < 2 * self.preview_cases:
                        previews += [x[i, :1].cpu(), recon[i, :1].float().cpu()]
                if self.max_cases is not None and len(rows) >= self.max_cases:
                    break
        finally:
            net.train(was_training)
        if not rows:
            raise ValueError("ReconstructionValidator: the validation data loader produced no volumes.")
        summary = summarize_cases(rows)
        affine = self.affine() if callable(self.affine) else self.affine
        png = save_montage(
            self.output_dir / f"epoch_{epoch:04d}.png",
            torch.stack(previews),
            affine=affine,
            value_range=self.value_range,
        )
        record = {
            "epoch": epoch,
            "iteration": engine.state.iteration,
            "seconds": round(time.perf_counter() - t0, 3),
            **summary,
            "file": png.name,
        }
        self.history = _append_history(self.output_dir / "history.json", self.history, record)
        for key in ("psnr", "ssim", "mae", "mae_hu"):
            if f"{key}_mean" in summary:
                engine.state.metrics[f"val_{key}"] = summary[f"{key}_mean"]
        engine.logger.info(
            "Validation reconstruction (epoch %d, %d cases): PSNR %.2f dB, SSIM %.4f, MAE %.4f -> %s",
            epoch,
            len(rows),
            *(summary.get(f"{k}_mean", float("nan")) for k in ("psnr", "ssim", "mae")),
            png,
        )
        for fn in self.callbacks:
            fn(engine, png, None)
