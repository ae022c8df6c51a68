"""Checkpoints: find the latest, resume from it, load weights from it (always ``weights_only=True``).

:class:`TrainingCheckpoints` writes ``checkpoint_epoch=N.pt`` every N epochs and ``checkpoint_final_iteration=N.pt``
at the end (atomically); MONAI's ``CheckpointLoader`` restores them. What MONAI lacks is "resume from the newest
file in this folder, if there is one" (:class:`ResumeFromLatest`) and atomic writes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.handlers import CheckpointLoader

__all__ = ["latest_checkpoint", "ResumeFromLatest", "load_checkpoint", "load_network_weights"]

logger = logging.getLogger(__name__)
_NUM = re.compile(r"(epoch|iteration)=(\d+)")


def _progress(path: Path) -> tuple[int, int, float]:
    # rank files by the progress their name records (epoch=, iteration=), then by modification time
    found = dict((k, int(v)) for k, v in _NUM.findall(path.name))
    return found.get("epoch", -1), found.get("iteration", -1), path.stat().st_mtime


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pt") -> Path | None:
    """The newest checkpoint in ``directory`` (None if there is none or the folder does not exist).

    "Newest" is the file written last (modification time); names are only a tie-break, as epoch- and
    iteration-numbered files are not comparable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    if not files:
        return None
    return max(files, key=lambda p: (p.stat().st_mtime, _progress(p)[:2]))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    A checkpoint that needs arbitrary unpickling (pickled code) is refused: only tensors and plain containers load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError / EOFError depending on the damage
        raise RuntimeError(
            f"Could not load checkpoint {path} with weights_only=True ({type(err).__name__}: {err}). The file is "
            "truncated, corrupt, or holds pickled code; wdm3d never unpickles code from checkpoints."
        ) from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"Checkpoint {path} must hold a dict of state dicts, got {type(ckpt).__name__}.")
    return dict(ckpt)


def load_network_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    keys: tuple[str, ...] = ("ema", "model", "network"),
    strict: bool = True,
) -> str:
    """Load the first of ``keys`` found in the checkpoint into ``network``; return the key used.

    Bundles save the EMA weights under ``"ema"`` and the raw weights under ``"model"``; sampling prefers the EMA.
    A plain state dict (no such keys) is loaded as it is.
    """
    ckpt = load_checkpoint(path)
    key = next((k for k in keys if k in ckpt), None)
    state = ckpt[key] if key is not None else ckpt
    target = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    try:
        target.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise RuntimeError(
            f"Checkpoint {path} ({key or 'state dict'}) does not fit this network: {' '.join(first)}. "
            "Check that network_def (preset, channels) matches the configuration the checkpoint was trained with."
        ) from err
    if key is not None and key != keys[0]:
        logger.warning("Checkpoint %s has no %r weights; loaded %r instead.", path, keys[0], key)
    return key or "state_dict"


class ResumeFromLatest:
    """Resume training from the newest checkpoint in ``directory``, if any (an ignite handler).

    At ``Events.STARTED`` it restores every object of ``load_dict`` (network, EMA network, optimizer, the trainer's
    epoch and iteration, ...) with MONAI's ``CheckpointLoader`` (``weights_only=True``); with no checkpoint it logs
    that training starts from scratch. Attach it before any other handler.

    Args:
        directory: where ``CheckpointSaver`` writes.
        load_dict: the same dict the ``CheckpointSaver`` saves.
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

    def __call__(self, engine) -> None:
        path = latest_checkpoint(self.directory) if self.enabled else None
        if path is None:
            engine.logger.info(
                "No checkpoint in %s: training starts from scratch." if self.enabled else "Resuming is off.",
                self.directory,
            )
            return
        load_checkpoint(path)  # a clear error for a damaged file before ignite's
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location)(engine)
        self.resumed_from = path
        engine.logger.info(
            "Resumed from %s at epoch %d, iteration %d.", path, engine.state.epoch, engine.state.iteration
        )


class TrainingCheckpoints:
    """Save (atomically) and resume a training run: ignite's ``Checkpoint`` plus :class:`ResumeFromLatest`, one handler.

    The trainer itself (epoch, iteration) is added to the saved objects under ``"trainer"`` when the handler is
    attached, which a bundle config cannot do without a reference cycle (the trainer lists its handlers).

    Args:
        directory: checkpoint folder.
        objects: what to save besides the trainer, e.g. ``{"model": net, "ema": ema_net, "optimizer": opt}``.
        save_interval: save every this many epochs (0: only at the end).
        n_saved: how many interval checkpoints to keep (None: all).
        save_final: also save when training completes (``checkpoint_final_iteration=N.pt``).
        resume: continue from the newest checkpoint in ``directory`` when training starts.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        objects: Mapping[str, object],
        save_interval: int = 1,
        n_saved: int | None = 3,
        save_final: bool = True,
        resume: bool = True,
    ) -> None:
        if "trainer" in objects:
            raise ValueError("objects must not contain 'trainer': the attached engine is saved under that key.")
        if not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(f"save_interval must be an integer >= 0 (epochs), got {save_interval!r}.")
        self.directory = Path(directory)
        self.objects = dict(objects)
        self.save_interval, self.n_saved, self.save_final, self.resume = save_interval, n_saved, save_final, resume
        self.resumer: ResumeFromLatest | None = None

    def attach(self, engine) -> None:
        # ignite's Checkpoint + an atomic DiskSaver (temp file + rename): MONAI's CheckpointSaver writes in place,
        # so a run killed mid-save would leave a truncated newest checkpoint for the resume to trip on
        from ignite.engine import Events
        from ignite.handlers import Checkpoint, DiskSaver

        objects = {**self.objects, "trainer": engine}
        self.resumer = ResumeFromLatest(self.directory, objects, enabled=self.resume)
        self.resumer.attach(engine)
        self.directory.mkdir(parents=True, exist_ok=True)
        saver = DiskSaver(str(self.directory), require_empty=False, atomic=True)
        pattern = "{filename_prefix}_{score_name}={score}.{ext}"  # checkpoint_epoch=3.pt, checkpoint_final_iteration=9.pt
        if self.save_interval > 0:
            interval = Checkpoint(objects, saver, filename_prefix="checkpoint", score_name="epoch",
                                  score_function=lambda e: e.state.epoch, n_saved=self.n_saved,
                                  filename_pattern=pattern)
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), interval)
        if self.save_final:
            final = Checkpoint(objects, saver, filename_prefix="checkpoint_final", score_name="iteration",
                               score_function=lambda e: e.state.iteration, n_saved=1,
                               filename_pattern=pattern)
            engine.add_event_handler(Events.COMPLETED, final)
