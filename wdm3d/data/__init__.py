"""Datalists, the transform chains bundles load volumes with, input checks and resumable sampling."""

from .datalist import datalist_metadata, hu_range, intensity_range, load_datalist, read_datalist
from .safety import BadInputError, BadSample, CheckVolumed, GuardedTransform, ResumableSampler, SkipBadSamples
from .transforms import LoadVolumed, latent_transforms, volume_transforms

__all__ = [
    "datalist_metadata",
    "hu_range",
    "intensity_range",
    "load_datalist",
    "read_datalist",
    "volume_transforms",
    "latent_transforms",
    "LoadVolumed",
    "CheckVolumed",
    "BadSample",
    "BadInputError",
    "GuardedTransform",
    "SkipBadSamples",
    "ResumableSampler",
]
