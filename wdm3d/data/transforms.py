"""The MONAI transform chains the bundles load volumes with."""

from __future__ import annotations

from collections.abc import Sequence

from monai import transforms as mt

__all__ = ["volume_transforms"]


def volume_transforms(
    keys: str | Sequence[str],
    image_size: Sequence[int],
    intensity_range: Sequence[float] = (0.0, 1.0),
    target_range: Sequence[float] = (-1.0, 1.0),
) -> mt.Compose:
    """Load NIfTI volumes, map ``intensity_range`` linearly onto ``target_range`` (clipped) and pad/crop to size.

    The voxel axes are kept as stored (no reorientation), so the MetaTensor's affine after this chain is the
    geometry a generated volume of ``image_size`` must be written with.

    Args:
        keys: the datalist keys to load (e.g. ``"t1n"``).
        image_size: ``(D, H, W)`` the network is trained on; volumes are centre-padded/cropped to it.
        intensity_range: the range the prepared data spans (data_prep writes [0, 1]).
        target_range: the range diffusion works in (WDM: [-1, 1]).

    Returns:
        A ``Compose`` producing ``(C, D, H, W)`` float32 MetaTensors under each key.
    """
    if len(image_size) != 3 or any(int(s) < 2 or int(s) % 2 for s in image_size):
        raise ValueError(f"image_size must be three even sizes (D, H, W), got {list(image_size)}.")
    (a, b), (lo, hi) = intensity_range, target_range
    return mt.Compose(
        [
            mt.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
            mt.EnsureTyped(keys=keys, dtype="float32"),
            mt.ScaleIntensityRanged(keys=keys, a_min=a, a_max=b, b_min=lo, b_max=hi, clip=True),
            mt.ResizeWithPadOrCropd(keys=keys, spatial_size=[int(s) for s in image_size], mode="constant",
                                    constant_values=lo),
        ]
    )
