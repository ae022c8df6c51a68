"""The reconstruction-side terms of the autoencoder loss: WF-VAE's wavelet pyramid loss and the Gaussian KL, each a
mean (see :mod:`wdm3d.losses` for what that means for the weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..networks.vae_base import LatentDistribution

__all__ = ["gaussian_kl", "wavelet_pyramid_loss"]


def wavelet_pyramid_loss(enc_coeffs: Sequence[torch.Tensor], dec_coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """WF-VAE's wavelet (WL) loss: ``sum_l mean |enc_l - dec_l|`` over the levels of two coefficient pyramids.

    Args:
        enc_coeffs: encoder-side coefficients per level (finest first), each ``(B, 8C, d_l, h_l, w_l)``.
        dec_coeffs: the decoder's coefficients for the same levels and shapes.

    Returns:
        A scalar tensor. Two empty pyramids (a model without a wavelet path) give 0.

    Raises:
        ValueError: the pyramids differ in length, or a level differs in shape.
    """
    if isinstance(enc_coeffs, torch.Tensor) or isinstance(dec_coeffs, torch.Tensor):
        raise TypeError("enc_coeffs and dec_coeffs must be lists of per-level tensors (finest first), not tensors.")
    enc_coeffs, dec_coeffs = list(enc_coeffs), list(dec_coeffs)
    if len(enc_coeffs) != len(dec_coeffs):
        raise ValueError(
            f"wavelet pyramids differ in length: {len(enc_coeffs)} encoder level(s) vs {len(dec_coeffs)} decoder "
            "level(s); the decoder must predict every level the encoder decomposed."
        )
    if not enc_coeffs:
        return torch.zeros(())
    total = None
    for lvl, (e, d) in enumerate(zip(enc_coeffs, dec_coeffs)):
        if e.shape != d.shape:
            raise ValueError(
                f"wavelet level {lvl} (0 = finest): encoder coefficients {tuple(e.shape)} vs decoder coefficients "
                f"{tuple(d.shape)}; the shapes must match."
            )
        diff = (e - d).abs()
        # half types (bf16 autocast) are averaged into float32: a bf16 scalar keeps about 3 significant digits
        term = diff.mean(dtype=torch.float32) if diff.dtype in (torch.bfloat16, torch.float16) else diff.mean()
        total = term if total is None else total + term
    return total


def gaussian_kl(posterior: LatentDistribution) -> torch.Tensor:
    """KL(q || N(0, I)) as a mean over all latent elements (and the batch): a scalar.

    Args:
        posterior: the encoder's :class:`LatentDistribution`, mean ``(B, Z, d, h, w)``.

    Returns:
        ``posterior.kl().sum() / posterior.mean.numel()``.
    """
    return posterior.kl().sum() / posterior.mean.numel()
