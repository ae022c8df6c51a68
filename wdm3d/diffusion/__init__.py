"""Wavelet-domain diffusion: closed forms (:mod:`.maths`), the process and samplers (:mod:`.wavelet_diffusion`),
MONAI training glue (:mod:`.training`: prepare-batch, the one training inferer, losses), classifier-free guidance
(:mod:`.guidance`), conditioning (:mod:`.conditioning`: context tokens, IP-Adapter training on a frozen base,
concatenation) and the teacher of a distilled flow map (:mod:`.teacher`)."""

from . import flow_map, maths
from .conditioning import (
    CONDITIONING_MODES,
    AdapterSaver,
    AdapterState,
    ConditionalPrepareBatch,
    ContextConditionedUNet,
    build_image_encoder,
    expand_paired_datalist,
    load_frozen_base,
)
from .guidance import ClassifierFreeGuidance
from .teacher import load_teacher
from .training import (
    DiffusionTarget,
    FlowMapPrediction,
    WaveletDiffusionInferer,
    WaveletDiffusionPrepareBatch,
    WaveletMSELoss,
    subband_mse,
    target_tensor,
)
from .wavelet_diffusion import FLOW_MAPS, SAMPLERS, WaveletDiffusion

__all__ = [
    "flow_map",
    "maths",
    "AdapterSaver",
    "AdapterState",
    "CONDITIONING_MODES",
    "ClassifierFreeGuidance",
    "ConditionalPrepareBatch",
    "ContextConditionedUNet",
    "FLOW_MAPS",
    "FlowMapPrediction",
    "SAMPLERS",
    "WaveletDiffusion",
    "WaveletDiffusionInferer",
    "WaveletDiffusionPrepareBatch",
    "WaveletMSELoss",
    "build_image_encoder",
    "expand_paired_datalist",
    "load_frozen_base",
    "load_teacher",
    "subband_mse",
    "DiffusionTarget",
    "target_tensor",
]
