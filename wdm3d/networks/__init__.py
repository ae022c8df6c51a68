"""Networks: the WDM U-Net presets (optionally with cross-attention), the DiT, IP-Adapter, the wavelet autoencoders
(WF-VAE-3D, Wavelet-VAE-3D) and the MedicalNet ResNet-50 used for 3D FID."""

from .attention import Attention, AttnProcessor, ContextEmbedding, CrossAttentionBlock
from .causal import CausalConv3d, CausalDownsample3d, CausalResBlock3d, CausalUpsample3d, ChannelRMSNorm, causal_cache
from .dit import DiT3D, DiTBlock, dit3d
from .ip_adapter import (
    ConditionDropout,
    DroppedConditions,
    FrozenImageEncoder,
    ImageProjection,
    IPAdapter,
    IPAttnProcessor,
    PerceiverResampler,
)
from .medicalnet import (
    MEDICALNET_WEIGHTS_FILE,
    MedicalNetResNet50,
    RandomConv3dFeatures,
    load_medicalnet_weights,
    medicalnet_resnet50,
)
from .unet import (
    PRESETS,
    AttentionAnchor,
    ResBlock,
    WDMUNet,
    count_parameters,
    default_attention_levels,
    monai_unet,
    wdm_unet,
)
from .vae_base import LatentDistribution, MonaiKLAdapter, VAEOutput
from .wavelet_vae import PRIORS, WaveletVAE3D, haar_gain
from .wfvae import WFVAE3D, WFDecoder3D, WFEncoder3D

__all__ = [
    "PRESETS",
    "ResBlock",
    "WDMUNet",
    "count_parameters",
    "monai_unet",
    "wdm_unet",
    "AttentionAnchor",
    "default_attention_levels",
    "Attention",
    "AttnProcessor",
    "ContextEmbedding",
    "CrossAttentionBlock",
    "IPAdapter",
    "IPAttnProcessor",
    "ImageProjection",
    "PerceiverResampler",
    "FrozenImageEncoder",
    "ConditionDropout",
    "DroppedConditions",
    "CausalConv3d",
    "CausalDownsample3d",
    "CausalResBlock3d",
    "CausalUpsample3d",
    "ChannelRMSNorm",
    "causal_cache",
    "LatentDistribution",
    "MonaiKLAdapter",
    "VAEOutput",
    "WFVAE3D",
    "WFEncoder3D",
    "WFDecoder3D",
    "WaveletVAE3D",
    "PRIORS",
    "haar_gain",
    "MEDICALNET_WEIGHTS_FILE",
    "MedicalNetResNet50",
    "RandomConv3dFeatures",
    "load_medicalnet_weights",
    "medicalnet_resnet50",
    "DiT3D",
    "DiTBlock",
    "dit3d",
]
