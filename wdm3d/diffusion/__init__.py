"""Wavelet-domain diffusion: closed forms (:mod:`.maths`), the process and samplers, MONAI training glue."""

from . import maths
from .guidance import ClassifierFreeGuidance
from .training import WaveletDiffusionPrepareBatch, WaveletMSELoss, subband_mse
from .wavelet_diffusion import SAMPLERS, WaveletDiffusion

__all__ = ["maths", "ClassifierFreeGuidance", "SAMPLERS", "WaveletDiffusion", "WaveletDiffusionPrepareBatch", "WaveletMSELoss", "subband_mse"]
