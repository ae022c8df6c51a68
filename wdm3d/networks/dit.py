"""A diffusion transformer on the wavelet subband grid (DiT, Peebles & Xie 2023, arXiv 2212.09748), in 3D.

``(B, C, D, H, W), (B,) -> (B, C, D, H, W)``: the grid is cut into non-overlapping ``p^3`` patches, each patch a
token (``C p^3`` values, linearly embedded), fixed 3D sine-cosine positions are added (one third of the width per
axis), ``depth`` transformer blocks run with AdaLN-Zero conditioning on the timestep, and a linear head maps every
token back to its patch.

AdaLN-Zero (the paper's sec. 3.2): each block's LayerNorms have no affine parameters of their own; a shift, a scale
and a gate per sub-layer are regressed from the timestep embedding, and the regressing layer starts at zero, so
every block starts as the identity and the whole network starts by outputting zeros (the head is zeroed too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from .positions import sincos_position_3d
from .scripting import shape_repr
from .time_embedding import interval_mlp, interval_values

__all__ = ["DiT3D", "DiTBlock", "dit3d", "patchify3d", "unpatchify3d"]


def patchify3d(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, N, C p^3)``: tokens in row-major order of the patch grid, features ordered
    ``(channel, d, h, w)`` within the patch (the order a ``Conv3d(kernel=stride=p)`` reads them in)."""
    b, c, *size = x.shape
    p = patch_size
    g = [s // p for s in size]
    x = x.reshape(b, c, g[0], p, g[1], p, g[2], p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, g[0] * g[1] * g[2], c * p**3)


def unpatchify3d(tokens: torch.Tensor, grid: list[int], patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify3d`: ``(B, N, C p^3) -> (B, C, g0 p, g1 p, g2 p)``; ``grid`` is ``(g0, g1, g2)``."""
    b, _, f = tokens.shape
    p = patch_size
    c = f // (p * p * p)  # (not p**3: TorchScript, which compiles this for DiT3D, makes int ** int a float)
    x = tokens.reshape(b, grid[0], grid[1], grid[2], c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, grid[0] * p, grid[1] * p, grid[2] * p)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``(B, dim)`` shift and scale over tokens ``(B, N, dim)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """One transformer block with AdaLN-Zero: ``x + g1 * attn(mod(norm(x))) + g2 * mlp(mod(norm(.)))``.

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP over ``dim``.
        cond_dim: width of the conditioning embedding.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim}).")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # AdaLN-Zero: shift = scale = gate = 0 at the start
        nn.init.zeros_(self.ada[1].bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, N, dim)`` tokens; ``cond``: ``(B, cond_dim)``."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT3D(nn.Module):
    """3D DiT for wavelet-domain diffusion; called like :class:`~wdm3d.networks.WDMUNet`.

    Args:
        in_channels: input channels (8 per image channel for one wavelet level, 64 for two).
        out_channels: output channels (default: ``in_channels``).
        patch_size: edge of the cubic patch; every spatial size must be divisible by it.
        hidden_size: token width (divisible by 6 for the three sine-cosine position axes to fill it).
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width over ``hidden_size``.
        interval_embedding: also take a flow map's interval ``t - r`` (timestep units), embedded like the timestep
            and added to its embedding before the AdaLN regressions; the interval's MLP starts at zero, so the new
            network equals the one without it. False adds no parameters.

    Example:
        >>> net = DiT3D(in_channels=8, patch_size=2, hidden_size=48, depth=2, num_heads=4)
        >>> net(torch.randn(2, 8, 8, 8, 8), torch.tensor([1, 500])).shape
        torch.Size([2, 8, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        interval_embedding: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or patch_size < 1 or hidden_size < 1 or depth < 1:
            raise ValueError("in_channels, patch_size, hidden_size and depth must all be >= 1.")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.patch_embed = nn.Conv3d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.interval_embedding = bool(interval_embedding)
        self.interval_embed = interval_mlp(hidden_size, hidden_size) if interval_embedding else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.head = nn.Linear(hidden_size, patch_size**3 * self.out_channels)
        for layer in (self.ada_out[1], self.head):  # the network starts by predicting 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}.")
        p = self.patch_size
        if any(s % p for s in x.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(x.shape[2:])} must be divisible by patch_size {p}.")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, D, H, W)``, each size divisible by ``patch_size``.
            timesteps: ``(B,)`` or a scalar, integer or float diffusion time.
            context: not supported (must be None); kept for the U-Net's call signature.
            interval: ``(B,)`` or a scalar flow-map interval ``t - r``; needs ``interval_embedding`` (None: 0).
        """
        if context is not None:
            raise ValueError("DiT3D takes no context tokens; pass context=None.")
        p = self.patch_size
        if not torch.jit.is_scripting():  # (TorchScript: see wdm3d.networks.scripting)
            self._check_input(x)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0 or (timesteps.ndim == 1 and timesteps.shape[0] == 1):
            timesteps = timesteps.reshape(()).expand(x.shape[0])
        if timesteps.ndim != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(
                f"timesteps must be a scalar or have shape ({x.shape[0]},), got {shape_repr(timesteps.shape)}."
            )
        grid = [x.shape[2] // p, x.shape[3] // p, x.shape[4] // p]
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), row-major over the patch grid
        h = h + sincos_position_3d(grid, self.hidden_size, x.device, h.dtype)
        cond = self.time_embed(get_timestep_embedding(timesteps, self.hidden_size).to(h.dtype))
        if self.interval_embed is not None:
            gap = get_timestep_embedding(interval_values(interval, timesteps), self.hidden_size).to(h.dtype)
            cond = cond + self.interval_embed(gap)
        elif interval is not None:
            raise ValueError("this network takes no interval: build it with interval_embedding=True (a flow map).")
        for block in self.blocks:
            h = block(h, cond)
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        return unpatchify3d(self.head(_modulate(self.norm_out(h), shift, scale)), grid, p)


def dit3d(in_channels: int = 8, out_channels: int | None = None, **kwargs) -> DiT3D:
    """Build a :class:`DiT3D` (a config-friendly factory, like :func:`~wdm3d.networks.wdm_unet`)."""
    return DiT3D(in_channels=in_channels, out_channels=out_channels, **kwargs)
