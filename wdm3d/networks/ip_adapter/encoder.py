"""The IP-Adapter's frozen image encoder: reference volume -> features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["FrozenImageEncoder"]


class FrozenImageEncoder(nn.Module):
    """A frozen image encoder: reference volume ``(B, C, D, H, W)`` -> features ``(B, F, d, h, w)`` or ``(B, F)``.

    Wraps an ``nn.Module`` or any callable. An autoencoder with the wdm3d VAE interface (``encode(x)`` returning a
    distribution with ``mode()``, and ``latent_channels``) is used through its encoder: the features are the
    posterior mode. The wrapped module's parameters get ``requires_grad=False``, it stays in eval mode, and
    encoding runs under ``torch.no_grad()``.

    Args:
        encoder: the module or callable.
        feature_dim: F; read from the encoder (``feature_dim``, ``latent_channels`` or ``out_channels``) if None.
    """

    def __init__(self, encoder: nn.Module | Callable[[torch.Tensor], Any], feature_dim: int | None = None) -> None:
        super().__init__()
        if not callable(encoder) and not hasattr(encoder, "encode"):
            raise TypeError(f"image_encoder must be an nn.Module or a callable, got {type(encoder).__name__}.")
        self.is_autoencoder = hasattr(encoder, "encode") and hasattr(encoder, "latent_channels")
        if isinstance(encoder, nn.Module):
            self.encoder = encoder
            encoder.requires_grad_(False)
            encoder.eval()
        else:
            self.__dict__["encoder"] = encoder  # a plain callable: nothing to register
        if feature_dim is None:
            for name in ("feature_dim", "latent_channels", "out_channels"):
                value = getattr(encoder, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    feature_dim = value
                    break
        if feature_dim is None or feature_dim < 1:
            raise ValueError(
                "could not read the image encoder's feature width (no feature_dim / latent_channels / out_channels "
                "attribute); pass feature_dim= (the channels of its output feature map or the length of its vector)."
            )
        self.feature_dim = int(feature_dim)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        super().train(mode)
        if isinstance(self.encoder, nn.Module):
            self.encoder.eval()  # frozen: always in eval mode (dropout off, norm statistics fixed)
        return self

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 5:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"the reference image must have shape (B, C, D, H, W), got {shape}.")
        out = self.encoder.encode(image) if self.is_autoencoder else self.encoder(image)
        if not isinstance(out, torch.Tensor) and callable(getattr(out, "mode", None)):  # a posterior (not Tensor.mode)
            out = out.mode()
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 5):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the image encoder must return (B, F, d, h, w) features or a (B, F) vector, got {shape}.")
        if out.shape[1] != self.feature_dim:
            raise ValueError(
                f"the image encoder returned {out.shape[1]} features, expected feature_dim={self.feature_dim}."
            )
        return out
