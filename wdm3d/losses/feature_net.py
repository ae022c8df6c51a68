"""The 2D feature network of the perceptual loss (VGG-style, torchvision's parameter names) and the loading of its
pretrained weights from a local file (never downloaded)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..artifacts import CheckpointLoadError, load_checkpoint, state_mismatch

__all__ = ["VGG16_LAYOUT", "SliceFeatureNet2D", "load_slice_feature_weights"]

#: VGG16's convolutional trunk: conv widths, "M" for a 2x2 max-pool (torchvision's ``vgg16().features`` without its
#: final pool, so its parameter names ``features.0.weight`` ... ``features.28.bias`` are the same).
VGG16_LAYOUT: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)


class SliceFeatureNet2D(nn.Module):
    """A VGG-style 2D feature network: 3x3 conv + ReLU stacks separated by 2x2 max-pools.

    Features are tapped at the last ReLU before every pool and at the end (for :data:`VGG16_LAYOUT`: relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3, LPIPS's taps). Parameters live in ``features`` (an ``nn.Sequential``) so the
    state-dict keys are torchvision's VGG keys.

    Args:
        layout: conv widths (positive ints) and ``"M"`` (max-pool); must start and end with a conv.
        in_channels: input channels of the first conv (3 for ImageNet weights; grey slices are repeated).

    Example:
        >>> net = SliceFeatureNet2D(layout=(8, "M", 16))
        >>> [f.shape[1:] for f in net(torch.zeros(1, 3, 8, 8))]
        [torch.Size([8, 8, 8]), torch.Size([16, 4, 4])]
    """

    def __init__(self, layout: Sequence[int | str] = VGG16_LAYOUT, in_channels: int = 3) -> None:
        super().__init__()
        layout = tuple(layout)
        if not layout or any(not (item == "M" or (isinstance(item, int) and item > 0)) for item in layout):
            raise ValueError(f"layout must be positive conv widths and 'M' (max-pool), got {layout!r}.")
        if layout[0] == "M" or layout[-1] == "M" or any(a == b == "M" for a, b in zip(layout, layout[1:])):
            raise ValueError(f"layout must start and end with a conv width and not repeat 'M', got {layout!r}.")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}.")
        layers: list[nn.Module] = []
        taps: list[int] = []
        ch = in_channels
        for item in layout:
            if item == "M":
                taps.append(len(layers) - 1)
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, item, 3, padding=1), nn.ReLU()]
                ch = item
        taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)
        self.in_channels = in_channels
        self.num_pools = layout.count("M")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, in_channels, H, W)`` -> one feature map per tap, ``(N, C_k, H / 2^k, W / 2^k)``."""
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


def load_slice_feature_weights(net: SliceFeatureNet2D, path: str | os.PathLike) -> SliceFeatureNet2D:
    """Load a local weights file into ``net`` strictly (never downloads).

    Accepted contents (read with ``torch.load(weights_only=True)``): a state dict with keys ``features.N.weight`` /
    ``features.N.bias`` (e.g. a whole torchvision VGG16 state dict: other keys such as ``classifier.*`` are ignored)
    or one with bare keys ``N.weight`` (a saved ``vgg16().features``).

    Args:
        net: the network to fill.
        path: the weights file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: not a plain tensor checkpoint, or keys/shapes do not fit ``net``'s layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"perceptual-loss weights file {path} does not exist. wdm3d never downloads weights: save the 2D network's "
            "state dict there (e.g. torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), path) "
            "on a machine with torchvision), or turn the perceptual term off."
        )
    try:
        # a pretrained file, not a training folder's: no earlier checkpoint to suggest
        obj = load_checkpoint(path, suggest_previous=False)
    except CheckpointLoadError as err:  # pickled code, or not a torch file at all
        raise ValueError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint that torch.load(weights_only=True) accepts "
            f"({type(err.__cause__ or err).__name__}). Save a state dict with torch.save(model.state_dict(), path)."
        ) from err
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} must hold a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
    if any(k.startswith("features.") for k in obj):
        state = {k: v for k, v in obj.items() if k.startswith("features.")}
    else:
        state = {f"features.{k}": v for k, v in obj.items()}
    own = net.state_dict()
    mismatch = state_mismatch(own, state)
    if mismatch:
        raise ValueError(
            f"{path} does not fit the 2D feature network (layout with {len(own) // 2} convs): {mismatch}. "
            "Check that `layout` matches the file (VGG16_LAYOUT for torchvision's VGG16)."
        )
    net.load_state_dict(state, strict=True)
    return net
