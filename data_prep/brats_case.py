"""One BraTS case: the image and label-map chains, and the per-case job the batch runs in worker processes.

Preprocessing, one volume at a time (presets in :data:`data_prep.brats.PRESETS`):

1. images only: clip to the ``percentiles`` (0.1 / 99.9 for WDM) computed over the *whole* volume, background
   included, then min-max to [0, 1] (:func:`data_prep.volume.normalize_intensity`);
2. centre zero-pad, or centre-crop where the volume is larger, to ``spatial_size``
   (:func:`data_prep.volume.pad_or_crop`);
3. average-pool by the integer factor ``pool`` (:func:`data_prep.volume.pool_volume`); the label map is pooled by
   ``seg_pool`` (``"mode"``: the most frequent label of each block, ties to the larger label; ``"max"``;
   ``"nearest"``), so it never gets fractional labels.

The label map is never intensity-normalised and is padded with 0. Each step updates the affine so that it still
says where every voxel is in the world: padding by ``p`` voxels moves the first voxel by ``-p`` voxels along that
axis, cropping ``c`` voxels moves it by ``+c``, and pooling by ``f`` multiplies the voxel size by ``f`` and moves the
first voxel centre by ``(f - 1) / 2`` input voxels. Orientation is kept as in the source (no reorientation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from wdm3d.io.nifti import nifti_geometry

from .batch import RECORD_NAME, remove_partial, write_case_record
from .brats_discovery import SEG, BratsCase
from .common import write_failure, write_nifti
from .volume import SEG_POOL_MODES, check_array3d, normalize_intensity, pad_or_crop, pool_volume, voxel_spacing

__all__ = ["preprocess_image", "preprocess_label", "read_volume", "process_case"]


def preprocess_image(
    x: np.ndarray,
    affine: np.ndarray,
    percentiles: Sequence[float] = (0.1, 99.9),
    spatial_size: Sequence[int] | None = (256, 256, 256),
    pool: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The full image chain: :func:`normalize_intensity`, :func:`pad_or_crop` (with 0), :func:`pool_volume` (mean).

    Args:
        x: ``(X, Y, Z)`` image in scanner units.
        affine: its 4x4 voxel-to-world matrix.
        percentiles: clip percentiles, see :func:`normalize_intensity`.
        spatial_size: size after padding/cropping, before pooling; None keeps the input size.
        pool: average-pooling factor (256^3 with ``pool=2`` gives 128^3).

    Returns:
        ``(float32 array in [0, 1] of shape spatial_size / pool, affine)``.
    """
    check_array3d(x, "x")
    out = normalize_intensity(x, percentiles)
    if spatial_size is not None:
        out, affine = pad_or_crop(out, affine, spatial_size, value=0.0)
    return pool_volume(out, affine, pool, mode="mean")


def preprocess_label(
    seg: np.ndarray,
    affine: np.ndarray,
    spatial_size: Sequence[int] | None = (256, 256, 256),
    pool: int = 1,
    seg_pool: str = "mode",
    label_map: dict[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The label-map chain: check integer labels, optional relabelling, pad with 0 / crop, pool without averaging.

    Args:
        seg: ``(X, Y, Z)`` label map with integer values in 0..255 (stored as any dtype).
        affine: its 4x4 voxel-to-world matrix.
        spatial_size: as in :func:`preprocess_image`.
        pool: pooling factor.
        seg_pool: ``"mode"``, ``"max"`` or ``"nearest"`` (see :func:`pool_volume`).
        label_map: optional ``{old: new}`` relabelling (``{4: 3}`` turns BraTS 2021 ET into the 2023 label).

    Returns:
        ``(uint8 array of shape spatial_size / pool, affine)``.
    """
    check_array3d(seg, "seg")
    if seg_pool not in SEG_POOL_MODES:
        raise ValueError(f"seg_pool must be one of {SEG_POOL_MODES}, got {seg_pool!r}.")
    values = np.asarray(seg)
    if not np.all(np.isfinite(values)):
        raise ValueError("the label map has non-finite values (NaN/inf).")
    rounded = np.rint(values)
    if not np.array_equal(rounded, values) or rounded.min() < 0 or rounded.max() > 255:
        raise ValueError(
            f"the label map must hold integer labels in 0..255, got values in [{values.min()}, {values.max()}]"
            + ("" if np.array_equal(rounded, values) else " with fractional values")
            + "; is this file an image rather than a segmentation?"
        )
    out = rounded.astype(np.uint8)
    if label_map:
        lut = np.arange(256, dtype=np.uint8)
        for old, new in label_map.items():
            lut[int(old)] = int(new)
        out = lut[out]
    if spatial_size is not None:
        out, affine = pad_or_crop(out, affine, spatial_size, value=0)
    return pool_volume(out, affine, pool, mode=seg_pool, pad_value=0)


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]:
    """Read a NIfTI volume fully (so truncated files fail here): ``(data as stored, affine, (qform, sform) codes,
    qform matrix)``; the qform is kept apart because it may differ from the sform (``affine``).

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
    """
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    affine, codes, qform = nifti_geometry(img)
    return data, affine, codes, qform


def process_case(
    case: BratsCase, modalities: list[str], dst: str, settings: dict[str, Any], fingerprint: str = ""
) -> dict[str, Any]:
    """Prepare one case; never raises for a bad case: returns a record with status done / skipped / failed.

    A done case gets ``OUT/<case>/prepare_record.json`` (input ``fingerprint``, settings, outputs), written last. A
    failed write (full disk, permissions) names the output path and the errno (:func:`data_prep.common.write_failure`),
    not the source being read; the case's outputs written so far are removed.

    Args:
        case: the case as found by :func:`data_prep.brats_discovery.find_cases`.
        modalities: the modalities to prepare (normalised names).
        dst: the output folder.
        settings: the per-case settings (preset values, ``seg_pool``, ``harmonize_labels``).
        fingerprint: :func:`data_prep.batch.input_fingerprint` of the case's files, stored in its record.
    """
    record: dict[str, Any] = {"case": case.case_id, "patient": case.patient_id}
    dups = {m: p for m, p in case.duplicates.items() if m in modalities}
    if dups:
        listing = "; ".join(f"{m}: {', '.join(str(x) for x in paths)}" for m, paths in dups.items())
        return record | {"status": "skipped", "reason": f"more than one file for the same modality ({listing})"}
    if not case.files:
        return record | {"status": "failed", "file": str(case.case_id), "reason": "empty case folder: no BraTS files"}
    missing = [m for m in modalities if m not in case.files]
    if missing:
        folder = sorted({str(p.parent) for p in case.files.values()})[0]
        return record | {"status": "failed", "file": folder, "reason": f"missing modalities {missing}"}

    # read and check every file before anything is written, so a corrupt file leaves no half-written case
    volumes: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int], np.ndarray]] = {}
    for mod in modalities:
        path = case.files[mod]
        try:
            data, affine, codes, qform = read_volume(path)
            volumes[mod] = (data if mod == SEG else data.astype(np.float32, copy=False), affine, codes, qform)
        except Exception as err:  # noqa: BLE001 - any reader error is reported per file
            return record | {"status": "failed", "file": str(path), "reason": f"{type(err).__name__}: {err}"}
    ref_mod = modalities[0]
    ref_shape, ref_affine = volumes[ref_mod][0].shape, volumes[ref_mod][1]
    for mod in modalities[1:]:
        data, affine, _, _ = volumes[mod]
        if data.shape != ref_shape or not np.allclose(affine, ref_affine, atol=1e-3):
            return record | {
                "status": "failed",
                "file": str(case.files[mod]),
                "reason": (
                    f"not on the same voxel grid as {ref_mod}: shape {data.shape} vs {ref_shape}, affine "
                    f"{np.round(affine, 3).tolist()} vs {np.round(ref_affine, 3).tolist()}; the modalities of a case "
                    "must be co-registered"
                ),
            }

    out_dir = Path(dst) / case.case_id
    label_map = {4: 3} if (case.scheme == "2021" and settings["harmonize_labels"]) else None
    written: list[Path] = []
    outputs: dict[str, str] = {}
    current = ""
    writing: Path | None = None  # the output being written: an OSError while it is set is the destination's fault
    try:
        writing = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        writing = out_dir / RECORD_NAME
        writing.unlink(missing_ok=True)  # the case is incomplete until the record is written again
        writing = None
        for mod in modalities:
            current = str(case.files[mod])
            data, affine, codes, qform = volumes.pop(mod)
            if mod == SEG:
                out, out_affine = preprocess_label(
                    data, affine, settings["spatial_size"], settings["pool"], settings["seg_pool"], label_map
                )
            else:
                out, out_affine = preprocess_image(
                    data,
                    affine,
                    settings["percentiles"],
                    settings["spatial_size"],
                    settings["pool"],
                )
            del data
            path = out_dir / f"{case.case_id}-{mod}.nii.gz"
            # every step moves the affine by a right factor (affine @ M), so the qform moves by the same M
            qform_out = qform @ np.linalg.solve(affine, out_affine)
            writing = path
            write_nifti(out, out_affine, path, codes, qform_out)
            writing = None
            written.append(path)
            outputs[mod] = f"{case.case_id}/{path.name}"
        result = {"status": "done", "outputs": outputs, "shape": list(out.shape), "spacing": voxel_spacing(out_affine)}
        writing = out_dir / RECORD_NAME
        write_case_record(out_dir, record | result | {"fingerprint": fingerprint, "settings": settings})
    except Exception as err:  # noqa: BLE001 - report, remove this case's partial outputs, go on with the others
        remove_partial(out_dir, written)
        if writing is not None and isinstance(err, OSError):
            return write_failure(record, writing, err)
        return record | {"status": "failed", "file": current, "reason": f"{type(err).__name__}: {err}"}
    return record | result
