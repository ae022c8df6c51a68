"""Resuming a training run from the newest checkpoint of its folder, exactly: weights, optimizer, trainer position,
RNG states and the data order of an unfinished epoch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from ...artifacts import (
    CheckpointLoadError,
    check_state_fits,
    checkpoints_by_age,
    latest_checkpoint,
    load_checkpoint,
    named_error,
    unwrap,
)
from ...data import ResumableSampler

__all__ = ["ResumeFromLatest"]

logger = logging.getLogger(__name__)
# saved objects a checkpoint may lack (older files, or runs without them): resuming warns instead of failing
_OPTIONAL = ("rng", "run_config", "mlflow", "geometry", "scaler", "loss")


class ResumeFromLatest:
    """Resume training from the newest checkpoint in ``directory``, if any (an ignite handler).

    At ``Events.STARTED`` it restores every object of ``load_dict`` (network, EMA network, optimizer, the trainer's
    epoch and iteration, RNG states, ...) from a ``weights_only=True`` load; a network of another architecture
    fails naming the first mismatching weight. The run's ``max_epochs`` is kept (so a finished run can be extended).
    When the checkpoint was written mid-epoch and the data loader's sampler is a
    :class:`~wdm3d.data.ResumableSampler`, the batches that epoch already consumed are skipped, so the run
    continues with the same data order. Attach it before any other handler.

    A newest checkpoint that is truncated or corrupt is not deleted: the run resumes from the newest intact one
    saved before it, with a warning naming both; when none is intact it stops with an error naming the damaged
    file(s) and what to do.

    Args:
        directory: where the checkpoints are written.
        load_dict: the same dict that is saved.
        enabled: False turns resuming off (training always starts fresh).
        map_location: passed to ``torch.load``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        load_dict: Mapping[str, object],
        enabled: bool = True,
        map_location: str | torch.device | None = "cpu",
    ) -> None:
        if not load_dict:
            raise ValueError("load_dict must name at least one object to restore.")
        self.directory = Path(directory)
        self.load_dict = dict(load_dict)
        self.enabled = enabled
        self.map_location = map_location
        self.resumed_from: Path | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def restore(self, engine, path: Path) -> None:
        """Load checkpoint ``path`` into ``load_dict`` (and ``engine``'s data position).

        Raises:
            CheckpointLoadError: ``path`` cannot be read; nothing has been restored then.
        """
        ckpt = load_checkpoint(path, self.map_location, suggest_previous=False)
        missing = [k for k in self.load_dict if k not in ckpt and k not in _OPTIONAL]
        if missing:
            raise KeyError(
                f"Checkpoint {path} has no {missing} (it has {sorted(ckpt)}); it was not written by this "
                "training configuration."
            )
        prior_max_epochs = engine.state.max_epochs
        schedulers = any(isinstance(o, torch.optim.lr_scheduler.LRScheduler) for o in self.load_dict.values())
        for name, obj in self.load_dict.items():
            if name not in ckpt:
                logger.warning("Checkpoint %s has no %r: not restored.", path, name)
                continue
            if isinstance(obj, torch.optim.Optimizer) and not schedulers:
                self._load_optimizer(obj, ckpt[name], name, path)
                continue
            if isinstance(obj, torch.nn.Module):
                target = unwrap(obj)
                check_state_fits(target, ckpt[name], f"Checkpoint {path} ({name})")
                target.load_state_dict(ckpt[name])
            else:  # optimizer, scheduler, scaler, trainer, EMA, adapter, RNG: their errors name neither file nor entry
                try:
                    obj.load_state_dict(ckpt[name])
                except Exception as err:
                    raise named_error(
                        err, f"Checkpoint {path}: cannot restore {name!r} ({type(obj).__name__})"
                    ) from err
        if prior_max_epochs is not None:
            if engine.state.epoch > prior_max_epochs:
                raise ValueError(
                    f"Checkpoint {path} is at epoch {engine.state.epoch}, beyond max_epochs="
                    f"{prior_max_epochs}: raise max_epochs to continue training."
                )
            engine.state.max_epochs = prior_max_epochs
        self._continue_data(engine, path)

    @staticmethod
    def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, name: str, path: Path) -> None:
        # the optimizer's state (moments, step counts) from the checkpoint, but the configured lr and weight decay: an
        # optimizer state dict carries its hyperparameters, which would silently override --learning_rate on a
        # resumed run (called only without an LR scheduler, which owns the lr when there is one)
        configured = [{k: g[k] for k in ("lr", "weight_decay") if k in g} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(state)
        except Exception as err:
            raise named_error(err, f"Checkpoint {path}: cannot restore {name!r} ({type(optimizer).__name__})") from err
        changed = {}
        for i, (group, wanted) in enumerate(zip(optimizer.param_groups, configured)):
            for key, value in wanted.items():
                if group[key] != value:
                    changed[f"{name}[{i}].{key}"] = (group[key], value)
                    group[key] = value
        if changed:
            logger.warning(
                "Resuming with the configured optimizer settings, not the checkpoint's (checkpoint, now): %s.", changed
            )

    @staticmethod
    def _continue_data(engine, path: Path) -> None:
        loader = getattr(engine, "data_loader", None)
        length = engine.state.epoch_length
        if loader is None or not length:
            return
        try:
            now = len(loader)
        except TypeError:
            return
        if now != length:
            # another batch size, world size or dataset: keep "an epoch is one pass over the data" (which max_epochs,
            # save_interval and val_interval count) by going on at the last completed epoch with the new length
            epoch = engine.state.iteration // length
            logger.warning(
                "Checkpoint %s has %d iterations per epoch, the data now %d (batch size, number of processes or "
                "dataset changed): continuing after epoch %d with %d iterations per epoch%s; the data order is not "
                "continued exactly.",
                path,
                length,
                now,
                epoch,
                now,
                f" (the {engine.state.iteration % length} iteration(s) of the unfinished epoch are redone)"
                if engine.state.iteration % length
                else "",
            )
            engine.state.epoch_length, engine.state.epoch, engine.state.iteration = now, epoch, epoch * now
            return
        done = engine.state.iteration % length
        if not done:
            return
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and loader.batch_size:
            sampler.skip_next(done * loader.batch_size)
            engine.logger.info(
                "Resuming mid-epoch: skipping the %d batch(es) epoch %d already used.", done, engine.state.epoch + 1
            )
        else:
            logger.warning(
                "Resuming mid-epoch without a ResumableSampler: epoch %d restarts its data order.",
                engine.state.epoch + 1,
            )

    def __call__(self, engine) -> None:
        path = latest_checkpoint(self.directory) if self.enabled else None
        if path is None:
            engine.logger.info(
                "%s: training starts from scratch.",
                f"No checkpoint in {self.directory}" if self.enabled else "Resuming is off",
            )
            return
        # A damaged newest file (an interrupted copy, a full disk) falls back to the newest intact one, with a
        # warning naming both, rather than stopping: a requeued cluster job restarts unattended, and stopping would
        # fail every requeue until someone intervenes, while the fallback costs at most one save interval of work.
        # A file refused as unsafe (pickled code), or one of another architecture, still stops the run.
        candidates = list(reversed(checkpoints_by_age(self.directory)))
        candidates = [path] + [p for p in candidates if p != path]
        damaged: list[CheckpointLoadError] = []
        for candidate in candidates:
            try:
                self.restore(engine, candidate)
            except CheckpointLoadError as err:
                if not err.damaged:
                    raise
                damaged.append(err)
                continue
            path = candidate
            break
        else:
            raise RuntimeError(
                f"Cannot resume from {self.directory}: {damaged[0]} There is no earlier intact checkpoint there either "
                f"({len(damaged)} file(s) tried, none deleted). Copy an intact checkpoint into {self.directory}, or "
                "set resume to false (--resume false) to train from scratch."
            ) from damaged[0]
        if damaged:
            logger.warning(
                "%s Resuming from the newest intact checkpoint instead, %s (the iterations saved after it are redone). "
                "The damaged file(s) %s are left in place: they are overwritten or pruned like any checkpoint as "
                "training saves newer ones, so move them away now to keep them.",
                damaged[0],
                path,
                ", ".join(str(e.path) for e in damaged),
            )
        self.resumed_from = path
        engine.logger.info(
            "Resumed from %s at epoch %d, iteration %d.", path, engine.state.epoch, engine.state.iteration
        )
