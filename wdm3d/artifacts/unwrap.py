"""The network inside the wrappers training puts around it (DistributedDataParallel, torch.compile), and a state
dict saved from a wrapped network with the wrappers' key prefixes removed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["unwrap", "unwrap_state_dict"]


def unwrap(module: Any) -> Any:
    """The network inside a DistributedDataParallel and/or torch.compile wrapper (``module`` itself if neither).

    Saving, loading and reading settings go through the inner network, so a checkpoint of a compiled or DDP run has
    the same keys as one of a plain run (no ``module.`` or ``_orig_mod.`` prefixes).
    """
    # either order and any depth: MONAI's SupervisedTrainer(compile=True) compiles a DDP-wrapped network
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule keeps the network here
            module = module._orig_mod
        else:
            return module


#: key prefixes a state dict saved from a wrapped network carries: DataParallel / DDP, then torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the key prefixes of :data:`WRAPPER_PREFIXES`, each removed only when every key has it.

    For weights saved by other code from a wrapped network (``torch.save(ddp.state_dict())``); wdm3d saves the
    unwrapped network (:func:`unwrap`), so its own checkpoints need no stripping.
    """
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
