"""Preparation of raw downloads into training-ready NIfTI volumes and MONAI datalists.

- ``python -m data_prep.brats --src RAW --dst OUT`` (:func:`data_prep.brats.prepare_brats`): BraTS NIfTI in either
  naming scheme (2021: ``BraTS2021_00000_t1.nii.gz``; 2023+: ``BraTS-GLI-00000-000-t1n.nii.gz``) -> WDM/cWDM
  preprocessing ([0, 1], padded/cropped, optionally pooled, geometry kept) -> ``OUT/<case>/<case>-<mod>.nii.gz``,
  a seeded patient-level split in ``OUT/datalist.json`` (MONAI datalist) and ``OUT/prepare_summary.json``.
- ``python -m data_prep.demo --dst DIR`` (:func:`data_prep.demo.make_demo_dataset`): the embedded demo dataset,
  BraTS-like T1 / T2 / lesion label built from the MNI152 template in the nilearn wheel (no downloads), written as a raw
  BraTS-2023 folder and prepared by the same code as real data.

- ``python -m data_prep.lidc --src RAW --dst OUT`` (:func:`data_prep.lidc.prepare_lidc`): the LIDC-IDRI DICOM
  download -> one checked CT series per patient (missing slices, uneven spacing, gantry tilt, mixed sizes, non-CT,
  truncated files and NaN values are reported, never half-read) -> HU, 1 mm, crop / air-pad to 256^3, clip
  [-1000, p99.9], [0, 1], optional pooling, RAS geometry kept -> ``OUT/<patient>/<patient>-ct.nii.gz`` and a datalist
  with the key ``ct``.
- ``python -m data_prep.ct_phantom --dst DIR`` (:func:`data_prep.ct_phantom.make_phantom_raw`): synthetic chest-CT
  phantom DICOM series in the LIDC layout, the offline stand-in for LIDC-IDRI (not patient data).

Both preparation tools only read their source, write every file atomically, run cases in parallel (``--workers``)
with a progress bar, skip cases whose outputs are up to date (``--overwrite`` to redo), list every case as done /
skipped / failed with the reason in ``OUT/prepare_summary.json`` and ``OUT/prepare_report.csv``, and exit with 1 when
any case failed, 2 when the output cannot be written (an unwritable ``--dst``, a full disk: the batch stops).

What the two tools share lives in modules of its own, never in one tool's privates: :mod:`data_prep.volume` (array
and affine maths: checks, intensity scaling, pad/crop, pooling), :mod:`data_prep.datalist` (the patient-level split,
the datalist and loading it back), :mod:`data_prep.batch` (re-run records, the parallel case loop, the shared
options), :mod:`data_prep.report` (the summary, the CSV report, the end of a run) and :mod:`data_prep.common` (output
errors, atomic writes, the source / output checks). Each tool's entry module (``brats``, ``lidc``) holds the
whole-dataset run and the command line; its parts are ``brats_discovery`` / ``brats_case`` and ``lidc_discovery`` /
``lidc_dicom`` / ``lidc_case``. The submodules are not imported here, so ``import data_prep`` stays cheap.
"""
