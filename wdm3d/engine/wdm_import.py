"""Import WDM-3D's released U-Net weights (github.com/pfriedri/wdm-3d) into a checkpoint our bundles sample from.

WDM's network (``guided_diffusion/unet.py``, ``UNetModel`` with ``resblock_updown=True``, ``additive_skips=True``,
no attention, ``use_scale_shift_norm=False``) and :func:`~wdm3d.networks.wdm_unet`'s presets compute the same
function with the same parameters; only the state-dict key names differ. WDM saves ``model.state_dict()`` bare
(``brats_NNNNNN.pt`` / ``lidc-idri_NNNNNN.pt``, no optimizer, no EMA, no settings).

How the keys correspond (module by module, not a table of every weight):

=======================================  ==========================================================
ours                                     WDM
=======================================  ==========================================================
``time_embed.{0,2}``                     ``time_embed.{0,2}`` (Linear, SiLU, Linear in both)
``conv_in``                              ``input_blocks.0.0`` (their first input block is the conv)
``down.{i}`` (residual block)            ``input_blocks.{i+1}.0`` (one residual block per input block)
``middle.{i}``                           ``middle_block.{i}``
``up.{i}.{j}``                           ``output_blocks.{i}.{j}`` (block, then the upsampling block)
``norm_out`` / ``conv_out``              ``out.0`` / ``out.2`` (GroupNorm, SiLU, conv)
=======================================  ==========================================================

and inside each residual block: ``norm1`` = ``in_layers.0``, ``conv1`` = ``in_layers.2``, ``emb_proj`` =
``emb_layers.1``, ``norm2`` = ``out_layers.0``, ``conv2`` = ``out_layers.3``, ``skip`` = ``skip_connection`` (the
positions are those of their ``nn.Sequential`` members: norm, SiLU, conv / SiLU, linear / norm, SiLU, dropout, conv).
Both networks create these modules in the same order, so the expected WDM key set of a preset is read off our own
network (:func:`wdm_key` of each of its keys) and every tensor's shape is checked against it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..artifacts import (
    FORMAT_VERSION,
    CheckpointLoadError,
    compare_state,
    load_checkpoint,
    network_arguments,
    save_checkpoint_file,
    shape_of,
    unwrap_state_dict,
)
from ..diffusion import WaveletDiffusion
from ..networks import PRESETS, wdm_unet

__all__ = [
    "WDM_IMAGE_SIZE",
    "WDMImportError",
    "import_wdm",
    "our_key",
    "ours_to_wdm",
    "read_wdm_state_dict",
    "wdm_diffusion_config",
    "wdm_key",
    "wdm_to_ours",
]

#: the image size each preset was trained on by WDM (the U-Net runs on the half-size wavelet grid)
WDM_IMAGE_SIZE = {"wdm_128": 128, "wdm_256": 256}

# top-level modules: ours -> WDM
_TOP = {
    "time_embed.0": "time_embed.0",
    "time_embed.2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "norm_out": "out.0",
    "conv_out": "out.2",
}
# inside a residual block: ours -> WDM (positions in their in_layers / emb_layers / out_layers Sequentials)
_RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "skip": "skip_connection",
}
_PARAM = r"(weight|bias)"
_LEAF_OURS = "|".join(map(re.escape, _RESBLOCK))
_LEAF_WDM = "|".join(map(re.escape, _RESBLOCK.values()))
_OURS_RES = re.compile(rf"(down\.(\d+)|middle\.(\d+)|up\.(\d+)\.(\d+))\.({_LEAF_OURS})\.{_PARAM}")
_WDM_RES = re.compile(
    rf"(input_blocks\.(\d+)\.0|middle_block\.(\d+)|output_blocks\.(\d+)\.(\d+))\.({_LEAF_WDM})\.{_PARAM}"
)
_TOP_INV = {v: k for k, v in _TOP.items()}
_RESBLOCK_INV = {v: k for k, v in _RESBLOCK.items()}
# leading names only our layout has (a file with these is already converted)
_OURS_ONLY = ("conv_in.", "down.", "middle.", "up.", "norm_out.", "conv_out.")


class WDMImportError(ValueError):
    """A file that is not a WDM-3D U-Net state dict of the requested preset (or is already in wdm3d's format)."""


def wdm_key(key: str) -> str:
    """Our :class:`~wdm3d.networks.WDMUNet` state-dict key -> WDM-3D's ``UNetModel`` key.

    Example:
        >>> wdm_key("down.0.conv1.weight")
        'input_blocks.1.0.in_layers.2.weight'
        >>> wdm_key("up.2.1.skip.bias")
        'output_blocks.2.1.skip_connection.bias'

    Raises:
        KeyError: ``key`` has no WDM counterpart (e.g. a cross-attention weight: WDM's released U-Nets have none).
    """
    module, _, param = key.rpartition(".")
    if module in _TOP and param in ("weight", "bias"):
        return f"{_TOP[module]}.{param}"
    m = _OURS_RES.fullmatch(key)
    if m is None:
        raise KeyError(f"{key!r} has no counterpart in WDM-3D's U-Net (it has no attention or other extra modules).")
    _, down, middle, up, step, leaf, param = m.groups()
    if down is not None:
        block = f"input_blocks.{int(down) + 1}.0"
    elif middle is not None:
        block = f"middle_block.{middle}"
    else:
        block = f"output_blocks.{up}.{step}"
    return f"{block}.{_RESBLOCK[leaf]}.{param}"


def our_key(key: str) -> str:
    """WDM-3D's ``UNetModel`` state-dict key -> ours (the inverse of :func:`wdm_key`).

    Example:
        >>> our_key("input_blocks.0.0.weight")
        'conv_in.weight'
        >>> our_key("output_blocks.5.0.emb_layers.1.weight")
        'up.5.0.emb_proj.weight'

    Raises:
        KeyError: ``key`` is not a key of a WDM U-Net without attention.
    """
    module, _, param = key.rpartition(".")
    if module in _TOP_INV and param in ("weight", "bias"):
        return f"{_TOP_INV[module]}.{param}"
    m = _WDM_RES.fullmatch(key)
    if m is None or (m.group(2) is not None and int(m.group(2)) == 0):  # input_blocks.0 is the conv, not a block
        raise KeyError(f"{key!r} is not a key of WDM-3D's U-Net (without attention).")
    _, inp, middle, out, pos, leaf, param = m.groups()
    if inp is not None:
        block = f"down.{int(inp) - 1}"
    elif middle is not None:
        block = f"middle.{middle}"
    else:
        block = f"up.{out}.{pos}"
    return f"{block}.{_RESBLOCK_INV[leaf]}.{param}"


def wdm_to_ours(
    state: Mapping[str, Any], network: torch.nn.Module, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename a WDM-3D U-Net state dict to ``network``'s keys, checking that it is exactly that network.

    Args:
        state: WDM's state dict (``input_blocks.N...`` keys, tensors).
        network: the target :class:`~wdm3d.networks.WDMUNet` (may live on the ``meta`` device: only its keys and
            shapes are read).
        source: what ``state`` is (a file name), for the messages.

    Returns:
        the same tensors (not copied) under our keys, in ``network``'s order; ``network.load_state_dict(result,
        strict=True)`` then succeeds.

    Raises:
        WDMImportError: naming the first WDM key the network expects but ``state`` lacks, the first key of
            ``state`` the network does not have, or the first tensor of another shape.
    """
    own = network.state_dict()
    try:
        expected = {wdm_key(k): k for k in own}
    except KeyError as err:
        raise WDMImportError(f"this network cannot hold WDM-3D weights: {err.args[0]}") from None
    found = compare_state({w: own[k] for w, k in expected.items()}, state)
    missing, unexpected = found.missing, found.unexpected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"it has no {missing[0]!r} ({len(missing)} expected key(s) missing)")
        if unexpected:
            parts.append(
                f"it has {unexpected[0]!r}, which this preset's WDM U-Net does not "
                f"({len(unexpected)} unexpected key(s))"
            )
        raise WDMImportError(
            f"{source} is not a WDM-3D U-Net of this preset: {'; '.join(parts)}. Check --preset (wdm_128 for "
            "128^3 models, wdm_256 for 256^3) and that the file is a WDM U-Net (not the WavU-Net, 'ours_wnet_*')."
        )
    for w in expected:
        if not isinstance(state[w], torch.Tensor) or not state[w].is_floating_point():
            raise WDMImportError(f"{source}: {w!r} is not a floating-point tensor (got {type(state[w]).__name__}).")
    if found.wrong_shape:
        w = found.wrong_shape[0]
        raise WDMImportError(
            f"{source} is not a WDM-3D U-Net of this preset: {w!r} has shape {shape_of(state[w])}, the preset's "
            f"{expected[w]!r} has {shape_of(own[expected[w]])}. Check --preset (wdm_128 / wdm_256)."
        )
    return {k: state[w] for w, k in expected.items()}


def ours_to_wdm(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename our U-Net state dict to WDM-3D's keys (the inverse of :func:`wdm_to_ours`; values are not copied).

    Raises:
        KeyError: a key with no WDM counterpart (see :func:`wdm_key`).
    """
    return {wdm_key(k): v for k, v in state.items()}


def read_wdm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load WDM-3D's checkpoint file (``torch.load(weights_only=True)`` on the CPU) and return its state dict.

    WDM saves a bare ``state_dict()``; a dict wrapping one under ``"state_dict"``, ``"model_state_dict"`` or
    ``"model"`` is unwrapped too, and a ``"module."`` (DDP) or ``"_orig_mod."`` (torch.compile) prefix is stripped.

    Raises:
        FileNotFoundError: no such file.
        WDMImportError: the file is not a readable checkpoint, holds no dict of tensors, or is already a wdm3d
            checkpoint (converting twice is refused); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WDM checkpoint {path} does not exist.")
    try:
        obj = load_checkpoint(path, suggest_previous=False)
    except CheckpointLoadError as err:
        raise WDMImportError(f"{path} is not a readable PyTorch checkpoint, so not a WDM-3D one: {err}") from err
    except ValueError as err:  # readable but not a dict
        raise WDMImportError(f"{path} is not a WDM-3D checkpoint (a state dict of tensors): {err}") from err
    if "conversion" in obj or "run_config" in obj:
        raise WDMImportError(
            f"{path} is already a wdm3d checkpoint (it has a 'conversion' or 'run_config' entry); "
            "converting twice is refused: pass it to the bundle's inference as it is."
        )
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = dict(obj[wrapper])
            break
    state = unwrap_state_dict(obj)
    if not state:
        raise WDMImportError(f"{path} holds an empty dict, not a WDM-3D state dict.")
    ours = [k for k in state if isinstance(k, str) and k.startswith(_OURS_ONLY)]
    if ours:
        raise WDMImportError(
            f"{path} is already in wdm3d's key layout (e.g. {ours[0]!r}); converting twice is "
            "refused: pass it to the bundle's inference as it is."
        )
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WDMImportError(
            f"{path} is not a WDM-3D state dict: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor."
        )
    return state


def wdm_diffusion_config() -> dict[str, Any]:
    """The diffusion settings WDM-3D trained its released models with, as :class:`~wdm3d.diffusion.WaveletDiffusion`
    records them (DDPM, 1000 steps, linear betas 1e-4..0.02, x0 prediction, LLL / 3, clip to [-1, 1], one Haar
    level, fixed-large variance). Stored in the converted checkpoint so that sampling it with another process fails."""
    return WaveletDiffusion(
        process="ddpm",
        num_train_timesteps=1000,
        schedule="linear_beta",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="sample",
        lll_scale=3.0,
        clip_range=(-1.0, 1.0),
        levels=1,
        ddpm_variance="fixed_large",
    ).config()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_wdm(
    checkpoint: str | os.PathLike,
    preset: str,
    out_dir: str | os.PathLike,
    name: str | None = None,
    spacing: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a WDM-3D U-Net checkpoint into a wdm3d checkpoint in ``out_dir`` (written atomically).

    The output holds ``"model"`` (the weights under our keys; WDM kept no EMA), ``"run_config"`` (our network's
    settings and WDM's diffusion settings, so that the bundle's inference refuses a mismatching process),
    ``"geometry"`` (a ``spacing``-mm diagonal affine at the preset's image size, intensity range [0, 1], WDM's output
    range) and ``"conversion"`` (source file name and path, its sha256, preset, date, wdm3d version).

    Args:
        checkpoint: WDM's file (e.g. ``brats_1200000.pt``).
        preset: ``"wdm_128"`` or ``"wdm_256"``.
        out_dir: output folder (created); point the bundle's ``checkpoint`` (or ``ckpt_dir``) at the file or folder.
        name: output file name; default ``<source stem>_wdm3d.pt``.
        spacing: voxel size in mm recorded in the geometry; default 256 / image size (2 mm at 128^3, 1 mm at
            256^3: WDM's 1 mm data, average-pooled by 2 for 128^3). WDM's own outputs carried an identity affine.
        overwrite: replace an existing output file.

    Returns:
        the written file.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        FileExistsError: the output exists and ``overwrite`` is False.
        WDMImportError: (a ``ValueError``) the file is not a WDM-3D U-Net of ``preset`` (the message names the
            first mismatching key and the file), or is already converted.
    """
    if preset not in WDM_IMAGE_SIZE or preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(WDM_IMAGE_SIZE)}.")
    if spacing is not None and not (isinstance(spacing, (int, float)) and spacing > 0):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}.")
    src = Path(checkpoint)
    out_path = Path(out_dir) / (name or f"{src.stem}_wdm3d.pt")
    if out_path.suffix != ".pt":
        raise ValueError(f"the output name must end in .pt (the bundles look for *.pt), got {out_path.name!r}.")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it.")
    if src.is_file() and out_path.exists() and src.resolve() == out_path.resolve():
        raise ValueError(f"the output {out_path} is the input file; choose another --out or --name.")
    state = read_wdm_state_dict(src)
    # in/out channels from the file (8 per modality; more in for concatenation conditioning); widths from the preset
    first, last = "input_blocks.0.0.weight", "out.2.weight"
    for key in (first, last):
        if key not in state or state[key].ndim != 5:
            raise WDMImportError(
                f"{src} is not a WDM-3D U-Net: it has no 3D convolution {key!r}"
                + (f" (got shape {shape_of(state[key])})." if key in state else ".")
            )
    in_channels, out_channels = int(state[first].shape[1]), int(state[last].shape[0])
    with torch.device("meta"):
        network = wdm_unet(preset, in_channels=in_channels, out_channels=out_channels)
    weights = wdm_to_ours(state, network, source=str(src))

    size = WDM_IMAGE_SIZE[preset]
    mm = float(spacing) if spacing is not None else 256.0 / size
    ckpt = {
        "model": weights,
        "run_config": {
            "wdm3d_format": FORMAT_VERSION,
            "network": network_arguments(network),
            "diffusion": wdm_diffusion_config(),
            "settings": {
                "image_size": [size] * 3,
                "unet_preset": preset,
                "num_channels": out_channels // 8,
                "source": "WDM-3D (github.com/pfriedri/wdm-3d)",
            },
        },
        "geometry": {
            "affine": torch.diag(torch.tensor([mm, mm, mm, 1.0], dtype=torch.float64)),
            "shape": torch.tensor([size] * 3, dtype=torch.int64),
            "intensity_range": torch.tensor([0.0, 1.0], dtype=torch.float64),
        },
        "conversion": {
            "source_file": src.name,
            "source_path": str(src.resolve()),
            "source_sha256": _sha256(src),
            "source_format": "WDM-3D guided_diffusion.unet.UNetModel state_dict",
            "preset": preset,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "num_tensors": len(weights),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wdm3d_version": __version__,
        },
    }
    return save_checkpoint_file(ckpt, out_path)
