"""What every wdm3d volume autoencoder returns and promises (WF-VAE-3D, Wavelet-VAE-3D).

The training iteration (:mod:`wdm3d.engine.vae_training`), the losses (:mod:`wdm3d.losses`), the bundles and the
latent diffusion code drive any autoencoder through this small interface, so that the two VAEs (and MONAI's
``AutoencoderKL`` through :class:`MonaiKLAdapter`) are interchangeable in configs.

An autoencoder ``model`` provides:

- ``model(x, sample=True) -> VAEOutput`` (training forward: encode, reparameterise, decode);
- ``model.encode(x) -> LatentDistribution`` and ``model.decode(z) -> x``;
- ``model.latent_channels`` (int) and ``model.downsample_factor`` (int, per spatial axis);
- ``model.last_layer_weight()`` -> the weight of the decoder's output layer (for the adaptive GAN weight).

Shapes: ``x`` is ``(B, C, D, H, W)``; ``z`` is ``(B, latent_channels, D/f, H/f, W/f)`` with ``f = downsample_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LatentDistribution", "VAEOutput", "MonaiKLAdapter"]


@dataclass
class LatentDistribution:
    """A diagonal Gaussian posterior ``N(mean, std^2)`` over the latent.

    Args:
        mean: ``(B, Z, d, h, w)``.
        logvar: same shape as ``mean``; clamped to [-30, 20] as in LDM/MONAI.
        std: optional explicit standard deviation (a learnable noise scale); overrides ``exp(logvar / 2)``.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.logvar is not None:
            self.logvar = self.logvar.clamp(-30.0, 20.0)

    @property
    def stddev(self) -> torch.Tensor:
        if self.std is not None:
            return self.std
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable in mean and std)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.stddev * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: ``(B,)``, in float32 at least.

        Computed in float32 even when the encoder ran under bf16 autocast: ``var - 1 - logvar`` cancels to nearly 0
        for a posterior close to the prior, which bf16's 8 bits of mantissa cannot resolve, and the sum runs over
        every latent element.
        """
        def wide(t: torch.Tensor) -> torch.Tensor:
            return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

        mean = wide(self.mean)
        if self.std is None and self.logvar is not None:
            logvar = wide(self.logvar)
            var = logvar.exp()
        else:
            std = wide(self.stddev)
            var = std.square()
            # log of the std itself, floored only at float32's smallest normal (~1e-38): a floor on var (1e-12 was
            # used) stops the KL growing below std 1e-6 and flips its gradient, so the prior pushed the std down
            logvar = 2.0 * torch.log(std.clamp_min(torch.finfo(torch.float32).tiny))
        kl = 0.5 * (mean.square() + var - 1.0 - logvar)
        return kl.flatten(1).sum(1)


@dataclass
class VAEOutput:
    """Result of a training forward pass.

    Attributes:
        reconstruction: ``(B, C, D, H, W)``.
        posterior: the latent distribution the decoder's input was drawn from.
        latent: the latent that was decoded, ``(B, Z, d, h, w)``.
        enc_coeffs: encoder-side wavelet coefficients per level (finest first), each ``(B, 8C, ...)``; empty for
            models without a wavelet path. The wavelet loss compares them with ``dec_coeffs``.
        dec_coeffs: the decoder's predicted coefficients for the same levels and shapes.
        extra_losses: model-specific loss terms already weighted-ready (e.g. ``"sparsity"``), each a scalar.
    """

    reconstruction: torch.Tensor
    posterior: LatentDistribution
    latent: torch.Tensor
    enc_coeffs: list[torch.Tensor] = field(default_factory=list)
    dec_coeffs: list[torch.Tensor] = field(default_factory=list)
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MonaiKLAdapter(nn.Module):
    """MONAI's ``AutoencoderKL`` behind the wdm3d autoencoder interface (the baseline in the side-by-side table).

    Args:
        autoencoder: a ``monai.networks.nets.AutoencoderKL`` with ``spatial_dims=3``.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.latent_channels = int(autoencoder.latent_channels)
        self.downsample_factor = 2 ** (len(autoencoder.encoder.channels) - 1)

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        mu, sigma = self.autoencoder.encode(x)
        return LatentDistribution(mean=mu, std=sigma)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return VAEOutput(reconstruction=self.decode(z), posterior=posterior, latent=z)

    def last_layer_weight(self) -> torch.Tensor:
        return self.autoencoder.decoder.blocks[-1].conv.weight
