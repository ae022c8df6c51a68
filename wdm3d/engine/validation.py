"""Sample a few volumes during training and write their mid-slices, so progress can be seen."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..diffusion import WaveletDiffusion
from ..io import atomic_write_text, save_montage

__all__ = ["SampleValidator"]

logger = logging.getLogger(__name__)


class SampleValidator:
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
        self.history: list[dict] = []
        self._last_epoch = -1

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        if self.on_completed:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch
        if epoch == self._last_epoch:  # COMPLETED right after an interval epoch: already done
            return
        self._last_epoch = epoch
        net = self.network.module if isinstance(self.network, torch.nn.parallel.DistributedDataParallel) else self.network
        was_training = net.training
        net.eval()
        t0 = time.perf_counter()
        try:
            volumes = self.diffusion.sample(
                net, self.image_shape, num_samples=self.num_samples, sampler=self.sampler,
                num_steps=self.num_steps, seed=self.seed, progress=False,
            )
        finally:
            net.train(was_training)
        seconds = time.perf_counter() - t0
        affine = self.affine() if callable(self.affine) else self.affine
        png = save_montage(self.output_dir / f"epoch_{epoch:04d}.png", volumes, affine=affine,
                           value_range=self.diffusion.clip_range)
        v = volumes.float()
        record = {
            "epoch": epoch, "iteration": engine.state.iteration, "seconds": round(seconds, 3),
            "mean": v.mean().item(), "std": v.std().item(), "min": v.min().item(), "max": v.max().item(),
            "file": png.name,
        }
        self.history.append(record)
        atomic_write_text(self.output_dir / "history.json", json.dumps(self.history, indent=2))
        engine.state.metrics["val_sample_mean"] = record["mean"]
        engine.state.metrics["val_sample_std"] = record["std"]
        engine.logger.info(
            "Validation samples (epoch %d, %s-%d, %.1f s): mean %.3f std %.3f -> %s",
            epoch, self.sampler, self.num_steps, seconds, record["mean"], record["std"], png,
        )
        for fn in self.callbacks:
            fn(engine, png, volumes)
