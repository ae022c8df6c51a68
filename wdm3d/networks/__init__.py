"""Networks: the WDM U-Net presets (and, in later modules, VAEs, IP-Adapter, MedicalNet)."""

from .unet import PRESETS, ResBlock, WDMUNet, count_parameters, monai_unet, wdm_unet

__all__ = ["PRESETS", "ResBlock", "WDMUNet", "count_parameters", "monai_unet", "wdm_unet"]
