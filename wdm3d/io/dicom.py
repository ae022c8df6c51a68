"""Synthetic volumes as DICOM series (pydicom), geometry kept, marked synthetic, nothing copied from any scan.

:func:`write_dicom_series` takes only an array and its NIfTI-style (RAS) affine, so no attribute of a training scan
can reach the output: every identifier is new (``generate_uid``) or a fixed synthetic value.

Geometry. DICOM's patient system is LPS, NIfTI's world is RAS: ``affine_lps = diag(-1, -1, 1, 1) @ affine``. The
volume is first permuted/flipped (nibabel's ``io_orientation``, no resampling) so that its voxel axes point as
closely as possible to +L, +P, +S; then one file is written per slice along the third axis (the voxel axis closest
to the patient's S axis), slices ordered from inferior to superior (``InstanceNumber`` 1 is the lowest). In a slice,
columns run along the axis closest to L and rows along the axis closest to P (the usual radiological display):

- ``ImageOrientationPatient`` = unit column direction (along a row), unit row direction (down a column), in LPS;
- ``ImagePositionPatient`` of slice ``k`` = ``affine_lps @ (0, 0, k, 1)`` after the reorientation;
- ``PixelSpacing`` = (row spacing, column spacing); ``SliceThickness`` = ``SpacingBetweenSlices`` = slice spacing.

An affine with shear (slice direction not perpendicular to the slice plane) cannot be written as a DICOM series
and is refused.

Values. Pixel data are int16 (``BitsStored`` 16, signed); how they give back the float values depends on the IOD:

- CT: the volume is in HU (or [0, 1] with ``hu_window=(low, high)``, mapped back as ``low + v * (high - low)``, the
  inverse of ``data_prep.lidc``'s clip-and-scale); ``RescaleSlope`` 1 and ``RescaleIntercept`` -1024 (1 HU steps,
  so every HU value comes back within 0.5 HU) when the HU values fit in int16 that way, else a slope spreading the
  range over int16 (within ``slope / 2``); ``RescaleType`` HU. Without ``hu_window`` a [0, 1]-like volume is still
  written, but ``RescaleType`` is ``US`` and the comments say it is not HU.
- MR: the MR Image IOD has no Modality LUT (no ``RescaleSlope`` / ``RescaleIntercept`` / ``RescaleType``), so none
  is written. ``value_range=(low, high)`` (default: the volume's min and max) is mapped linearly to the stored
  values [0, 4095] (``MR_STORED_MAX``): ``stored = round((v - low) / step)``, ``step = (high - low) / 4095``; values
  outside the range are clipped to it. The float values come back as ``low + stored * step``, within ``step / 2`` of
  the original for every value inside the range. The mapping is written in each file as a Real World Value Mapping
  Sequence (General Image module, slope ``step``, intercept ``low``, stored values 0..4095, unit "no units") and in
  words in ``ImageComments``; :func:`dicom_value_mapping` reads it (or the CT rescale) back. The window
  (``WindowCenter`` / ``WindowWidth``) is in stored values and spans the stored range of the series.

IOD conformance (PS3.3 A.3 CT Image, A.4 MR Image; classic per-slice storage): every Type 1 attribute of the
mandatory modules has a valid value, every Type 2 one is present (empty when unknown: no acquisition took place),
and the Type 1C/2C conditions are applied (``tests/test_dicom_iod.py`` holds the tables and checks every file).
Values chosen for a synthetic image:

- ``ImageType`` ``DERIVED\\SECONDARY\\AXIAL`` (CT, value 3 from C.8.2.1.1.1) or ``DERIVED\\SECONDARY\\OTHER`` (MR, value
  3 from C.8.3.1.1.1: none of MPR, T1 MAP, ... describes a generated image);
- ``PatientPosition`` ``HFS`` (head first-supine; Type 2C in General Series, required for CT/MR images without a
  Patient Orientation Code Sequence, written with a value): a nominal position, the usual one for brain MRI and
  chest CT; the patient-based (LPS) geometry above does not depend on it;
- MR ``ScanningSequence`` ``RM`` (research mode: no SE/IR/GR/EP sequence was run) and ``SequenceVariant``
  ``NONE`` (both Type 1); ``MRAcquisitionType`` ``3D``; ``ScanOptions``, ``RepetitionTime`` (required: the
  sequence is not EP), ``EchoTime``, ``EchoTrainLength`` present and empty (Type 2/2C, unknown);
- CT ``KVP`` and ``AcquisitionNumber`` present and empty (Type 2);
- ``Laterality`` (2C) is not written: it is required only when the body part examined is a paired structure, and
  these volumes show a whole head or chest (both sides), so R or L would be false.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .. import __version__

__all__ = [
    "MR_STORED_MAX",
    "PATIENT_POSITION",
    "PRIVATE_CREATOR",
    "SYNTHETIC_COMMENT",
    "dicom_value_mapping",
    "write_dicom_series",
]

#: Written to ``ImageComments`` and ``DerivationDescription`` of every file.
SYNTHETIC_COMMENT = "synthetic image generated by wdm3d, not a patient scan"
#: Private creator of the block (group 0x0011) that flags the data as synthetic.
PRIVATE_CREATOR = "wdm3d"
#: MR stored values span [0, MR_STORED_MAX] (12 bits).
MR_STORED_MAX = 4095
#: ``PatientPosition`` of every series: head first-supine (nominal; the LPS geometry does not depend on it).
PATIENT_POSITION = "HFS"

_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_CT_INTERCEPT = -1024.0
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def dicom_geometry(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The reorientation and LPS affine used for writing.

    Args:
        affine: 4x4 voxel-to-RAS matrix of a volume of ``shape`` (3 sizes).

    Returns:
        ``(ornt, affine_lps)``: the nibabel orientation that brings the voxel axes closest to (+L, +P, +S), and the
        voxel-to-LPS affine of the reoriented volume (its third axis is the slice axis).
    """
    aff_lps = _LPS @ np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(aff_lps)
    aff2 = aff_lps @ nib.orientations.inv_ornt_aff(ornt, tuple(int(s) for s in shape))
    return ornt, aff2


def _rescale(arr: np.ndarray, modality: str, value_range, hu: bool) -> tuple[np.ndarray, float, float, str]:
    """Float values -> (int16 stored values, slope, intercept, rescale type)."""
    if modality == "MR":
        lo, hi = (float(v) for v in value_range) if value_range is not None else (float(arr.min()), float(arr.max()))
        if not hi > lo:
            hi = lo + 1.0  # a constant volume: any slope represents it exactly
        slope = (hi - lo) / MR_STORED_MAX
        stored = np.clip(np.rint((arr - lo) / slope), 0, MR_STORED_MAX)
        return stored.astype(np.int16), slope, lo, "US"
    vmin, vmax = float(arr.min()), float(arr.max())
    if hu and vmin >= _CT_INTERCEPT - 32768 and vmax <= _CT_INTERCEPT + 32767:
        slope, intercept = 1.0, _CT_INTERCEPT
    else:  # spread the range over int16
        span = vmax - vmin if vmax > vmin else 1.0
        slope = span / 65535.0
        intercept = vmin + 32768.0 * slope
    stored = np.clip(np.rint((arr - intercept) / slope), -32768, 32767)
    return stored.astype(np.int16), slope, intercept, "HU" if hu else "US"


def _ds_number(value: float) -> str:
    """A DS string (16 characters at most) that keeps as much precision as fits."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6e}"[:16]


def dicom_value_mapping(ds) -> tuple[float, float]:
    """``(slope, intercept)`` that turn a file's stored pixel values into its float values: ``v = slope * s + intercept``.

    Reads what :func:`write_dicom_series` writes: ``RescaleSlope`` / ``RescaleIntercept`` where present (CT), else the
    first item of the Real World Value Mapping Sequence (MR, whose IOD has no rescale), else the identity. pydicom's
    ``apply_modality_lut`` covers only the first case, SimpleITK (GDCM) likewise.

    Args:
        ds: a ``pydicom.Dataset`` of one slice (the header is enough).

    Returns:
        ``(slope, intercept)`` as floats.
    """
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    items = ds.get("RealWorldValueMappingSequence")
    if items:
        item = items[0]
        if "RealWorldValueSlope" not in item or "RealWorldValueIntercept" not in item:
            raise ValueError(
                "the Real World Value Mapping has no RealWorldValueSlope/Intercept (a LUT mapping is not "
                "supported); read the values with a tool that applies RealWorldValueLUTData."
            )
        return float(item.RealWorldValueSlope), float(item.RealWorldValueIntercept)
    return 1.0, 0.0


def write_dicom_series(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    out_dir: str | os.PathLike,
    modality: str = "MR",
    series_description: str | None = None,
    value_range: Sequence[float] | None = None,
    hu_window: Sequence[float] | None = None,
    overwrite: bool = False,
    series_number: int = 1,
    patient_id: str | None = None,
) -> dict:
    """Write a 3D volume as a DICOM series marked synthetic, one file per slice, atomically.

    Args:
        volume: ``(D, H, W)`` or ``(1, D, H, W)`` array/tensor, voxel axes as ``affine`` describes.
        affine: 4x4 voxel-to-world (RAS, mm) matrix, as in NIfTI / MONAI MetaTensors.
        out_dir: the series folder to create (``IM_0001.dcm`` ...). Written into a temporary folder beside it and
            renamed, so a reader never sees half a series.
        modality: ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
        series_description: appended to ``"synthetic (wdm3d)"`` in ``SeriesDescription`` (64 characters max).
        value_range: MR only: the float range mapped to stored values [0, 4095] (default: the volume's min/max).
        hu_window: CT only: ``(low, high)`` HU; the volume is taken as [0, 1]-normalised and mapped back to HU
            (``low + v * (high - low)``); without it a CT volume is taken as HU when its values look like HU
            (min below -100 or max above 100) and written with ``RescaleType`` ``US`` otherwise.
        overwrite: replace an existing ``out_dir`` (default: refuse with FileExistsError).
        series_number: ``SeriesNumber``.
        patient_id: synthetic ``PatientID`` (default ``WDM3D-SYN-<8 hex digits>``, new each call); must start
            with ``WDM3D-SYN-`` so it can never be mistaken for a real patient's.

    Returns:
        ``{"dir", "files", "num_slices", "study_uid", "series_uid", "patient_id", "rescale_slope",
        "rescale_intercept", "rescale_type", "slice_axis"}``: ``rescale_slope`` / ``rescale_intercept`` map stored
        values to float values (CT: the written ``RescaleSlope`` / ``RescaleIntercept``; MR: the Real World Value
        Mapping, as MR files carry no rescale), ``rescale_type`` is CT's ``RescaleType`` (``"US"`` for MR);
        ``slice_axis`` is the input voxel axis the slices are taken along.

    Example:
        >>> write_dicom_series(vol, nifti.affine, "sample_0000_dicom", modality="CT", hu_window=(-1000, 1000))
    """
    out_dir = Path(out_dir)
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be 'MR' or 'CT', got {modality!r} (for {out_dir}).")
    arr = _as_numpy(volume).astype(np.float64)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"volume must be (D, H, W) or (1, D, H, W), got shape {arr.shape} (for {out_dir}).")
    if not np.isfinite(arr).all():
        raise ValueError(f"volume has NaN or infinite values; DICOM cannot store them (for {out_dir}).")
    aff = _as_numpy(affine).astype(np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be a finite, invertible 4x4 matrix, got {aff.tolist()} (for {out_dir}).")
    if hu_window is not None:
        if modality != "CT":
            raise ValueError(f"hu_window is for CT only, got modality {modality!r} (for {out_dir}).")
        low, high = (float(v) for v in hu_window)
        if not high > low:
            raise ValueError(f"hu_window must be (low, high) HU with low < high, got {hu_window!r}.")
        arr = low + arr * (high - low)
    if value_range is not None:
        if modality != "MR":
            raise ValueError(f"value_range is for MR only (CT uses HU or hu_window), got modality {modality!r}.")
        if len(value_range) != 2 or not float(value_range[1]) > float(value_range[0]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
    if patient_id is None:
        patient_id = f"WDM3D-SYN-{uuid.uuid4().hex[:8]}"
    elif not str(patient_id).startswith("WDM3D-SYN-"):
        raise ValueError(f"patient_id must start with 'WDM3D-SYN-' (synthetic), got {patient_id!r}.")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True.")

    ornt, aff2 = dicom_geometry(aff, arr.shape)
    data = nib.orientations.apply_orientation(arr, ornt)  # (columns, rows, slices)
    cols_dir, rows_dir, slice_vec = aff2[:3, 0], aff2[:3, 1], aff2[:3, 2]
    col_spacing, row_spacing, slice_spacing = (float(np.linalg.norm(v)) for v in (cols_dir, rows_dir, slice_vec))
    cols_dir, rows_dir = cols_dir / col_spacing, rows_dir / row_spacing
    normal = np.cross(cols_dir, rows_dir)
    if abs(float(cols_dir @ rows_dir)) > 1e-4 or abs(abs(float(normal @ slice_vec)) / slice_spacing - 1) > 1e-4:
        raise ValueError(
            f"the affine has shear (voxel axes not perpendicular), which a DICOM series cannot represent; resample "
            f"the volume first (for {out_dir}). Affine: {aff.tolist()}"
        )
    hu = modality == "CT" and (hu_window is not None or float(arr.min()) < -100.0 or float(arr.max()) > 100.0)
    stored, slope, intercept, rescale_type = _rescale(data, modality, value_range, hu)

    if modality == "CT":
        if hu_window is not None:
            how = f"HU mapped back from [0, 1] with window [{float(hu_window[0]):g}, {float(hu_window[1]):g}] HU"
        else:
            how = "values in HU" if hu else "values are the volume's normalised intensities, not HU"
    else:
        lo, hi = (float(v) for v in value_range) if value_range is not None else (float(arr.min()), float(arr.max()))
        how = (
            f"intensities [{lo:g}, {hi:g}] stored as [0, {MR_STORED_MAX}] without rescale; intensity = "
            f"{lo:g} + stored * {slope:.6g} (Real World Value Mapping)"
        )
    comment = f"{SYNTHETIC_COMMENT}; {how}"
    description = "synthetic (wdm3d)" + (f" {series_description}" if series_description else "")
    now = datetime.now(timezone.utc)
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    sop_class = _SOP_CLASS[modality]
    orientation = [_ds_number(float(v)) for v in (*cols_dir, *rows_dir)]
    # window over the series' range, in the units the VOI LUT sees: rescaled values for CT, stored values for MR (no
    # Modality LUT); its width must be at least 1 (PS3.3 C.11.2.1.2.1)
    smin, smax = float(stored.min()), float(stored.max())
    voi_slope, voi_intercept = (slope, intercept) if modality == "CT" else (1.0, 0.0)
    center = (smax + smin) / 2 * voi_slope + voi_intercept
    width = max((smax - smin) * voi_slope, 1.0)

    rwvm = None
    if modality == "MR":
        rwvm = Dataset()
        rwvm.LUTExplanation = "volume intensity before DICOM export (wdm3d, synthetic)"
        rwvm.LUTLabel = "WDM3D_INTENSITY"
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = "1", "UCUM", "no units"
        rwvm.MeasurementUnitsCodeSequence = [units]
        # US or SS after Pixel Representation (1: signed)
        rwvm.add_new(0x00409216, "SS", 0)  # RealWorldValueFirstValueMapped
        rwvm.add_new(0x00409211, "SS", MR_STORED_MAX)  # RealWorldValueLastValueMapped
        rwvm.RealWorldValueIntercept = float(intercept)
        rwvm.RealWorldValueSlope = float(slope)

    # the temporary folder sits beside out_dir (same file system), so the final rename is atomic
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    files = []
    try:
        for k in range(stored.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            name = f"IM_{k + 1:04d}.dcm"
            ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            # value 3: CT "AXIAL" (C.8.2.1.1.1); MR "OTHER" (C.8.3.1.1.1: no MPR/map/subtraction, a generated image)
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
            ds.Modality = modality
            ds.Manufacturer = "wdm3d"
            ds.ManufacturerModelName = "wdm3d synthetic volume generator"
            ds.SoftwareVersions = f"wdm3d {__version__}"
            ds.InstitutionName = ""
            ds.StudyDescription = "synthetic volumes (wdm3d)"
            ds.SeriesDescription = description[:64]
            ds.ImageComments = comment
            ds.DerivationDescription = comment[:1024]
            ds.BurnedInAnnotation = "NO"
            ds.PatientName = "SYNTHETIC^WDM3D"
            ds.PatientID = patient_id
            ds.PatientBirthDate = ""
            ds.PatientSex = ""
            ds.ReferringPhysicianName = ""
            ds.AccessionNumber = ""
            ds.StudyID = "WDM3D"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = time_
            ds.TimezoneOffsetFromUTC = "+0000"  # the dates and times above are UTC
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.SeriesNumber = int(series_number)
            ds.PatientPosition = PATIENT_POSITION  # 2C, required for CT/MR without Patient Orientation Code Sequence
            # Laterality (0020,0060, 2C) is required only when the body part examined is a paired structure (and no
            # Image/Frame Laterality is sent); a whole head or chest is not, so it is left out (R or L would be false)
            ds.InstanceNumber = k + 1
            if modality == "MR":
                # Type 1: "RM" (research mode) since no SE/IR/GR/EP sequence was run; no variant
                ds.ScanningSequence = "RM"
                ds.SequenceVariant = "NONE"
                ds.ScanOptions = ""  # Type 2, no options (so no gating: Trigger Time is not required)
                ds.MRAcquisitionType = "3D"
                ds.RepetitionTime = ""  # Type 2C, required unless EP without SK: unknown, empty
                ds.EchoTime = ""
                ds.EchoTrainLength = ""
            else:
                ds.KVP = ""
                ds.AcquisitionNumber = ""
            position = aff2 @ np.array([0.0, 0.0, float(k), 1.0])
            ds.ImagePositionPatient = [_ds_number(float(v)) for v in position[:3]]
            ds.ImageOrientationPatient = orientation
            ds.SliceLocation = _ds_number(float(normal @ position[:3]))
            ds.PixelSpacing = [_ds_number(row_spacing), _ds_number(col_spacing)]
            ds.SliceThickness = _ds_number(slice_spacing)
            ds.SpacingBetweenSlices = _ds_number(slice_spacing)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            pixels = np.ascontiguousarray(stored[:, :, k].T)  # (rows, columns)
            ds.Rows, ds.Columns = pixels.shape
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            if modality == "CT":
                ds.RescaleSlope = _ds_number(slope)
                ds.RescaleIntercept = _ds_number(intercept)
                ds.RescaleType = rescale_type  # 1C: required when not HU, written always
            else:  # the MR Image IOD has no Modality LUT: the stored-to-float mapping as a Real World Value Mapping
                ds.RealWorldValueMappingSequence = [rwvm]
            ds.WindowCenter = _ds_number(center)
            ds.WindowWidth = _ds_number(width)
            block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
            block.add_new(0x01, "LO", "SYNTHETIC")
            block.add_new(0x02, "LO", f"wdm3d {__version__}")
            ds.PixelData = pixels.astype("<i2").tobytes()
            path = tmp / name
            pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files.append(name)
        trash = None
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} already exists; choose another folder or pass overwrite=True.")
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    slice_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return {
        "dir": out_dir,
        "files": [out_dir / f for f in files],
        "num_slices": len(files),
        "study_uid": study_uid,
        "series_uid": series_uid,
        "patient_id": patient_id,
        # as written: DS strings for CT's rescale, doubles (FD) for MR's Real World Value Mapping
        "rescale_slope": float(_ds_number(slope)) if modality == "CT" else float(slope),
        "rescale_intercept": float(_ds_number(intercept)) if modality == "CT" else float(intercept),
        "rescale_type": rescale_type,
        "slice_axis": slice_axis,
    }
