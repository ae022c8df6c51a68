"""Datalists and the transform chains bundles load volumes with."""

from .datalist import datalist_metadata, intensity_range, load_datalist, read_datalist
from .transforms import volume_transforms

__all__ = ["datalist_metadata", "intensity_range", "load_datalist", "read_datalist", "volume_transforms"]
