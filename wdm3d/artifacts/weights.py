"""Weights and networks: unwrap DDP / torch.compile, compare a state dict with a network, load the preferred
weights (EMA first) of a checkpoint, freeze a loaded network, and rebuild a network from what its checkpoint records.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .files import load_checkpoint, resolve_checkpoint
from .records import check_diffusion_matches
from .unwrap import unwrap

__all__ = [
    "TRUSTED_NETWORK_MODULES",
    "StateComparison",
    "build_network",
    "check_state_fits",
    "compare_state",
    "load_frozen",
    "load_network_weights",
    "shape_of",
    "state_mismatch",
    "weight_keys",
]

logger = logging.getLogger(__name__)

#: modules whose network classes :func:`build_network` may instantiate from a checkpoint's record
TRUSTED_NETWORK_MODULES = ("wdm3d.networks.", "monai.networks.")


def weight_keys(use_ema: bool = True) -> tuple[str, ...]:
    """The checkpoint entries to try, in order: EMA weights first when ``use_ema``, else the raw weights first."""
    return ("ema", "model", "network") if use_ema else ("model", "network", "ema")


def shape_of(value: Any) -> tuple | str:
    """A tensor's shape as a tuple, or the type name of anything else (for messages and comparisons)."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class StateComparison(NamedTuple):
    """How a state dict differs from a network's (or any reference mapping of tensors).

    Attributes:
        missing: keys of the reference that the state lacks, in the reference's order.
        unexpected: keys of the state that the reference lacks, in the state's order.
        wrong_shape: keys of both whose values differ in shape (or are not both tensors), in the reference's order.
        first: the first problem in the reference's order (a missing or wrong-shape key), else the first unexpected
            key; None when the two fit.
    """

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]
    first: str | None


def compare_state(own: Mapping[str, Any], state: Mapping[str, Any]) -> StateComparison:
    """Compare ``state`` with the reference ``own`` (e.g. ``network.state_dict()``) key by key and shape by shape.

    The one comparison behind every "does this file fit" message: :func:`check_state_fits`, :func:`state_mismatch`,
    the IP-Adapter's file check and the WDM-3D importer word their own errors from its result.
    """
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and shape_of(state[k]) != shape_of(own[k])]
    unexpected = [k for k in state if k not in own]
    bad = set(missing) | set(wrong)
    first = next((k for k in own if k in bad), unexpected[0] if unexpected else None)
    return StateComparison(missing, unexpected, wrong, first)


def check_state_fits(module: torch.nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise ``RuntimeError`` naming the first key that is missing, unexpected or of another shape.

    ``torch``'s own message lists every mismatch of a large network at once and starts with the missing keys;
    this one names the first mismatch in the network's order, with both shapes.
    """
    own = module.state_dict()
    found = compare_state(own, state)
    key = found.first
    if key is None:
        return
    if key in found.missing:
        raise RuntimeError(
            f"{source} does not fit this network: it has no weight {key!r} (network: {shape_of(own[key])})."
        )
    if key in found.wrong_shape:
        raise RuntimeError(
            f"{source} does not fit this network: {key!r} has shape {shape_of(state[key])} in the checkpoint but "
            f"{shape_of(own[key])} in the network."
        )
    raise RuntimeError(
        f"{source} does not fit this network: the checkpoint has weight {key!r} ({shape_of(state[key])}) "
        f"that the network lacks ({len(found.unexpected)} such key(s))."
    )


def load_network_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    keys: tuple[str, ...] = ("ema", "model", "network"),
    strict: bool = True,
    checkpoint: Mapping[str, Any] | None = None,
) -> str:
    """Load the first of ``keys`` found in the checkpoint into ``network``; return the key used.

    ``checkpoint``: the already-loaded contents of ``path`` (from :func:`load_checkpoint`), so that a caller that
    needs other entries too does not read a large file twice; ``path`` then only names it in messages.

    Bundles save the EMA weights under ``"ema"`` and the raw weights under ``"model"``; sampling prefers the EMA.
    A plain state dict (no such keys) is loaded as it is. With ``strict``, a checkpoint of another architecture is
    refused with the first mismatching key and both shapes, and the network settings it was trained with.
    """
    ckpt = dict(checkpoint) if checkpoint is not None else load_checkpoint(path)
    key = next((k for k in keys if k in ckpt), None)
    state = ckpt[key] if key is not None else ckpt
    target = unwrap(network)
    if strict:
        try:
            check_state_fits(target, state, f"Checkpoint {path} ({key or 'state dict'})")
        except RuntimeError as err:
            trained = ckpt.get("run_config", {}).get("network") if isinstance(ckpt.get("run_config"), Mapping) else None
            hint = f" It was trained with network settings {trained}." if trained else ""
            raise RuntimeError(
                f"{err}{hint} Check that network_def (preset, channels) matches the configuration the checkpoint was "
                "trained with."
            ) from None
    target.load_state_dict(state, strict=strict)
    if key is not None and key != keys[0]:
        logger.warning("Checkpoint %s has no %r weights; loaded %r instead.", path, keys[0], key)
    return key or "state_dict"


def state_mismatch(own: Mapping[str, Any], state: Mapping[str, Any], limit: int = 5) -> str | None:
    """None if ``state`` has exactly the keys and shapes of ``own``, else a summary of what differs:
    ``"missing [...], unexpected [...], wrong shapes [...]"`` (at most ``limit`` names of each, sorted).

    For files whose every mismatch matters at once (a pretrained feature network); :func:`check_state_fits` names the
    first mismatch of a checkpoint in the network's order instead.
    """

    def few(names: list[str]) -> str:
        names = sorted(names)
        return f"{names[:limit]}{'...' if len(names) > limit else ''}"

    found = compare_state(own, state)
    if found.first is None:
        return None
    return f"missing {few(found.missing)}, unexpected {few(found.unexpected)}, wrong shapes {few(found.wrong_shape)}"


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` in eval mode without gradients (a frozen base, encoder or teacher); returns it."""
    network.eval().requires_grad_(False)
    return network


def load_frozen(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    diffusion: Any = None,
    what: str = "",
    hint: str = "",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load trained weights into ``network`` (EMA first if ``use_ema``), freeze it and put it in eval mode.

    Args:
        network: built like it was trained.
        checkpoint: a checkpoint file, or a folder (its newest ``*.pt``).
        use_ema: prefer the ``"ema"`` weights over ``"model"``.
        device: move the network there.
        diffusion: the process that will use the network; refused when the checkpoint was trained with another
            (:func:`~wdm3d.artifacts.records.check_diffusion_matches`).
        what, hint: what the checkpoint is and what to do when it is missing, for messages.

    Returns:
        ``(network, info)`` with ``info = {"checkpoint", "weights", "sha256"}`` for manifests.

    Raises:
        FileNotFoundError: no such checkpoint. RuntimeError: it does not fit ``network``. ValueError: ``diffusion``
        differs from the trained one.
    """
    path = resolve_checkpoint(checkpoint, what, hint)
    ckpt = load_checkpoint(path)
    if diffusion is not None:
        check_diffusion_matches(ckpt, diffusion, path)
    used = load_network_weights(network, path, weight_keys(use_ema), checkpoint=ckpt)
    if device is not None:
        network.to(device)
    freeze(network)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return network, {"checkpoint": str(path.resolve()), "weights": used, "sha256": digest}


def build_network(checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the network a wdm3d checkpoint was trained with, from its ``run_config`` (class and settings).

    Only network classes under :data:`TRUSTED_NETWORK_MODULES` are built; the weights are not loaded (see
    :func:`load_frozen`). Lets a config use a trained autoencoder without restating its settings.

    Raises:
        ValueError: the checkpoint records no network, or one outside the trusted modules, or not a network class.
    """
    path = resolve_checkpoint(checkpoint, "autoencoder", "train the autoencoder first or set the path.")
    settings = dict((load_checkpoint(path).get("run_config") or {}).get("network") or {})
    cls_name = settings.pop("class", None)
    if not cls_name:
        raise ValueError(f"Checkpoint {path} records no network settings (run_config); pass the network explicitly.")
    if not cls_name.startswith(TRUSTED_NETWORK_MODULES):
        raise ValueError(
            f"Checkpoint {path} names network class {cls_name!r}, outside {TRUSTED_NETWORK_MODULES}; "
            "refusing to build it. Pass the network explicitly."
        )
    module_name, _, attr = cls_name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"Checkpoint {path} names network class {cls_name!r}, which does not exist here: {err}"
        ) from err
    # only network classes: a module path alone would also admit functions there (monai.networks.utils.save_state
    # writes files), which a crafted checkpoint could call with arguments of its choosing
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(
            f"Checkpoint {path} names {cls_name!r}, which is not a network class (torch.nn.Module); "
            "refusing to call it. Pass the network explicitly."
        )
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Cannot rebuild {cls_name} from the settings in {path} ({settings}): {err}") from err
