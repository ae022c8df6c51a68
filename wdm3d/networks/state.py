"""Comparing a weights file's state dict with a network's, for errors that say what does not fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["state_mismatch"]


def _shape(t: Any) -> tuple | str:
    return tuple(t.shape) if hasattr(t, "shape") else type(t).__name__


def state_mismatch(own: Mapping[str, Any], state: Mapping[str, Any], limit: int = 5) -> str | None:
    """None if ``state`` has exactly the keys and shapes of ``own``, else a summary of what differs:
    ``"missing [...], unexpected [...], wrong shapes [...]"`` (at most ``limit`` names of each, sorted)."""

    def few(names: list[str]) -> str:
        return f"{names[:limit]}{'...' if len(names) > limit else ''}"

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if _shape(own[k]) != _shape(state[k]))
    if not (missing or unexpected or bad):
        return None
    return f"missing {few(missing)}, unexpected {few(unexpected)}, wrong shapes {few(bad)}"
