"""The IP-Adapter's trainable weights on their own: a checkpointable state object and a saver (an ignite handler)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from ...artifacts import unwrap
from ...networks.ip_adapter import IPAdapter

__all__ = ["AdapterSaver", "AdapterState"]


class AdapterState:
    """The adapter's trainable weights as a checkpointable object (``state_dict`` / ``load_state_dict``), so that
    resumable checkpoints hold ``{"image_proj", "ip_adapter"}`` rather than the frozen base and encoder again.

    Args:
        adapter: the :class:`~wdm3d.networks.IPAdapter` (or a DDP / compiled wrapper of it).
    """

    def __init__(self, adapter: nn.Module) -> None:
        if not isinstance(unwrap(adapter), IPAdapter):
            raise TypeError(f"AdapterState needs an IPAdapter, got {type(unwrap(adapter)).__name__}.")
        self.adapter = adapter

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return unwrap(self.adapter).adapter_state_dict()

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        unwrap(self.adapter).load_adapter_state_dict(state, source="the checkpoint's 'adapter'")


class AdapterSaver:
    """Write the adapter's weights on their own (``{"image_proj", "ip_adapter"}``, atomically) every
    ``save_interval`` epochs and when training completes (an ignite handler).

    Keep ``path`` outside the folder of the resumable checkpoints (their resume picks the newest ``*.pt`` there).

    Args:
        adapter: the :class:`~wdm3d.networks.IPAdapter` being trained.
        path: the file, e.g. ``output/adapter/ip_adapter.pt``.
        save_interval: epochs between saves (0: only at the end).
        enabled: False turns it off (ranks > 0).
    """

    def __init__(
        self, adapter: nn.Module, path: str | os.PathLike, save_interval: int = 1, enabled: bool = True
    ) -> None:
        if not isinstance(unwrap(adapter), IPAdapter):
            raise TypeError(f"AdapterSaver needs an IPAdapter, got {type(unwrap(adapter)).__name__}.")
        if not isinstance(save_interval, int) or save_interval < 0:
            raise ValueError(f"save_interval must be an integer >= 0 (epochs), got {save_interval!r}.")
        self.adapter, self.path = adapter, Path(path)
        self.save_interval, self.enabled = save_interval, enabled

    def attach(self, engine: Engine) -> None:
        """Save every ``save_interval`` epochs of ``engine`` and when it completes (nothing when not ``enabled``)."""
        if not self.enabled:
            return
        if self.save_interval:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path:
        path = unwrap(self.adapter).save_adapter(self.path)
        if engine is not None:
            engine.logger.info("IP-Adapter weights (image_proj, ip_adapter) written to %s", path)
        return path
