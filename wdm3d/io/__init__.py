"""Writing volumes (NIfTI and DICOM with geometry kept) and previews (PNG montages)."""

from .dicom import write_dicom_series
from .nifti import atomic_write, atomic_write_bytes, atomic_write_text, new_file_mode, nifti_geometry, save_nifti
from .preview import mid_slices, montage, save_montage

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "new_file_mode",
    "nifti_geometry",
    "save_nifti",
    "write_dicom_series",
    "mid_slices",
    "montage",
    "save_montage",
]
