"""The teacher of a distilled flow map: a trained rectified flow (multi-step, or a flow map read at interval 0),
rebuilt from its checkpoint and frozen (see :class:`~wdm3d.diffusion.WaveletDiffusionInferer`'s ``teacher``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..artifacts import build_network, load_checkpoint, load_frozen, resolve_checkpoint
from .wavelet_diffusion import WaveletDiffusion

__all__ = ["load_teacher"]

logger = logging.getLogger(__name__)

_HINT = (
    "train a rectified-flow model first (train.json writes <output_dir>/models) and point teacher_checkpoint there; "
    "the student trains into another output_dir."
)


def load_teacher(
    checkpoint: str | os.PathLike | None,
    device: str | torch.device | None = None,
    use_ema: bool = True,
    student_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, WaveletDiffusion]:
    """``(network, diffusion)`` of a trained wdm3d model, both as its checkpoint recorded them; the network frozen,
    in eval mode, with its EMA weights first.

    Args:
        checkpoint: a checkpoint file, or a folder (its newest ``*.pt``).
        device: move the network there.
        use_ema: prefer the ``"ema"`` weights over ``"model"``.
        student_dir: the folder the student writes its checkpoints to; a teacher inside it is refused (the student
            would resume from the teacher's checkpoint, and a folder path would soon name the student's own).

    Raises:
        ValueError: no checkpoint given, one inside ``student_dir``, or one that records no diffusion or network
            settings (``run_config``).
        FileNotFoundError: no such checkpoint.
    """
    if checkpoint is None:
        raise ValueError(f"distillation needs a teacher: set teacher_checkpoint ({_HINT})")
    path = resolve_checkpoint(checkpoint, "teacher", _HINT)
    if student_dir is not None and Path(student_dir).resolve() in path.resolve().parents:
        raise ValueError(
            f"The teacher checkpoint {path} is in the student's checkpoint folder {student_dir}: the student would "
            "resume from it. Train the student into another --output_dir."
        )
    settings = (load_checkpoint(path).get("run_config") or {}).get("diffusion")
    if not settings:
        raise ValueError(f"Checkpoint {path} records no diffusion settings (run_config); it cannot be a teacher.")
    diffusion = WaveletDiffusion(**settings)
    network, info = load_frozen(build_network(path), path, use_ema, device, diffusion, what="teacher", hint=_HINT)
    logger.info("Teacher loaded from %s (%s weights, %s) and frozen.", info["checkpoint"], info["weights"], settings)
    return network, diffusion
