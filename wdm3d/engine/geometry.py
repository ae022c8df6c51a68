"""The geometry (voxel-to-world affine, shape) and intensity range of a training set, kept with its checkpoints."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..data import intensity_range as datalist_intensity_range
from ..data import load_datalist, volume_transforms

__all__ = ["DataGeometry", "reference_geometry"]


def reference_geometry(
    image: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    key: str = "image",
    image_size: Sequence[int] = (128, 128, 128),
    intensity_range: Sequence[float] = (0.0, 1.0),
) -> tuple[np.ndarray, list[int]]:
    """The affine and spatial shape a generated volume must be written with.

    The reference volume (``image``, else the first training entry of ``datalist``) goes through the same
    transform chain as the training data, so the returned affine accounts for the pad/crop to ``image_size``.

    Returns:
        ``(affine 4x4, [D, H, W])``.
    """
    if image is None:
        if datalist is None:
            raise ValueError("reference_geometry needs a reference image or a datalist.")
        image = load_datalist(datalist, "training", [key])[0][key]
    try:
        vol = volume_transforms("ref", image_size, intensity_range)({"ref": str(image)})["ref"]
    except Exception as err:
        raise RuntimeError(f"Could not read the reference volume {image}: {err}") from err
    return np.asarray(vol.affine, dtype=np.float64), [int(s) for s in vol.shape[1:]]


class DataGeometry:
    """Affine, shape and intensity range of the training data, as a checkpointable object.

    Saved with the network in every bundle checkpoint (``state_dict``/``load_state_dict``), so that a checkpoint
    alone is enough to write correctly placed volumes in the right intensity range.

    Args:
        datalist: the training datalist (its first training volume defines the geometry); None leaves it empty
            until a checkpoint is loaded.
        key: the datalist key of the images.
        image_size: ``(D, H, W)`` the network is trained on.
        intensity_range: range of the prepared data; None reads the datalist's ``intensity_range`` ([0, 1] if absent).
    """

    def __init__(
        self,
        datalist: str | os.PathLike | None = None,
        key: str = "image",
        image_size: Sequence[int] = (128, 128, 128),
        intensity_range: Sequence[float] | None = None,
    ) -> None:
        self.affine: np.ndarray | None = None
        self.shape: list[int] = [int(s) for s in image_size]
        self.intensity_range = list(intensity_range) if intensity_range is not None else [0.0, 1.0]
        if datalist is not None:
            if intensity_range is None:
                self.intensity_range = datalist_intensity_range(datalist)
            self.affine, self.shape = reference_geometry(None, datalist, key, image_size, self.intensity_range)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.affine is None:
            return {}
        return {
            "affine": torch.as_tensor(self.affine, dtype=torch.float64),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "intensity_range": torch.tensor(self.intensity_range, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.affine = state["affine"].cpu().numpy().astype(np.float64)
        self.shape = [int(s) for s in state["shape"].tolist()]
        self.intensity_range = [float(v) for v in state["intensity_range"].tolist()]
