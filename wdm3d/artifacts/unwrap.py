"""The network inside the wrappers training puts around it (DistributedDataParallel, torch.compile)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap"]


def unwrap(module: Any) -> Any:
    """The network inside a DistributedDataParallel and/or torch.compile wrapper (``module`` itself if neither).

    Saving, loading and reading settings go through the inner network, so a checkpoint of a compiled or DDP run has
    the same keys as one of a plain run (no ``module.`` or ``_orig_mod.`` prefixes).
    """
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    return getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule keeps the network here
