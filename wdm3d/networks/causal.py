"""Depth-causal 3D building blocks and the cache that makes slab-by-slab inference exact.

A volume ``(B, C, D, H, W)`` is treated like a video with depth (axis 2) as time: every operator here looks only at
the current and earlier slices along depth, or works on non-overlapping groups of slices (stride = kernel), while H
and W are handled as in any 3D network (symmetric zero padding).

Blocks:

- :class:`CausalConv3d`: a ``Conv3d`` padded only at the front along depth (with copies of the first slice, as the
  causal convolutions of video VAEs do) and symmetrically along H and W. A depth stride is allowed only when it
  equals the depth kernel (non-overlapping, so no cache is needed).
- :class:`ChannelRMSNorm`: RMS normalisation over channels, separately at every voxel (no statistics across depth,
  so GroupNorm/BatchNorm are ruled out).
- :class:`CausalResBlock3d`: ``norm -> SiLU -> conv -> norm -> SiLU -> conv`` plus a (1x1x1) skip.
- :class:`CausalDownsample3d`: a stride-2 conv whose depth kernel is 2 (stride = kernel along depth).
- :class:`CausalUpsample3d`: nearest-neighbour x2 (each slice copied twice: stride = kernel along depth), then a
  causal conv.

Cache: inside ``with causal_cache(model):`` every :class:`CausalConv3d` in ``model`` remembers the last ``k_d - 1``
slices of its (padded) input and prepends them to the next slab instead of padding. The first slab is padded exactly
as a whole volume is, so processing a volume slab by slab gives the same output as processing it at once, provided
that (a) every operator along depth is causal or stride = kernel, (b) no normalisation takes statistics across depth,
(c) nothing mixes slices otherwise (no attention across depth), and (d) every slab is a multiple of the total depth
stride up to each layer (so the non-overlapping operators see whole groups). Outside the context the cache is off and
empty: whole-volume calls never depend on earlier calls, and the context clears the cache when it exits.
"""

# no ``from __future__ import annotations``: TorchScript reads CausalConv3d's ``_cache`` annotation as an object

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .scripting import shape_repr

__all__ = [
    "CausalConv3d",
    "ChannelRMSNorm",
    "CausalResBlock3d",
    "CausalDownsample3d",
    "CausalUpsample3d",
    "causal_cache",
]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v < 1 for v in value):
        raise ValueError(f"{name} must be a positive int or three positive ints (D, H, W), got {value!r}.")
    return value  # type: ignore[return-value]


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal along depth and zero-padded symmetrically along H and W.

    ``(B, C_in, D, H, W) -> (B, C_out, D / s_d, H / s_h, W / s_w)`` (sizes divisible by the strides; with stride 1
    the size is kept). Output slice ``t`` depends on input slices ``<= t`` only (for ``s_d = k_d``: on its own group
    of ``k_d`` slices). Without a cache the front is padded with ``k_d - 1`` copies of the first slice; inside
    :func:`causal_cache` the last ``k_d - 1`` slices of the previous slab are used after the first slab.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: int or ``(k_d, k_h, k_w)``; ``k_h`` and ``k_w`` must be odd (symmetric padding).
        stride: int or ``(s_d, s_h, s_w)``; ``s_d`` must be 1 or equal to ``k_d`` (stride = kernel along depth).
        bias: whether to learn a bias.

    Example:
        >>> conv = CausalConv3d(2, 4, 3)
        >>> conv(torch.randn(1, 2, 5, 8, 8)).shape
        torch.Size([1, 4, 5, 8, 8])
    """

    _cache: Optional[torch.Tensor]  # noqa: UP045 - declared for TorchScript (which misreads X | None here)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        bias: bool = True,
    ) -> None:
        k = _triple(kernel_size, "kernel_size")
        s = _triple(stride, "stride")
        if k[1] % 2 == 0 or k[2] % 2 == 0:
            raise ValueError(f"kernel_size along H and W must be odd (symmetric padding), got {k}.")
        if s[0] != 1 and s[0] != k[0]:
            raise ValueError(
                f"the depth stride must be 1 (causal padding) or equal to the depth kernel (non-overlapping), got "
                f"kernel_size={k}, stride={s}; an overlapping strided conv along depth would need a look-ahead cache."
            )
        super().__init__(in_channels, out_channels, k, stride=s, padding=(0, k[1] // 2, k[2] // 2), bias=bias)
        self.depth_pad = k[0] - 1 if s[0] == 1 else 0
        self._streaming = False
        self._cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        s_d = self.stride[0]
        if x.shape[2] % s_d:
            raise ValueError(
                f"CausalConv3d with depth stride {s_d} needs a depth divisible by {s_d}, got input shape "
                f"{shape_repr(x.shape)}; in chunked inference the chunk must be a multiple of the total depth stride."
            )
        p = self.depth_pad
        if p:
            cache = self._cache
            if self._streaming and cache is not None:
                front = cache
            else:
                front = x[:, :, :1].expand(-1, -1, p, -1, -1)
            x = torch.cat((front.to(x.dtype), x), dim=2)
            if self._streaming:
                # a copy, so that the cache does not keep this slab's padded input alive
                self._cache = x[:, :, -p:].clone()
        return self._conv_forward(x, self.weight, self.bias)  # nn.Conv3d.forward (TorchScript has no super())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", causal depth pad={self.depth_pad}"


@contextlib.contextmanager
def causal_cache(module: nn.Module) -> Iterator[None]:
    """Turn on the depth cache of every :class:`CausalConv3d` in ``module`` for slab-by-slab inference.

    The cache starts empty (so the first slab is padded like a whole volume) and is cleared on exit, also after an
    error. Feed the slabs in depth order; each must be a multiple of the total depth stride of the layers it passes.

    Args:
        module: the network (or part of it) to run slab by slab.

    Example:
        >>> conv = CausalConv3d(1, 1, 3)
        >>> x = torch.randn(1, 1, 6, 4, 4)
        >>> with causal_cache(conv):
        ...     y = torch.cat([conv(x[:, :, :4]), conv(x[:, :, 4:])], dim=2)
        >>> torch.allclose(y, conv(x), atol=1e-6)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
    if any(m._streaming for m in convs):
        raise RuntimeError("causal_cache is already active on this module; chunked calls cannot be nested.")
    for m in convs:
        m._streaming, m._cache = True, None
    try:
        yield
    finally:
        for m in convs:
            m._streaming, m._cache = False, None


class ChannelRMSNorm(nn.Module):
    """RMS normalisation over channels at every voxel: ``x / sqrt(mean_c(x^2) + eps) * weight``.

    ``(B, C, D, H, W) -> (B, C, D, H, W)``. No statistics are shared between voxels, so the result at a slice does
    not depend on other slices (GroupNorm would, which breaks the causal cache). Computed in float32.

    Args:
        channels: number of channels ``C``.
        eps: added to the mean square.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
        wide = x.float() if half else x  # half types in float32; float64 kept
        wide = wide * torch.rsqrt(wide.square().mean(dim=1, keepdim=True) + self.eps)
        return (wide * self.weight.to(wide.dtype).view(1, -1, 1, 1, 1)).to(x.dtype)  # one rounding to x's dtype

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class CausalResBlock3d(nn.Module):
    """Residual block of depth-causal convolutions with per-voxel channel norms.

    ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``:
    ``skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))``, skip a 1x1x1 conv when the widths differ.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel of both convolutions (int or ``(k_d, k_h, k_w)``).
        dropout: dropout before the second convolution.
        eps: epsilon of the norms.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        dropout: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels, eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size)
        self.norm2 = ChannelRMSNorm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size)
        self.skip = nn.Identity() if in_channels == out_channels else CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class CausalDownsample3d(nn.Module):
    """2x downsampling on every axis: a conv with kernel ``(2, 3, 3)`` and stride 2.

    ``(B, C_in, D, H, W) -> (B, C_out, D/2, H/2, W/2)``. Along depth the kernel equals the stride, so each output
    slice sees exactly its own pair of input slices (cache-free when slabs have even depth).

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, (2, 3, 3), stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(3):
            if x.shape[2 + i] % 2:
                raise ValueError(
                    f"CausalDownsample3d needs even sizes, got shape {shape_repr(x.shape)} (odd {'DHW'[i]})."
                )
        return self.conv(x)


class CausalUpsample3d(nn.Module):
    """2x upsampling on every axis: nearest neighbour, then a causal 3x3x3 conv.

    ``(B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W)``. Nearest neighbour copies each slice twice (stride = kernel
    along depth), so output slices ``2t, 2t + 1`` come from input slice ``t`` and earlier only; no look-ahead.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
