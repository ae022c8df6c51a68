"""The MedicalNet ResNet-50 as the 3D-FID literature uses it (WDM, HA-GAN, Pinaya et al.), and a weight-free stand-in.

MedicalNet (Chen et al. 2019, "Med3D: Transfer Learning for 3D Medical Image Analysis") trained 3D ResNets on 23
segmentation datasets. The 3D FID protocol runs its ResNet-50 (``resnet_50_23dataset.pth``) up to ``layer4`` and
global-average-pools the result into a 2048-d feature per volume. The network is written here because MONAI's
``get_pretrained_resnet_medicalnet`` / ``ResNet`` builds layer3 and layer4 without MedicalNet's dilations (stride 1,
dilation 2 and 4): the weights load but the features differ, so the numbers would not be comparable with papers.

Layout (``(B, 1, D, H, W)`` in):

=========  ==============================================  =========================
stage      operation                                       output
=========  ==============================================  =========================
conv1      7^3 conv, stride 2, 64 channels, BN, ReLU       ``(B, 64, D/2, H/2, W/2)``
maxpool    3^3, stride 2                                   ``(B, 64, D/4, ...)``
layer1     3 bottlenecks, 64 -> 256                        ``(B, 256, D/4, ...)``
layer2     4 bottlenecks, 128 -> 512, stride 2             ``(B, 512, D/8, ...)``
layer3     6 bottlenecks, 256 -> 1024, stride 1, dil. 2    ``(B, 1024, D/8, ...)``
layer4     3 bottlenecks, 512 -> 2048, stride 1, dil. 4    ``(B, 2048, D/8, ...)``
features   global average pool of layer4                   ``(B, 2048)``
=========  ==============================================  =========================

Shortcut type B: a 1^3 convolution + BN where the shape changes, identity elsewhere. The state-dict keys are
MedicalNet's own (``conv1.weight``, ``layer3.0.downsample.0.weight``, ...), so its checkpoint loads as it is once the
``module.`` prefix of its DataParallel training is removed; its segmentation head (``conv_seg.*``) is not built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..artifacts import CheckpointLoadError, load_checkpoint, state_mismatch

__all__ = [
    "MEDICALNET_WEIGHTS_FILE",
    "MedicalNetResNet50",
    "RandomConv3dFeatures",
    "load_medicalnet_weights",
    "medicalnet_resnet50",
    "medicalnet_weights_help",
]

MEDICALNET_WEIGHTS_FILE = "resnet_50_23dataset.pth"


def medicalnet_weights_help(where: str = "--weights PATH (CLI) or weights=PATH (Python / bundle)") -> str:
    """What to obtain for comparable 3D FIDs, and where to pass it."""
    return (
        f"3D FID comparable with papers needs MedicalNet's ResNet-50 weights, the file {MEDICALNET_WEIGHTS_FILE} "
        "(about 185 MB, MIT licence), found as pretrain/resnet_50_23dataset.pth in the pretrained-models archive "
        "linked from MedicalNet's README (github.com/Tencent/MedicalNet). wdm3d never downloads it: save it locally "
        f"and pass it with {where}."
    )


class _Bottleneck(nn.Module):
    """1^3 -> 3^3 (stride, dilation) -> 1^3 convolutions with BN, plus the shortcut; ``planes * 4`` channels out."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(
            planes, planes, kernel_size=3, stride=stride, dilation=dilation, padding=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride, self.dilation = stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class MedicalNetResNet50(nn.Module):
    """MedicalNet's ResNet-50 trunk (no segmentation head); ``forward`` returns the 2048-d pooled features.

    Args:
        in_channels: input channels (MedicalNet: 1).
        layers: bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``).

    Example:
        >>> net = MedicalNetResNet50().eval()
        >>> net(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 2048])
    """

    # (planes, stride, dilation) per stage: layer3/layer4 keep the resolution and dilate instead
    STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))

    def __init__(self, in_channels: int = 1, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, e.g. (3, 4, 6, 3); got {layers!r}.")
        self.in_channels = in_channels
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, ((planes, stride, dilation), blocks) in enumerate(zip(self.STAGES, layers), start=1):
            downsample = None
            if stride != 1 or inplanes != planes * 4:  # shortcut type B
                downsample = nn.Sequential(
                    nn.Conv3d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * 4),
                )
            stage = [_Bottleneck(inplanes, planes, stride, dilation, downsample)]
            inplanes = planes * 4
            stage += [_Bottleneck(inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.feature_dim = 2048

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage's output, ``{"conv1", "maxpool", "layer1", ..., "layer4"}`` (for checks and other poolings)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MedicalNet expects (B, {self.in_channels}, D, H, W) volumes, got shape {tuple(x.shape)}."
            )
        out = {"conv1": self.relu(self.bn1(self.conv1(x)))}
        out["maxpool"] = self.maxpool(out["conv1"])
        h = out["maxpool"]
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
            out[f"layer{i}"] = h
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W) -> (B, 2048)``: global average pool of layer4."""
        return self.feature_maps(x)["layer4"].mean(dim=(2, 3, 4))


def _medicalnet_state_dict(obj) -> dict[str, torch.Tensor]:
    """A MedicalNet checkpoint -> trunk state dict: ``state_dict`` unwrapped, ``module.`` dropped, ``conv_seg`` left out."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict of tensors (nor a dict with one under 'state_dict')")
    out = {}
    for key, value in obj.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if not key.startswith("conv_seg."):
            out[key] = value
    return out


def load_medicalnet_weights(model: MedicalNetResNet50, path: str | os.PathLike) -> MedicalNetResNet50:
    """Load MedicalNet's ``resnet_50_23dataset.pth`` (or a file with the same keys) into ``model``, strictly.

    The file is read with ``torch.load(weights_only=True)``: a file that holds pickled code is refused. Keys may carry
    the ``module.`` prefix and a ``conv_seg`` head (both as in MedicalNet's release); every trunk weight must be there.

    Raises:
        FileNotFoundError: no such file (the message says which file to obtain).
        ValueError: the file is not a plain tensor checkpoint, or its keys/shapes do not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedicalNet weights file {path} does not exist. " + medicalnet_weights_help())
    try:
        # a pretrained file, not a training folder's: no earlier checkpoint to suggest
        obj = load_checkpoint(path, suggest_previous=False)
    except CheckpointLoadError as err:  # pickled code, or not a torch file at all
        cause = err.__cause__ or err  # torch's own error says what it refused
        raise ValueError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint that torch.load(weights_only=True) accepts "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). Use MedicalNet's released "
            f"{MEDICALNET_WEIGHTS_FILE} or a state dict saved with torch.save(model.state_dict(), ...)."
        ) from err
    try:
        state = _medicalnet_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{path} is {err}; expected MedicalNet's {MEDICALNET_WEIGHTS_FILE}.") from err
    own = model.state_dict()
    for (
        key
    ) in own:  # checkpoints from PyTorch < 0.4.1 (MedicalNet's era) have no BN step counters; eval mode ignores them
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    mismatch = state_mismatch(own, state)
    if mismatch:
        raise ValueError(
            f"{path} does not fit MedicalNet's ResNet-50 (is it {MEDICALNET_WEIGHTS_FILE}, not a ResNet-10/18/34?): "
            f"{mismatch}."
        )
    model.load_state_dict(state, strict=True)
    return model


def medicalnet_resnet50(weights: str | os.PathLike | None) -> MedicalNetResNet50:
    """The MedicalNet ResNet-50 with its released weights, in eval mode (the 3D-FID feature extractor).

    Args:
        weights: path to ``resnet_50_23dataset.pth``. None raises a FileNotFoundError that says which file to get.
    """
    if weights is None:
        raise FileNotFoundError("No MedicalNet weights given. " + medicalnet_weights_help())
    return load_medicalnet_weights(MedicalNetResNet50(), weights).eval()


class RandomConv3dFeatures(nn.Module):
    """A fixed, seeded random 3D conv net: features for quick checks when no MedicalNet weights are at hand.

    NOT comparable with published FIDs (nor with FIDs from MedicalNet features): use it to compare runs of this
    project with each other. Four stride-2 3^3 convolutions (16, 32, 64, 128 channels, ReLU), initialised from
    ``seed`` (Kaiming normal); each stage contributes its global mean and standard deviation per channel.
    ``(B, 1, D, H, W) -> (B, 480)``.

    Args:
        seed: fixes the weights (same seed, same features on any machine with the same torch).
        in_channels: input channels.
    """

    CHANNELS = (16, 32, 64, 128)

    def __init__(self, seed: int = 0, in_channels: int = 1) -> None:
        super().__init__()
        self.in_channels, self.seed = in_channels, seed
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], in_channels
        for c_out in self.CHANNELS:
            conv = nn.Conv3d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (c_in * 27)) ** 0.5)
                conv.bias.zero_()
            convs.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.feature_dim = 2 * sum(self.CHANNELS)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expects (B, {self.in_channels}, D, H, W) volumes, got shape {tuple(x.shape)}.")
        feats = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            flat = x.flatten(2)
            feats += [flat.mean(-1), flat.std(-1, unbiased=False)]
        return torch.cat(feats, dim=1)
