"""Seeds: the one rule that derives a seed from a base seed and an index, and seeding a whole process.

:func:`derive_seed` is a 63-bit hash of ``(seed, index)`` through numpy's ``SeedSequence``, so nearby base seeds or
indices give unrelated streams (``seed + index`` would make run 7's second batch run 8's first). Inference batches,
synthesis cases and DDP ranks after a resume all take their seeds from it.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.utils import set_determinism

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(seed: int, index: int) -> int:
    """A seed in ``[0, 2**63)`` for item ``index`` of something seeded with ``seed``, unrelated to its neighbours'.

    Deterministic across processes and platforms, so a sample recorded with ``(seed, index)`` can be regenerated on
    its own.

    Args:
        seed: the base seed (any integer; taken modulo ``2**63``).
        index: which item (a batch's first sample, a case, a DDP rank); a non-negative integer.

    Raises:
        ValueError: ``index`` is negative (``SeedSequence`` takes only non-negative entropy).
    """
    if int(index) < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}.")
    words = np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (MONAI's ``set_determinism``).

    Args:
        seed: the run's seed.
        deterministic: also ask torch for deterministic algorithms (a warning, not an error, for ops that have none).
    """
    set_determinism(seed=seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
