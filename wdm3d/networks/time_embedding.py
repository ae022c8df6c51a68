"""The time inputs of the denoisers: the diffusion timestep and, for flow maps, the interval ``t - r``.

Both go through MONAI's sinusoidal ``get_timestep_embedding`` and an MLP; the interval's MLP ends in a zeroed layer,
so a network built with it starts equal to the one without it (:class:`~wdm3d.networks.WDMUNet`,
:class:`~wdm3d.networks.DiT3D`).
"""

from __future__ import annotations

import torch
from torch import nn

from .scripting import shape_repr

__all__ = ["interval_mlp", "interval_values"]


def interval_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """``Linear -> SiLU -> Linear`` with the last layer zeroed: it adds nothing to the time embedding until trained."""
    mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def interval_values(interval: torch.Tensor | None, timesteps: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` intervals of a batch whose ``(B,)`` timesteps are given: None means 0 (the instantaneous
    velocity), a scalar or one value is repeated over the batch."""
    if interval is None:
        return torch.zeros_like(timesteps)
    gap = torch.as_tensor(interval, device=timesteps.device)
    if gap.ndim == 0 or (gap.ndim == 1 and gap.shape[0] == 1):
        return gap.reshape(()).expand(timesteps.shape[0])
    if gap.ndim != 1 or gap.shape[0] != timesteps.shape[0]:
        raise ValueError(
            f"interval must be a scalar or have shape ({timesteps.shape[0]},), got {shape_repr(gap.shape)}."
        )
    return gap
