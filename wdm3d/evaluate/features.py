"""The FID feature extractor: MedicalNet ResNet-50 (comparable with papers) or the weight-free random 3D conv net."""

from __future__ import annotations

import os
import warnings

import torch

from ..networks.medicalnet import (
    MedicalNetResNet50,
    RandomConv3dFeatures,
    medicalnet_resnet50,
    medicalnet_weights_help,
)

__all__ = ["FEATURE_EXTRACTORS", "NOT_COMPARABLE", "build_feature_extractor", "extractor_name"]

FEATURE_EXTRACTORS = ("auto", "medicalnet", "random_conv3d")
#: the note that results from the random features carry
NOT_COMPARABLE = "random_conv3d features: NOT comparable with published 3D FIDs (only with other runs of this project)"


def build_feature_extractor(features: str = "auto", weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The FID feature extractor: MedicalNet ResNet-50 (with ``weights``) or the weight-free random 3D conv net.

    Args:
        features: ``"medicalnet"`` (needs ``weights``), ``"random_conv3d"``, or ``"auto"``: MedicalNet when
            ``weights`` is given, else the random net (with a warning naming the weights file to get).
        weights: path to MedicalNet's ``resnet_50_23dataset.pth``.
    """
    if features not in FEATURE_EXTRACTORS:
        raise ValueError(f"features must be one of {FEATURE_EXTRACTORS}, got {features!r}.")
    if features == "medicalnet" or (features == "auto" and weights):
        return medicalnet_resnet50(weights)
    if features == "auto":
        warnings.warn(
            "No MedicalNet weights: FID uses random_conv3d features, not comparable with papers. "
            + medicalnet_weights_help(),
            UserWarning,
            stacklevel=2,
        )
    return RandomConv3dFeatures(seed=0).eval()


def extractor_name(extractor: torch.nn.Module) -> str:
    """The name results record for ``extractor``: ``"medicalnet"``, ``"random_conv3d"`` or its class name.

    Args:
        extractor: a feature network.
    """
    if isinstance(extractor, MedicalNetResNet50):
        return "medicalnet"
    if isinstance(extractor, RandomConv3dFeatures):
        return "random_conv3d"
    return type(extractor).__name__.lower()
