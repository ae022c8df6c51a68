"""Fixed sinusoidal positions of a 3D grid, for the token sequences of :class:`~wdm3d.networks.DiT3D` and the
IP-Adapter's :class:`~wdm3d.networks.PerceiverResampler`."""

from __future__ import annotations

import torch

from .scripting import shape_repr

__all__ = ["sincos_position_3d"]


def sincos_position_3d(
    size: list[int], dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed sinusoidal positions of a ``(d, h, w)`` grid (Vaswani et al. 2017, sec. 3.5, one third per axis).

    Returns ``(d*h*w, dim)`` (row-major voxel order): per axis ``dim // 6`` frequencies ``10000^(-k/n)``, sine and
    cosine of the voxel index; zero-padded to ``dim``. ``size`` may be any sequence of three ints and ``device`` a
    string outside TorchScript (which compiles this for :class:`~wdm3d.networks.DiT3D`).
    """
    if len(size) != 3 or dim < 1:
        raise ValueError(f"size must be (d, h, w) and dim >= 1, got {shape_repr(size)}, {dim}.")
    n = dim // 6
    grids = torch.meshgrid([torch.arange(s, device=device, dtype=torch.float64) for s in size], indexing="ij")
    parts: list[torch.Tensor] = []
    if n > 0:
        freqs = 10000.0 ** (-torch.arange(n, device=device, dtype=torch.float64) / n)
        for g in grids:
            angle = g.reshape(-1, 1) * freqs
            parts.append(angle.sin())
            parts.append(angle.cos())
    if len(parts) > 0:
        pos = torch.cat(parts, 1)
    else:
        pos = torch.zeros(size[0] * size[1] * size[2], 0, device=device, dtype=torch.float64)
    pos = torch.nn.functional.pad(pos, [0, dim - pos.shape[1]])
    return pos.to(dtype)
