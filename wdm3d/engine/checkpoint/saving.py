"""Saving a training run: epoch, iteration, final and SIGTERM checkpoints through ignite's ``Checkpoint``, written
atomically, logged in the folder's save log and pruned only after a save succeeded."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver

from ...artifacts import record_save, save_checkpoint_file, sort_by_age
from .folder_lock import lock_folder, unlock_folder
from .resume import ResumeFromLatest
from .rng import RNGState

__all__ = ["TrainingCheckpoints"]

logger = logging.getLogger(__name__)


class _Saver(DiskSaver):
    """ignite's ``DiskSaver`` writing through :func:`~wdm3d.artifacts.save_checkpoint_file`, and removing nothing.

    ``DiskSaver``'s own atomic write leaves a full disk as torch's errno-less error and its temporary file 0600 (then
    0644 whatever the umask); and ignite's ``Checkpoint`` removes the oldest file *before* writing the next one, so a
    failed save would also cost a checkpoint: pruning is :func:`_prune`'s, after a save succeeded. A ``DiskSaver``
    subclass, so that ``Checkpoint.last_checkpoint`` is the file's full path.
    """

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == self.save_on_rank:
            save_checkpoint_file(checkpoint, self.dirname / filename)

    def remove(self, filename: str) -> None:
        """Nothing: ignite calls this before the next save; pruning is ``_prune``'s, after a save succeeded."""


def _is_writer() -> bool:
    # rank 0 writes the checkpoints (the process group's rank, else torchrun's RANK)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _prune(directory: Path, prefix: str, keep: int | None) -> None:
    # keep the newest ``keep`` files of one kind across restarts (ignite only prunes what its process wrote).
    # Newest = saved last (save log, else modification time), not highest-numbered: a fresh run (resume off) in a
    # folder holding a longer earlier run's files would otherwise delete each of its own checkpoints right after
    # writing it
    if keep is None:
        return
    pat = re.compile(rf"^{re.escape(prefix)}=(\d+)\.pt$")
    found = sort_by_age(directory, [p for p in directory.iterdir() if pat.match(p.name) and p.is_file()])
    for p in found[:-keep] if keep > 0 else found:
        p.unlink(missing_ok=True)


class TrainingCheckpoints:
    """Save (atomically) and resume a training run exactly: ignite's ``Checkpoint`` plus :class:`ResumeFromLatest`.

    Saved with the given objects: the trainer itself (epoch, iteration) under ``"trainer"``, which a bundle config
    cannot add without a reference cycle, the global RNG states under ``"rng"`` (:class:`RNGState`) and, with AMP,
    the trainer's ``GradScaler`` under ``"scaler"``.
    Iteration checkpoints are written after every other end-of-iteration handler (EMA update included), so a
    checkpoint holds one consistent step. Each is written through :func:`~wdm3d.artifacts.save_checkpoint_file`
    (temporary file, fsync, rename; the umask's file mode), and older ones are pruned only after a save succeeded: a
    save that fails on a full disk stops the run with an ``OSError`` naming the file and the errno, and leaves every
    earlier checkpoint and no temporary file.

    On SIGTERM (e.g. a cluster pre-empting the job) the run saves ``checkpoint_interrupted_iteration=N.pt`` at the
    end of the current iteration and stops cleanly; the previous signal handler is restored when training ends.

    While training, rank 0 holds an ``flock`` on ``directory/.lock``: a second run started on the same folder stops
    at once with an error naming the first (its pid, host and start time) instead of mixing checkpoints with it.

    Args:
        directory: checkpoint folder.
        objects: what to save besides the trainer and RNG, e.g. ``{"model": net, "ema": ema_net, "optimizer": opt}``
            (an LR scheduler too, if any); entries that are None (a switched-off discriminator) are left out.
        save_interval: save every this many epochs (0: off).
        n_saved: how many epoch and iteration checkpoints (each) to keep (None: all).
        save_final: also save when training completes (``checkpoint_final_iteration=N.pt``).
        resume: continue from the newest checkpoint in ``directory`` when training starts.
        save_every_iterations: also save every this many iterations (0: off).
        save_on_sigterm: install the SIGTERM handler described above (main thread only).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        objects: Mapping[str, object],
        save_interval: int = 1,
        n_saved: int | None = 3,
        save_final: bool = True,
        resume: bool = True,
        save_every_iterations: int = 0,
        save_on_sigterm: bool = True,
    ) -> None:
        for reserved in ("trainer", "rng"):
            if reserved in objects:
                raise ValueError(f"objects must not contain {reserved!r}: TrainingCheckpoints adds it.")
        if not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(f"save_interval must be an integer >= 0 (epochs), got {save_interval!r}.")
        if not isinstance(save_every_iterations, int) or save_every_iterations < 0:
            raise ValueError(f"save_every_iterations must be an integer >= 0, got {save_every_iterations!r}.")
        if n_saved is not None and (not isinstance(n_saved, int) or n_saved < 1):
            raise ValueError(f"n_saved must be a positive integer or None, got {n_saved!r}.")
        self.directory = Path(directory)
        self.objects = {k: v for k, v in objects.items() if v is not None}  # optional parts (a GAN's D) may be off
        self.save_interval, self.n_saved, self.save_final, self.resume = save_interval, n_saved, save_final, resume
        self.save_every_iterations, self.save_on_sigterm = save_every_iterations, save_on_sigterm
        self.resumer: ResumeFromLatest | None = None
        self.stop_requested = False
        self._previous_handler: Any = None
        self._late_attached = False
        self._lock_fd: int | None = None

    def attach(self, engine) -> None:
        # ignite's Checkpoint + an atomic saver (temp file + rename): MONAI's CheckpointSaver writes in place,
        # so a run killed mid-save would leave a truncated newest checkpoint for the resume to trip on
        objects = {**self.objects, "trainer": engine, "rng": RNGState()}
        if getattr(engine, "scaler", None) is not None and "scaler" not in objects:  # AMP's GradScaler (its scale)
            objects["scaler"] = engine.scaler
        engine.add_event_handler(Events.STARTED, self._lock)  # before the resume reads the folder
        self.resumer = ResumeFromLatest(self.directory, objects, enabled=self.resume)
        self.resumer.attach(engine)
        self.directory.mkdir(parents=True, exist_ok=True)
        saver = _Saver(str(self.directory), require_empty=False)
        pattern = (
            "{filename_prefix}_{score_name}={score}.{ext}"  # checkpoint_epoch=3.pt, checkpoint_final_iteration=9.pt
        )

        def checkpoint(prefix, score_name, n_saved):
            fn = (lambda e: e.state.epoch) if score_name == "epoch" else (lambda e: e.state.iteration)
            return Checkpoint(
                objects,
                saver,
                filename_prefix=prefix,
                score_name=score_name,
                score_function=fn,
                n_saved=n_saved,
                filename_pattern=pattern,
            )

        self._epoch_ckpt = checkpoint("checkpoint", "epoch", self.n_saved) if self.save_interval > 0 else None
        self._iter_ckpt = checkpoint("checkpoint", "iteration", self.n_saved) if self.save_every_iterations else None
        self._signal_ckpt = checkpoint("checkpoint_interrupted", "iteration", 1)
        if self._epoch_ckpt is not None:
            engine.add_event_handler(
                Events.EPOCH_COMPLETED(every=self.save_interval), self._save, self._epoch_ckpt, "checkpoint_epoch"
            )
        if self.save_final:  # one final and one interrupted checkpoint, across launches too
            final = checkpoint("checkpoint_final", "iteration", 1)
            engine.add_event_handler(Events.COMPLETED, self._save, final, "checkpoint_final_iteration", 1)
        engine.add_event_handler(Events.STARTED, self._on_started)
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._restore_signal_handler)
            engine.add_event_handler(event, self._unlock)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _save(self, engine, ckpt, prefix: str, keep: int | None = None) -> None:
        # keep: files of this kind to keep (None: n_saved)
        ckpt(engine)
        if _is_writer():
            if ckpt.last_checkpoint is not None and Path(ckpt.last_checkpoint).is_file():
                record_save(self.directory, Path(ckpt.last_checkpoint).name, engine.state.epoch, engine.state.iteration)
            _prune(self.directory, prefix, self.n_saved if keep is None else keep)

    def _lock(self, engine=None) -> None:
        # rank 0 (the writer) holds the folder's lock from the start (before the resume reads the folder) to the end
        if self._lock_fd is None and _is_writer():
            self._lock_fd = lock_folder(self.directory)

    def _unlock(self, engine=None) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            unlock_folder(fd)

    def _on_started(self, engine) -> None:
        if not self._late_attached:  # now every handler is attached: ours run after the EMA update
            self._late_attached = True
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration)
        self.stop_requested = False
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM received: saving a checkpoint at the end of this iteration, then stopping.")
        self.stop_requested = True

    def _restore_signal_handler(self, engine=None) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _on_exception(self, engine, err: BaseException) -> None:
        # ignite re-raises only when no EXCEPTION_RAISED handler is registered; the ones after this (stats, MLflow)
        # must still run (and re-raise), so this one raises only when it is the last
        self._restore_signal_handler()
        self._unlock()
        handlers = engine._event_handlers.get(Events.EXCEPTION_RAISED, [])
        if not handlers or getattr(handlers[-1][0], "__self__", None) is self:
            raise err

    def _stop_everywhere(self) -> bool:
        # every rank must stop at the same iteration (or DDP's collectives hang): any rank's signal stops all
        stop = self.stop_requested
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.save_on_sigterm:
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _on_iteration(self, engine) -> None:
        it = engine.state.iteration
        if self._iter_ckpt is not None and it % self.save_every_iterations == 0:
            self._save(engine, self._iter_ckpt, "checkpoint_iteration")
        if self._stop_everywhere():
            self._save(engine, self._signal_ckpt, "checkpoint_interrupted_iteration", 1)
            engine.logger.info("Stopped on SIGTERM at iteration %d; checkpoint saved in %s.", it, self.directory)
            # not COMPLETED: that would write a final checkpoint, run a validation round and upload, all inside the
            # pre-emption grace period, and mark an interrupted run as finished
            engine.state.stopped_by_signal = True
            engine.terminate(skip_completed=True)
