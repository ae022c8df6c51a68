"""The MONAI transform chains the bundles load volumes with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai import transforms as mt

from .safety import BadInputError, CheckVolumed, GuardedTransform, _first_bad_input

__all__ = ["LoadVolumed", "volume_transforms", "latent_transforms"]


class LoadVolumed:
    """MONAI's ``LoadImaged`` (channel first), with an error that names the key and the file that failed to read.

    MONAI's own message for a truncated or corrupt file is the reader's (e.g. a zlib or EOF error) and does not
    always say which file it was.
    """

    def __init__(self, keys: str | Sequence[str]) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys)
        self.load = mt.LoadImaged(keys=self.keys, image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping) -> Mapping:
        try:
            out = self.load(data)
        except Exception as err:
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            files = {k: data.get(k) for k in self.keys}
            raise BadInputError(
                f"Could not read {files}: {type(cause).__name__}: {cause}. The file is missing, truncated or not a "
                "NIfTI volume; re-run data_prep or remove it from the datalist."
            ) from err
        for k in self.keys:  # several files stacked as channels: keep every name for the checks' messages
            if isinstance(data.get(k), (list, tuple)) and hasattr(out[k], "meta"):
                out[k].meta["wdm3d_sources"] = ", ".join(str(p) for p in data[k])
        return out


class _CheckedChain(mt.Compose):
    # MONAI wraps every transform error in "RuntimeError: applying transform <object at 0x...>"; the check's own
    # ValueError (which names the file and the problem) is what a user must read, so it is raised as it is
    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause = _first_bad_input(err)
            if isinstance(cause, BadInputError):
                raise cause from None
            raise


def volume_transforms(
    keys: str | Sequence[str],
    image_size: Sequence[int],
    intensity_range: Sequence[float] = (0.0, 1.0),
    target_range: Sequence[float] = (-1.0, 1.0),
    num_channels: int | None = None,
    range_tolerance: float = 0.5,
    skip_bad: bool = False,
) -> mt.Compose | GuardedTransform:
    """Load NIfTI volumes, check them, map ``intensity_range`` linearly onto ``target_range`` (clipped), pad/crop.

    The voxel axes are kept as stored (no reorientation), so the MetaTensor's affine after this chain is the
    geometry a generated volume of ``image_size`` must be written with. Each volume is checked
    (:class:`~wdm3d.data.CheckVolumed`): 3D, ``num_channels`` channels, finite, within ``intensity_range`` (up to
    ``range_tolerance`` x its width; small overshoots are clipped).

    Args:
        keys: the datalist keys to load (e.g. ``"t1n"``).
        image_size: ``(D, H, W)`` the network is trained on; volumes are centre-padded/cropped to it.
        intensity_range: the range the prepared data spans (data_prep writes [0, 1]).
        target_range: the range diffusion works in (WDM: [-1, 1]).
        num_channels: channels (modalities) expected per key; None accepts any number.
        range_tolerance: see :class:`~wdm3d.data.CheckVolumed`.
        skip_bad: return a :class:`~wdm3d.data.BadSample` instead of raising (for
            :class:`~wdm3d.data.SkipBadSamples`, which skips and counts it).

    Returns:
        A ``Compose`` producing ``(C, D, H, W)`` float32 MetaTensors under each key (wrapped in a
        :class:`~wdm3d.data.GuardedTransform` if ``skip_bad``).
    """
    if len(image_size) != 3 or any(int(s) < 2 or int(s) % 2 for s in image_size):
        raise ValueError(f"image_size must be three even sizes (D, H, W), got {list(image_size)}.")
    (a, b), (lo, hi) = intensity_range, target_range
    chain = _CheckedChain(
        [
            LoadVolumed(keys),
            mt.EnsureTyped(keys=keys, dtype="float32"),
            CheckVolumed(
                keys, num_channels=num_channels, intensity_range=intensity_range, range_tolerance=range_tolerance
            ),
            mt.ScaleIntensityRanged(keys=keys, a_min=a, a_max=b, b_min=lo, b_max=hi, clip=True),
            mt.ResizeWithPadOrCropd(
                keys=keys, spatial_size=[int(s) for s in image_size], mode="constant", constant_values=lo
            ),
        ]
    )
    return GuardedTransform(chain) if skip_bad else chain


class _ShiftScale:
    # a picklable ``(z - shift) * scale`` for data-loader workers started with spawn
    def __init__(self, shift, scale) -> None:
        self.shift, self.scale = shift, scale

    def __call__(self, z):
        return (z - self.shift.to(z.device)) * self.scale.to(z.device)


def latent_transforms(
    keys: str | Sequence[str],
    latent_shift: Sequence[float],
    latent_scale: Sequence[float],
    skip_bad: bool = False,
) -> mt.Compose | GuardedTransform:
    """Load latents written by :func:`wdm3d.autoencoder.encode_dataset` and normalise them per channel.

    ``z -> (z - latent_shift) * latent_scale`` (the training latents' mean and 1 / std), so the diffusion sees
    roughly unit-variance channels; :class:`wdm3d.autoencoder.LatentDecoder` undoes it after sampling.

    Args:
        keys: the latent datalist key (``"latent"``).
        latent_shift, latent_scale: per-channel values from the latent datalist.
        skip_bad: as in :func:`volume_transforms`.

    Returns:
        A ``Compose`` producing ``(Z, d, h, w)`` float32 MetaTensors.
    """
    if len(latent_shift) != len(latent_scale) or not latent_shift:
        raise ValueError(
            f"latent_shift and latent_scale need one value per channel, got {latent_shift} and {latent_scale}."
        )
    keys = [keys] if isinstance(keys, str) else list(keys)
    shift = torch.tensor([float(v) for v in latent_shift]).view(-1, 1, 1, 1)
    scale = torch.tensor([float(v) for v in latent_scale]).view(-1, 1, 1, 1)
    chain = _CheckedChain(
        [
            LoadVolumed(keys),
            mt.EnsureTyped(keys=keys, dtype="float32"),
            CheckVolumed(keys, num_channels=len(latent_shift)),
            mt.Lambdad(keys=keys, func=_ShiftScale(shift, scale)),
        ]
    )
    return GuardedTransform(chain) if skip_bad else chain
