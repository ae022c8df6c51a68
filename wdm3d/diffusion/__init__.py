"""Wavelet-domain diffusion: closed forms (:mod:`.maths`), the process and samplers, MONAI training glue."""

from . import maths
from .training import WaveletDiffusionPrepareBatch, WaveletMSELoss, subband_mse
from .wavelet_diffusion import SAMPLERS, WaveletDiffusion

__all__ = ["maths", "SAMPLERS", "WaveletDiffusion", "WaveletDiffusionPrepareBatch", "WaveletMSELoss", "subband_mse"]
