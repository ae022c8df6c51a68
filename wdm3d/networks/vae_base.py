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

# no ``from __future__ import annotations`` here: TorchScript reads the NamedTuple fields' annotations as objects
# (it cannot parse string annotations such as ``"torch.Tensor | None"`` of a NamedTuple)

from typing import NamedTuple

import torch
from torch import Generator, nn

__all__ = ["LatentDistribution", "MonaiKLAdapter", "VAEOutput", "latent_sample", "latent_stddev"]


class _LatentFields(NamedTuple):
    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    std: torch.Tensor | None = None


class LatentDistribution(_LatentFields):
    """A diagonal Gaussian posterior ``N(mean, std^2)`` over the latent.

    A NamedTuple of tensors (so that a network that returns one compiles with TorchScript, and a scripted network's
    output loads anywhere); :func:`latent_sample` and :func:`latent_stddev` are :meth:`sample` and :attr:`stddev`
    for TorchScript code, which cannot call a NamedTuple's methods. TorchScript code constructs it without the clamp
    below: clamp ``logvar`` before.

    Args:
        mean: ``(B, Z, d, h, w)``.
        logvar: same shape as ``mean``; clamped to [-30, 20] as in LDM/MONAI.
        std: optional explicit standard deviation (a learnable noise scale); overrides ``exp(logvar / 2)``.
    """

    __slots__ = ()

    def __new__(cls, mean: torch.Tensor, logvar: torch.Tensor | None = None, std: torch.Tensor | None = None):
        if logvar is not None:
            logvar = logvar.clamp(-30.0, 20.0)
        return super().__new__(cls, mean, logvar, std)

    @property
    def stddev(self) -> torch.Tensor:
        return latent_stddev(self)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable in mean and std)."""
        return latent_sample(self, generator)

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
            # log of the std itself, floored only at float32's smallest normal (~1e-38): a floor on var (say 1e-12)
            # would stop the KL growing below std 1e-6 and flip its gradient, so the prior would push the std down
            logvar = 2.0 * torch.log(std.clamp_min(torch.finfo(torch.float32).tiny))
        kl = 0.5 * (mean.square() + var - 1.0 - logvar)
        return kl.flatten(1).sum(1)


def latent_stddev(posterior: LatentDistribution) -> torch.Tensor:
    """The posterior's standard deviation: ``std`` if given, else ``exp(logvar / 2)``, else zeros."""
    std, logvar = posterior.std, posterior.logvar
    if std is not None:
        return std
    if logvar is None:
        return torch.zeros_like(posterior.mean)
    return torch.exp(0.5 * logvar)


def latent_sample(posterior: LatentDistribution, generator: Generator | None = None) -> torch.Tensor:
    """Reparameterised sample ``mean + std * eps`` of ``posterior`` (differentiable in mean and std)."""
    mean = posterior.mean
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + latent_stddev(posterior) * eps


class _VAEOutputFields(NamedTuple):
    reconstruction: torch.Tensor
    posterior: LatentDistribution
    latent: torch.Tensor
    enc_coeffs: list[torch.Tensor]
    dec_coeffs: list[torch.Tensor]
    extra_losses: dict[str, torch.Tensor]


class VAEOutput(_VAEOutputFields):
    """Result of a training forward pass.

    A NamedTuple (TorchScript compiles a forward that returns one; it cannot return a dataclass), whose first
    element is the reconstruction. Like it for a shape check: ``output.shape`` and ``output.dtype`` are the
    reconstruction's (MONAI's ``verify_net_in_out`` reads them from a network's output). Fields are read-only: use
    ``output._replace(reconstruction=...)`` for a changed copy. TorchScript code passes all six fields.

    Attributes:
        reconstruction: ``(B, C, D, H, W)``.
        posterior: the latent distribution the decoder's input was drawn from.
        latent: the latent that was decoded, ``(B, Z, d, h, w)``.
        enc_coeffs: encoder-side wavelet coefficients per level (finest first), each ``(B, 8C, ...)``; empty for
            models without a wavelet path. The wavelet loss compares them with ``dec_coeffs``.
        dec_coeffs: the decoder's predicted coefficients for the same levels and shapes.
        extra_losses: model-specific loss terms already weighted-ready (e.g. ``"sparsity"``), each a scalar.
    """

    __slots__ = ()

    def __new__(
        cls,
        reconstruction: torch.Tensor,
        posterior: LatentDistribution,
        latent: torch.Tensor,
        enc_coeffs: list[torch.Tensor] | None = None,
        dec_coeffs: list[torch.Tensor] | None = None,
        extra_losses: dict[str, torch.Tensor] | None = None,
    ):
        # fresh containers per output (a NamedTuple default would be one list shared by every output)
        return super().__new__(
            cls,
            reconstruction,
            posterior,
            latent,
            [] if enc_coeffs is None else enc_coeffs,
            [] if dec_coeffs is None else dec_coeffs,
            {} if extra_losses is None else extra_losses,
        )

    @property
    def shape(self) -> torch.Size:
        """The reconstruction's shape."""
        return self.reconstruction.shape

    @property
    def dtype(self) -> torch.dtype:
        """The reconstruction's dtype."""
        return self.reconstruction.dtype


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
