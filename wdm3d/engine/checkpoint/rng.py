"""The global random states (python, numpy, torch CPU, CUDA) as a checkpointable object."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..seeding import derive_seed

__all__ = ["RNGState"]

logger = logging.getLogger(__name__)


class RNGState:
    """The global random states (python, numpy, torch CPU, CUDA) as a checkpointable object.

    ``state_dict`` holds only tensors and plain types, so it loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        return {
            "python": torch.tensor(internal, dtype=torch.int64),
            "python_version": int(version),
            "python_gauss": None if gauss is None else float(gauss),
            "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss),
            "numpy_gauss": float(cached),
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        random.setstate(
            (int(state["python_version"]), tuple(int(v) for v in state["python"].tolist()), state["python_gauss"])
        )
        np.random.set_state(
            (
                "MT19937",
                state["numpy"].numpy().astype(np.uint32),
                int(state["numpy_pos"]),
                int(state["numpy_has_gauss"]),
                float(state["numpy_gauss"]),
            )
        )
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda") or []
        if torch.cuda.is_available() and cuda:
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
            else:
                logger.warning(
                    "Checkpoint has CUDA RNG states of %d device(s), this machine has %d: not restored.",
                    len(cuda),
                    torch.cuda.device_count(),
                )
        _separate_ranks()


def _separate_ranks() -> None:
    """Under DDP only rank 0's RNG states are saved, so after a resume every rank holds them: ranks > 0 then draw a
    seed from them and mix in their rank (:func:`~wdm3d.engine.seeding.derive_seed`), so the ranks' diffusion noise
    and timesteps differ again (rank 0 keeps the exact restored state; the single-process resume stays exact)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    rank = torch.distributed.get_rank()
    if rank == 0:
        return
    seed = derive_seed(int(torch.randint(0, 2**62, (1,)).item()), rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device
