"""Networks: the WDM U-Net presets, the MedicalNet ResNet-50 used for 3D FID (and, in later modules, VAEs, IP-Adapter)."""

from .medicalnet import (
    MEDICALNET_WEIGHTS_FILE,
    MedicalNetResNet50,
    RandomConv3dFeatures,
    load_medicalnet_weights,
    medicalnet_resnet50,
)
from .unet import PRESETS, ResBlock, WDMUNet, count_parameters, monai_unet, wdm_unet

__all__ = [
    "PRESETS", "ResBlock", "WDMUNet", "count_parameters", "monai_unet", "wdm_unet",
    "MEDICALNET_WEIGHTS_FILE", "MedicalNetResNet50", "RandomConv3dFeatures", "load_medicalnet_weights",
    "medicalnet_resnet50",
]
