"""Preparation of raw BraTS (NIfTI) and LIDC-IDRI (DICOM) downloads into training-ready NIfTI and datalists.

The preparation commands (``python -m data_prep.brats``, ``python -m data_prep.lidc``) are added by the data_prep
issue; this package is installed with wdm3d so that they live beside it.
"""
