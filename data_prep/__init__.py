"""Preparation of raw downloads into training-ready NIfTI volumes and MONAI datalists.

- ``python -m data_prep.brats --src RAW --dst OUT`` (:func:`data_prep.brats.prepare_brats`): BraTS NIfTI in either
  naming scheme (2021: ``BraTS2021_00000_t1.nii.gz``; 2023+: ``BraTS-GLI-00000-000-t1n.nii.gz``) -> WDM/cWDM
  preprocessing ([0, 1], padded/cropped, optionally pooled, geometry kept) -> ``OUT/<case>/<case>-<mod>.nii.gz``,
  a seeded patient-level split in ``OUT/datalist.json`` (MONAI datalist) and ``OUT/prepare_summary.json``.
- ``python -m data_prep.demo --dst DIR`` (:func:`data_prep.demo.make_demo_dataset`): the embedded demo dataset,
  BraTS-like T1 / T2 / lesion label built from the MNI152 template in the nilearn wheel (no downloads), written as a raw
  BraTS-2023 folder and prepared by the same code as real data.

The LIDC-IDRI (DICOM) preparation, ``python -m data_prep.lidc``, is added by a later issue. The submodules are not
imported here, so ``import data_prep`` stays cheap.
"""
