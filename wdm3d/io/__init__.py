"""Writing volumes (NIfTI with geometry kept) and previews (PNG montages)."""

from .nifti import atomic_write_bytes, atomic_write_text, save_nifti
from .preview import mid_slices, montage, save_montage

__all__ = ["atomic_write_bytes", "atomic_write_text", "save_nifti", "mid_slices", "montage", "save_montage"]
