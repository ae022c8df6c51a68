"""Token encoders: the trainable projections from image features to the image tokens the U-Net attends to
(IP-Adapter's linear projection, IP-Adapter-Plus's Perceiver resampler, and both together)."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import Attention, attention_heads
from ..positions import PLACE_DIM, place_features, sincos_position_3d, volume_position_3d

__all__ = ["PROJECTIONS", "GlobalGridProjection", "GlobalSpatialProjection", "ImageProjection", "PerceiverResampler"]

#: the projections :class:`~wdm3d.networks.IPAdapter` builds by name
PROJECTIONS = ("linear", "perceiver", "global+spatial", "global+grid")


def _check_features(features: torch.Tensor, feature_dim: int) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim not in (2, 3, 5):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"image features must be (B, F), (B, L, F) or (B, F, d, h, w), got {shape}.")
    width = features.shape[-1] if features.ndim == 3 else features.shape[1]
    if width != feature_dim:
        raise ValueError(f"image features have width {width}, but the projection expects feature_dim={feature_dim}.")


class ImageProjection(nn.Module):
    """IP-Adapter's projection: a global image embedding -> ``Linear`` -> N tokens -> ``LayerNorm``.

    ``(B, F)`` | ``(B, L, F)`` | ``(B, F, d, h, w)`` -> ``(B, num_tokens, token_dim)``; feature maps and token
    sequences are averaged to one ``(B, F)`` vector first.

    Args:
        feature_dim: F.
        token_dim: width of the image tokens (the cross-attention context width).
        num_tokens: N (IP-Adapter: 4).
    """

    def __init__(self, feature_dim: int, token_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        if min(feature_dim, token_dim, num_tokens) < 1:
            raise ValueError(
                f"feature_dim, token_dim, num_tokens must be >= 1, got {feature_dim}, {token_dim}, {num_tokens}."
            )
        self.feature_dim, self.token_dim, self.num_tokens = feature_dim, token_dim, num_tokens
        self.proj = nn.Linear(feature_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dim)
        if features.ndim == 5:
            features = features.flatten(2).mean(-1)
        elif features.ndim == 3:
            features = features.mean(1)
        tokens = self.proj(features).view(features.shape[0], self.num_tokens, self.token_dim)
        return self.norm(tokens)


class _PerceiverLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.norm_features = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.attn = Attention(width, width, num_heads, head_dim, out_bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, ff_mult * width, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        kv = torch.cat((self.norm_features(features), lat), dim=1)  # latents attend to features and to themselves
        latents = latents + self.attn(lat, kv)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """IP-Adapter-Plus projection: learned latent queries that attend to patch features (Perceiver resampler,
    Alayrac et al. 2022 "Flamingo", sec. 2.1 / appendix A.1.1).

    ``(B, F, d, h, w)`` | ``(B, L, F)`` | ``(B, F)`` -> ``(B, num_latents, token_dim)``: feature maps are flattened
    to ``d*h*w`` patch tokens (plus fixed 3D sinusoidal positions, as conv features carry none), projected to
    ``width``; ``depth`` layers of [latents += Attn(LN(latents), [LN(features); LN(latents)]); latents += FF];
    then ``Linear`` -> ``LayerNorm`` to ``token_dim``.

    Args:
        feature_dim: F.
        token_dim: width of the output tokens.
        num_latents: output tokens (IP-Adapter-Plus: 16).
        depth: layers (IP-Adapter-Plus: 4).
        width: internal width (default ``token_dim``).
        num_heads: heads (takes precedence over ``head_dim``).
        head_dim: width per head (64; capped at ``width``).
        ff_mult: feed-forward expansion.
        positional: add sinusoidal positions to feature-map patches.
    """

    def __init__(
        self,
        feature_dim: int,
        token_dim: int,
        num_latents: int = 16,
        depth: int = 4,
        width: int | None = None,
        num_heads: int | None = None,
        head_dim: int = 64,
        ff_mult: int = 4,
        positional: bool = True,
    ) -> None:
        super().__init__()
        width = token_dim if width is None else width
        if min(feature_dim, token_dim, num_latents, depth, width, ff_mult) < 1:
            raise ValueError("feature_dim, token_dim, num_latents, depth, width and ff_mult must all be >= 1.")
        heads, hd = attention_heads(width, num_heads, head_dim)
        self.feature_dim, self.token_dim, self.num_tokens = feature_dim, token_dim, num_latents
        self.width, self.positional = width, positional
        self.latents = nn.Parameter(torch.randn(1, num_latents, width) / width**0.5)
        self.proj_in = nn.Linear(feature_dim, width)
        self.layers = nn.ModuleList([_PerceiverLayer(width, heads, hd, ff_mult) for _ in range(depth)])
        self.proj_out = nn.Linear(width, token_dim)
        self.norm_out = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dim)
        if features.ndim == 2:
            x = self.proj_in(features[:, None])
        elif features.ndim == 3:
            x = self.proj_in(features)
        else:
            x = self.proj_in(features.flatten(2).transpose(1, 2))
            if self.positional:
                x = x + sincos_position_3d(features.shape[2:], self.width, x.device, x.dtype)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm_out(self.proj_out(latents))


class GlobalSpatialProjection(nn.Module):
    """Global and spatial image tokens together: :class:`ImageProjection`'s tokens of the pooled features (what
    the whole reference looks like) followed by :class:`PerceiverResampler`'s tokens of the feature grid (where
    things are), ``(B, num_global + num_spatial, token_dim)``.

    Args:
        feature_dim: F.
        token_dim: width of the tokens.
        num_global: tokens of the pooled features (IP-Adapter: 4).
        num_spatial: latent tokens of the resampler (IP-Adapter-Plus: 16).
        depth: resampler layers.
    """

    def __init__(
        self, feature_dim: int, token_dim: int, num_global: int = 4, num_spatial: int = 16, depth: int = 4
    ) -> None:
        super().__init__()
        self.global_tokens = ImageProjection(feature_dim, token_dim, num_global)
        self.spatial_tokens = PerceiverResampler(feature_dim, token_dim, num_spatial, depth=depth)
        self.feature_dim, self.token_dim = feature_dim, token_dim
        self.num_tokens = num_global + num_spatial

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.global_tokens(features), self.spatial_tokens(features)), dim=1)


class GlobalGridProjection(nn.Module):
    """Global tokens and one token per cell of the feature grid, each carrying where it sits in the volume.

    ``(B, F, d, h, w) -> (B, num_global + d*h*w, token_dim)``: :class:`ImageProjection`'s tokens of the pooled
    features, then ``LayerNorm(Linear(features of a cell)) + volume_position_3d`` for every cell. With image
    place-biased cross-attention (``CrossAttentionBlock(place_attention=True)`` reading :meth:`token_places`) a U-Net
    voxel reads the reference at its own place, which a resampler's few tokens cannot give it: what paired synthesis
    of an aligned volume needs.

    Args:
        feature_dim: F.
        token_dim: width of the tokens.
        grid: ``(d, h, w)`` of the encoder's feature map (fixes the number of tokens).
        num_global: tokens of the pooled features.
    """

    def __init__(self, feature_dim: int, token_dim: int, grid: tuple[int, int, int], num_global: int = 4) -> None:
        super().__init__()
        if len(grid) != 3 or any(int(g) < 1 for g in grid):
            raise ValueError(f"grid must be the (d, h, w) of the feature map, got {grid!r}.")
        self.global_tokens = ImageProjection(feature_dim, token_dim, num_global)
        self.proj = nn.Linear(feature_dim, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.grid = tuple(int(g) for g in grid)
        self.feature_dim, self.token_dim = feature_dim, token_dim
        self.num_tokens = num_global + self.grid[0] * self.grid[1] * self.grid[2]
        self.register_buffer("positions", volume_position_3d(self.grid, token_dim), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dim)
        if features.ndim != 5 or tuple(features.shape[2:]) != self.grid:
            raise ValueError(
                f"global+grid tokens need a (B, F, {', '.join(map(str, self.grid))}) feature map, got "
                f"{tuple(features.shape)}; set feature_grid to the encoder's output grid."
            )
        cells = self.norm(self.proj(features.flatten(2).transpose(1, 2))) + self.positions.to(features.dtype)
        return torch.cat((self.global_tokens(features), cells), dim=1)

    def token_places(self) -> torch.Tensor:
        """``(num_tokens, PLACE_DIM)``: zero rows for the global tokens (no place), then each cell's
        :func:`~wdm3d.networks.positions.place_features`."""
        cells = place_features(self.grid, self.positions.device)
        return torch.cat((cells.new_zeros(self.global_tokens.num_tokens, PLACE_DIM), cells))
