"""Training checkpoints: save every N epochs/iterations and on SIGTERM, and resume from the newest one exactly.

:class:`TrainingCheckpoints` writes ``checkpoint_epoch=N.pt`` every N epochs, ``checkpoint_iteration=N.pt`` every N
iterations, ``checkpoint_interrupted_iteration=N.pt`` on SIGTERM and ``checkpoint_final_iteration=N.pt`` at the end
(atomically: temp file + rename), logs each save in ``checkpoints.json`` and resumes from the newest one. What
MONAI's ``CheckpointSaver``/``Loader`` lack: atomic writes, "resume from the newest file in this folder, if there is
one", mid-epoch resume (data position and RNG states), a signal-triggered save, and errors that name the mismatching
weight.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import (
    FORMAT_VERSION,
    LOCK_FILE,
    CheckpointLoadError,
    check_state_fits,
    checkpoints_by_age,
    latest_checkpoint,
    load_checkpoint,
    named_error,
    network_arguments,
    plain,
    record_save,
    save_checkpoint_file,
    sort_by_age,
    unwrap,
)

__all__ = ["RNGState", "RunConfig", "ResumeFromLatest", "TrainingCheckpoints"]

logger = logging.getLogger(__name__)
# saved objects a checkpoint may lack (older files, or runs without them): resuming warns instead of failing
_OPTIONAL = ("rng", "run_config", "mlflow", "geometry", "scaler", "loss")


class RNGState:
    """The global random states (python, numpy, torch CPU, CUDA) as a checkpointable object.

    ``state_dict`` holds only tensors and plain types, so it loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        return {
            "python": torch.tensor(internal, dtype=torch.int64), "python_version": int(version),
            "python_gauss": None if gauss is None else float(gauss),
            "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached),
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python"].tolist()),
                         state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                             int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda") or []
        if torch.cuda.is_available() and cuda:
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
            else:
                logger.warning("Checkpoint has CUDA RNG states of %d device(s), this machine has %d: not restored.",
                               len(cuda), torch.cuda.device_count())
        _separate_ranks()


def _separate_ranks() -> None:
    """Under DDP only rank 0's RNG states are saved, so after a resume every rank holds them: ranks > 0 then draw a
    seed from them and mix in their rank, so the ranks' diffusion noise and timesteps differ again (rank 0 keeps the
    exact restored state; the single-process resume stays exact)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    rank = torch.distributed.get_rank()
    if rank == 0:
        return
    base = int(torch.randint(0, 2**62, (1,)).item())
    words = np.random.SeedSequence([base, rank]).generate_state(2, dtype=np.uint32)
    seed = (int(words[0]) << 32) | int(words[1])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


class RunConfig:
    """What a checkpoint was trained with, saved under ``"run_config"``: format version, network, diffusion, settings.

    Built when a bundle's training config is instantiated, before the first step, it also checks that they fit
    together: a U-Net (``channel_mult``) too deep for ``settings["image_size"]`` at the diffusion's wavelet ``levels``
    is refused with :func:`~wdm3d.engine.config_check.check_image_size`'s message (the settings and the sizes that
    work) instead of a shape error in the first forward pass.

    Args:
        network: the trained network (its readable constructor settings are recorded).
        diffusion: the diffusion process (its ``config()`` is recorded).
        settings: any other plain settings (image size, channels, preset, ...).

    Raises:
        ValueError: ``settings["image_size"]`` does not fit the network and the diffusion's levels.
    """

    def __init__(self, network: torch.nn.Module | None = None, diffusion: Any = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        self.network, self.diffusion = network, diffusion
        self.settings = dict(settings or {})
        self.loaded: dict[str, Any] = {}
        channel_mult = getattr(unwrap(network), "channel_mult", None) if network is not None else None
        levels = getattr(diffusion, "levels", None)
        image_size = self.settings.get("image_size")
        if channel_mult is not None and isinstance(levels, int) and image_size is not None:
            from .config_check import check_image_size

            check_image_size(image_size, levels, channel_mult)

    def state_dict(self) -> dict[str, Any]:
        return {
            "wdm3d_format": FORMAT_VERSION,
            "network": network_arguments(self.network) if self.network is not None else {},
            "diffusion": plain(self.diffusion.config()) if self.diffusion is not None else {},
            "settings": plain(self.settings),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version = int(state.get("wdm3d_format", 0))
        if version > FORMAT_VERSION:
            raise ValueError(f"Checkpoint format {version} is newer than this wdm3d reads ({FORMAT_VERSION}).")
        self.loaded = dict(state)
        now = self.state_dict()
        for part in ("network", "diffusion"):
            old, new = state.get(part) or {}, now[part] or {}
            # settings both record (a checkpoint of an older wdm3d may lack settings recorded since)
            changed = {k: (old[k], new[k]) for k in old if k in new and old[k] != new[k]}
            if changed:
                logger.warning("Resuming with different %s settings (checkpoint, now): %s.", part, changed)


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
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def restore(self, engine, path: Path) -> None:
        """Load checkpoint ``path`` into ``load_dict`` (and ``engine``'s data position).

        Raises:
            CheckpointLoadError: ``path`` cannot be read; nothing has been restored then.
        """
        ckpt = load_checkpoint(path, self.map_location, suggest_previous=False)
        missing = [k for k in self.load_dict if k not in ckpt and k not in _OPTIONAL]
        if missing:
            raise KeyError(f"Checkpoint {path} has no {missing} (it has {sorted(ckpt)}); it was not written by this "
                           "training configuration.")
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
                    raise named_error(err, f"Checkpoint {path}: cannot restore {name!r} ({type(obj).__name__})") from err
        if prior_max_epochs is not None:
            if engine.state.epoch > prior_max_epochs:
                raise ValueError(f"Checkpoint {path} is at epoch {engine.state.epoch}, beyond max_epochs="
                                 f"{prior_max_epochs}: raise max_epochs to continue training.")
            engine.state.max_epochs = prior_max_epochs
        self._continue_data(engine, path)

    @staticmethod
    def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, name: str, path: Path) -> None:
        # the optimizer's state (moments, step counts) from the checkpoint, but the configured lr and weight decay: an
        # optimizer state dict carries its hyperparameters, so --learning_rate on a resumed run was silently ignored
        # (without an LR scheduler, which would own the lr)
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
            logger.warning("Resuming with the configured optimizer settings, not the checkpoint's (checkpoint, now): "
                           "%s.", changed)

    @staticmethod
    def _continue_data(engine, path: Path) -> None:
        from ..data.safety import ResumableSampler

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
                "continued exactly.", path, length, now, epoch, now,
                f" (the {engine.state.iteration % length} iteration(s) of the unfinished epoch are redone)"
                if engine.state.iteration % length else "")
            engine.state.epoch_length, engine.state.epoch, engine.state.iteration = now, epoch, epoch * now
            return
        done = engine.state.iteration % length
        if not done:
            return
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and loader.batch_size:
            sampler.skip_next(done * loader.batch_size)
            engine.logger.info("Resuming mid-epoch: skipping the %d batch(es) epoch %d already used.",
                               done, engine.state.epoch + 1)
        else:
            logger.warning("Resuming mid-epoch without a ResumableSampler: epoch %d restarts its data order.",
                           engine.state.epoch + 1)

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
                damaged[0], path, ", ".join(str(e.path) for e in damaged),
            )
        self.resumed_from = path
        engine.logger.info(
            "Resumed from %s at epoch %d, iteration %d.", path, engine.state.epoch, engine.state.iteration
        )


def _saver(directory: Path):
    """ignite's ``DiskSaver`` writing through :func:`save_checkpoint_file`, and removing nothing.

    Its own atomic write leaves a full disk as torch's errno-less error and its temporary file 0600 (then 0644
    whatever the umask); and ignite's ``Checkpoint`` removes the oldest file *before* writing the next one, so a
    failed save would also cost a checkpoint: pruning is :func:`_prune`'s, after a save succeeded. A ``DiskSaver``
    subclass, so that ``Checkpoint.last_checkpoint`` is the file's full path.
    """
    import ignite.distributed as idist
    from ignite.handlers import DiskSaver

    class _Saver(DiskSaver):
        def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
            if idist.get_rank() == self.save_on_rank:
                save_checkpoint_file(checkpoint, self.dirname / filename)

        def remove(self, filename: str) -> None:
            """Nothing: ignite calls this before the next save; pruning is ``_prune``'s, after a save succeeded."""

    return _Saver(str(directory), require_empty=False)


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
    checkpoint holds one consistent step. Each is written through :func:`save_checkpoint_file` (temporary file,
    fsync, rename; the umask's file mode), and older ones are pruned only after a save succeeded: a save that fails
    on a full disk stops the run with an ``OSError`` naming the file and the errno, and leaves every earlier
    checkpoint and no temporary file.

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
        from ignite.engine import Events
        from ignite.handlers import Checkpoint

        objects = {**self.objects, "trainer": engine, "rng": RNGState()}
        if getattr(engine, "scaler", None) is not None and "scaler" not in objects:  # AMP's GradScaler (its scale)
            objects["scaler"] = engine.scaler
        engine.add_event_handler(Events.STARTED, self._lock)  # before the resume reads the folder
        self.resumer = ResumeFromLatest(self.directory, objects, enabled=self.resume)
        self.resumer.attach(engine)
        self.directory.mkdir(parents=True, exist_ok=True)
        saver = _saver(self.directory)
        pattern = "{filename_prefix}_{score_name}={score}.{ext}"  # checkpoint_epoch=3.pt, checkpoint_final_iteration=9.pt

        def checkpoint(prefix, score_name, n_saved):
            fn = (lambda e: e.state.epoch) if score_name == "epoch" else (lambda e: e.state.iteration)
            return Checkpoint(objects, saver, filename_prefix=prefix, score_name=score_name, score_function=fn,
                              n_saved=n_saved, filename_pattern=pattern)

        self._epoch_ckpt = checkpoint("checkpoint", "epoch", self.n_saved) if self.save_interval > 0 else None
        self._iter_ckpt = checkpoint("checkpoint", "iteration", self.n_saved) if self.save_every_iterations else None
        self._signal_ckpt = checkpoint("checkpoint_interrupted", "iteration", 1)
        if self._epoch_ckpt is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self._save,
                                     self._epoch_ckpt, "checkpoint_epoch")
        if self.save_final:  # one final and one interrupted checkpoint, across launches too
            engine.add_event_handler(Events.COMPLETED, lambda e, c=checkpoint("checkpoint_final", "iteration", 1):
                                     self._save(e, c, "checkpoint_final_iteration", 1))
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
                record_save(self.directory, Path(ckpt.last_checkpoint).name, engine.state.epoch,
                             engine.state.iteration)
            _prune(self.directory, prefix, self.n_saved if keep is None else keep)

    def _lock(self, engine=None) -> None:
        # one writer per checkpoint folder: a second run (a requeued job while the first still runs, a resubmission)
        # would interleave its checkpoints with the first's and prune them. An flock is released by the kernel when
        # its process dies, so a crash leaves no stale lock. Rank 0 (the writer) only; skipped where there is no flock
        if self._lock_fd is not None or not _is_writer():
            return
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"Another training run is writing checkpoints to {self.directory} (lock {path}: {holder}). Two runs in "
                "one folder would overwrite and prune each other's checkpoints: stop that run, or give this one "
                "another output_dir."
            ) from None
        except OSError as err:  # a filesystem without flock (some network mounts): go on unguarded
            os.close(fd)
            logger.warning("Cannot lock %s (%s): a second run in this folder would not be detected.", path, err)
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._lock_fd = fd

    def _unlock(self, engine=None) -> None:
        if self._lock_fd is None:
            return
        import fcntl

        fd, self._lock_fd = self._lock_fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

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
        from ignite.engine import Events

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
