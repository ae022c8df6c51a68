"""The autoencoder's generator-side loss: every term of :mod:`wdm3d.losses` weighted into one scalar, and the named
terms for logging."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..networks.vae_base import VAEOutput
from .terms import gaussian_kl, wavelet_pyramid_loss

__all__ = ["LOSS_NAMES", "VAELoss"]

#: The logged term names (stable across code, configs and MLflow keys); model extras add their own names.
LOSS_NAMES: tuple[str, ...] = (
    "total",
    "recon",
    "wavelet",
    "kl",
    "sparsity",
    "perceptual",
    "nll",
    "adv_g",
    "adv_d",
    "adaptive_weight",
)


class VAELoss(nn.Module):
    """Generator-side loss of a wdm3d autoencoder (the GAN terms are the engine's, see below).

    ``total = recon_weight * recon + wavelet_weight * wavelet + kl_weight * kl + sum_k extra_weights[k] * extra_k
    + perceptual_weight * perceptual``, with

    - ``recon``: mean L1 over all voxels;
    - ``wavelet``: :func:`wavelet_pyramid_loss` of ``output.enc_coeffs`` / ``output.dec_coeffs`` (0 without them);
    - ``kl``: :func:`gaussian_kl`, a mean over latent elements; left out (reported as 0) when ``use_gaussian_kl`` is
      False, or, with ``use_gaussian_kl=None``, when the ``model`` passed says ``use_gaussian_kl = False``
      (e.g. ``WaveletVAE3D(prior="laplace")``);
    - extras: every entry of ``output.extra_losses``, weighted by ``extra_weights`` (names without a weight get 1.0);
    - ``perceptual``: ``perceptual(reconstruction, x)`` when a perceptual module is given.

    The terms also hold ``nll = recon_weight * recon + perceptual_weight * perceptual``, the part the VQGAN adaptive
    GAN weight is measured against. The adversarial terms (generator hinge loss with the adaptive weight, the
    discriminator's own step, ``discriminator_start``) need a second optimiser and are run by
    :class:`wdm3d.engine.VAEIteration` with :func:`generator_adversarial_loss`,
    :func:`discriminator_adversarial_loss` and :func:`adaptive_gan_weight`.

    Called MONAI-style, ``loss(output, target)``, so it can be a ``SupervisedTrainer``'s ``loss_function``.
    The weights are for *mean* reductions (see the module docstring for converting WF-VAE's summed weights).

    Args:
        recon_weight: weight of the L1 reconstruction term.
        wavelet_weight: weight of the wavelet pyramid loss (WF-VAE: 0.1; 0 hurts PSNR).
        kl_weight: weight of the per-element mean KL.
        extra_weights: weight per ``extra_losses`` name; default ``{"sparsity": 1e-4}``.
        perceptual: a perceptual module ``(input, target) -> scalar`` (e.g. :class:`Perceptual25DLoss`); None: off.
        perceptual_weight: its weight (WF-VAE's LPIPS: 1.0, later 0.1).
        use_gaussian_kl: add the KL term; None (default) asks the ``model`` given to the call (its
            ``use_gaussian_kl`` attribute) and adds it when there is none.

    Example:
        >>> loss_fn = VAELoss()
        >>> # total, terms = loss_fn(model(x), x, model=model)
    """

    def __init__(
        self,
        recon_weight: float = 1.0,
        wavelet_weight: float = 0.1,
        kl_weight: float = 1e-6,
        extra_weights: Mapping[str, float] | None = None,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        use_gaussian_kl: bool | None = None,
    ) -> None:
        super().__init__()
        extra_weights = {"sparsity": 1e-4} if extra_weights is None else dict(extra_weights)
        named = {
            "recon_weight": recon_weight,
            "wavelet_weight": wavelet_weight,
            "kl_weight": kl_weight,
            "perceptual_weight": perceptual_weight,
            **{f"extra_weights[{k!r}]": v for k, v in extra_weights.items()},
        }
        for name, value in named.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if perceptual is not None and not callable(perceptual):
            raise TypeError(f"perceptual must be a module (input, target) -> scalar, got {type(perceptual).__name__}.")
        self.recon_weight, self.wavelet_weight = float(recon_weight), float(wavelet_weight)
        self.kl_weight = float(kl_weight)
        self.extra_weights = {k: float(v) for k, v in extra_weights.items()}
        self.perceptual = perceptual
        self.perceptual_weight = float(perceptual_weight)
        if use_gaussian_kl is not None and not isinstance(use_gaussian_kl, bool):
            raise TypeError(f"use_gaussian_kl must be True, False or None, got {use_gaussian_kl!r}.")
        self.use_gaussian_kl = use_gaussian_kl

    def forward(
        self, output: VAEOutput, x: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator-side loss.

        Args:
            output: the autoencoder's :class:`VAEOutput` for ``x``.
            x: the input volumes (the target) ``(B, C, D, H, W)``.
            model: the autoencoder; read for ``use_gaussian_kl`` when the constructor left it None.

        Returns:
            ``(total, terms)``: the scalar to back-propagate and the unweighted scalar terms ``total``, ``recon``,
            ``wavelet``, ``kl``, ``perceptual``, ``nll`` and one per extra loss (every name in ``extra_weights`` is
            present, 0 when the model did not return it). The terms are still attached to the graph (the engine
            computes the adaptive GAN weight from ``terms["nll"]``); detach them to log.
        """
        if not isinstance(output, VAEOutput):
            raise TypeError(
                f"output must be a VAEOutput (the autoencoder's forward result), got {type(output).__name__}."
            )
        rec = output.reconstruction
        if rec.shape != x.shape:
            raise ValueError(f"reconstruction {tuple(rec.shape)} and input {tuple(x.shape)} must have the same shape.")
        zero = rec.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        terms["recon"] = (rec - x).abs().mean()
        # half-type pyramids give a float32 loss; .to(rec) would round it back to bf16 under autocast
        terms["wavelet"] = wavelet_pyramid_loss(output.enc_coeffs, output.dec_coeffs).to(device=rec.device)
        use_kl = self.use_gaussian_kl
        if use_kl is None:
            use_kl = bool(getattr(model, "use_gaussian_kl", True)) if model is not None else True
        terms["kl"] = gaussian_kl(output.posterior) if use_kl else zero
        total = self.recon_weight * terms["recon"] + self.wavelet_weight * terms["wavelet"]
        if use_kl:
            total = total + self.kl_weight * terms["kl"]
        for name in self.extra_weights:
            terms.setdefault(name, zero)
        for name, value in output.extra_losses.items():
            if name in LOSS_NAMES and name != "sparsity":
                raise ValueError(f"extra loss name {name!r} clashes with a VAELoss term; rename it in the model.")
            if not isinstance(value, torch.Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"extra loss {name!r} must be a scalar tensor (reduce it in the model), got {shape}.")
            terms[name] = value
            total = total + self.extra_weights.get(name, 1.0) * value
        nll = self.recon_weight * terms["recon"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(rec, x)
            nll = nll + self.perceptual_weight * terms["perceptual"]
            total = total + self.perceptual_weight * terms["perceptual"]
        else:
            terms["perceptual"] = zero
        terms["nll"] = nll
        terms["total"] = total
        return total, terms
