"""What a checkpoint was trained with (format version, network, diffusion, settings), checked as it is built."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ...artifacts import FORMAT_VERSION, network_arguments, plain, unwrap
from ..config_check import check_image_size

__all__ = ["RunConfig"]

logger = logging.getLogger(__name__)


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

    def __init__(
        self, network: torch.nn.Module | None = None, diffusion: Any = None, settings: Mapping[str, Any] | None = None
    ) -> None:
        self.network, self.diffusion = network, diffusion
        self.settings = dict(settings or {})
        self.loaded: dict[str, Any] = {}
        channel_mult = getattr(unwrap(network), "channel_mult", None) if network is not None else None
        levels = getattr(diffusion, "levels", None)
        image_size = self.settings.get("image_size")
        if channel_mult is not None and isinstance(levels, int) and image_size is not None:
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
