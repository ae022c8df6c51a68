"""The IP-Adapter's weights apart from its base: the state by section, its checks against an adapter, the
provenance (fingerprints of the frozen encoder and base) and the file that holds them.

File layout: ``{"image_proj": {...}, "ip_adapter": {...}, "meta": {...}}``; ``image_proj`` holds the projection's
weights (and ``null_tokens``, the learned null prompt, when the adapter has one), ``ip_adapter`` keys are module paths
in the base, so the weights load onto any base of the same architecture.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...artifacts import compare_state, load_checkpoint, save_checkpoint_file, shape_of
from .sites import _path

if TYPE_CHECKING:  # annotations only: the adapter module imports this one
    from .adapter import IPAdapter

__all__ = [
    "adapter_provenance",
    "adapter_weights",
    "check_adapter_weights",
    "load_adapter_file",
    "save_adapter_file",
    "weights_fingerprint",
]


def weights_fingerprint(module: nn.Module | None) -> str | None:
    """SHA-256 of a module's state (names, dtypes, shapes and values, in name order); None for no module or no state.

    Identifies the exact frozen encoder / base an adapter was trained with, whatever file they came from.

    Args:
        module: the module to fingerprint, or None.
    """
    if not isinstance(module, nn.Module):
        return None
    state = module.state_dict()
    if not state:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():  # raw bytes, whatever the dtype (bf16 and bool included; 0-d buffers such as BatchNorm's too)
            digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_weights(adapter: IPAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's live parameters by section, keyed as in its file (see :meth:`IPAdapter.adapter_state_dict`).

    Args:
        adapter: the installed adapter.
    """
    ip: dict[str, torch.Tensor] = {}
    for key, proc in adapter.ip_layers.items():
        ip.update({f"{_path(key)}.{k}": v for k, v in proc.state_dict().items()})
    for key, block in adapter.added_blocks.items():
        ip.update({f"{_path(key)}.ip_block.{k}": v for k, v in block.state_dict().items()})
    prompt_side = dict(adapter.image_proj.state_dict())
    if adapter.null_tokens is not None:  # the learned null prompt lives in token space, beside the projection
        prompt_side["null_tokens"] = adapter.null_tokens
    return {"image_proj": prompt_side, "ip_adapter": ip}


def check_adapter_weights(
    adapter: IPAdapter, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "the file"
) -> None:
    """Raise ``ValueError`` naming the first key of ``state`` that is missing, unexpected or of another shape.

    The messages name the section and whether the base or the adapter's own configuration differs, which a plain
    state-dict comparison (:func:`wdm3d.artifacts.check_state_fits`) cannot tell.

    Args:
        adapter: the adapter the weights are for.
        state: ``{"image_proj": ..., "ip_adapter": ...}`` (and optionally ``"meta"``).
        source: what ``state`` came from, for messages.
    """
    if not isinstance(state, Mapping) or set(state) - {"meta"} != {"image_proj", "ip_adapter"}:
        found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{source} is not IP-Adapter weights: expected keys 'image_proj' and 'ip_adapter', got {found}."
        )
    for section, own in adapter_weights(adapter).items():
        theirs = state[section]
        if not isinstance(theirs, Mapping):
            raise ValueError(f"{source}: {section!r} must be a dict of tensors, got {type(theirs).__name__}.")
        where = "this base" if section == "ip_adapter" else "this adapter"
        found = compare_state(own, theirs)
        key = found.first
        if key is None:
            continue
        if key in found.missing:
            raise ValueError(
                f"{section}: {key!r} (shape {shape_of(own[key])}) of {where} is missing in {source}; it was "
                "saved from an adapter of another configuration (sites, projection) or for another base."
            )
        if key in found.wrong_shape:
            if not isinstance(theirs[key], torch.Tensor):
                raise ValueError(f"{section}: {key!r} in {source} is a {type(theirs[key]).__name__}, not a tensor.")
            raise ValueError(
                f"{section}: {key!r} has shape {shape_of(theirs[key])} in {source} but {shape_of(own[key])} in "
                f"{where}; load it onto a base of the architecture it was trained with."
            )
        raise ValueError(
            f"{section}: {source} has {key!r} (shape {shape_of(theirs[key])}) that {where} lacks "
            f"({len(found.unexpected)} such key(s)); it was saved from an adapter of another configuration."
        )


def adapter_provenance(adapter: IPAdapter) -> dict[str, Any]:
    """What the adapter's weights only make sense with (see :meth:`IPAdapter.provenance`).

    Args:
        adapter: the installed adapter.
    """
    encoder = getattr(adapter.image_encoder, "encoder", None) if adapter.image_encoder is not None else None
    return {
        "image_encoder": weights_fingerprint(encoder),
        "image_encoder_class": type(encoder).__name__ if encoder is not None else None,
        "base": weights_fingerprint(adapter.base),
        "feature_dim": int(adapter.feature_dim),
        "token_dim": int(adapter.token_dim),
    }


def save_adapter_file(adapter: IPAdapter, path: str | os.PathLike) -> Path:
    """Write the adapter's weights (CPU tensors) and provenance (``"meta"``) to ``path`` atomically.

    Args:
        adapter: the adapter to save.
        path: the file (its folder is created).
    """
    state: dict[str, Any] = {sec: {k: v.cpu() for k, v in d.items()} for sec, d in adapter.adapter_state_dict().items()}
    state["meta"] = adapter_provenance(adapter)
    return save_checkpoint_file(state, path)


def load_adapter_file(adapter: IPAdapter, path: str | os.PathLike, check_encoder: bool = True) -> None:
    """Load weights written by :func:`save_adapter_file` onto ``adapter`` (see :meth:`IPAdapter.load_adapter`).

    Args:
        adapter: the adapter to fill.
        path: the file.
        check_encoder: refuse a file trained with an image encoder of other weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter weights {path} do not exist.")
    # an adapter file sits among others of its kind, not in a training folder: no earlier checkpoint to suggest
    state = load_checkpoint(path, suggest_previous=False)
    check_adapter_weights(adapter, state, source=str(path))
    meta = state.get("meta")
    if isinstance(meta, Mapping):
        own = adapter_provenance(adapter)
        if check_encoder and meta.get("image_encoder") and meta.get("image_encoder") != own["image_encoder"]:
            raise ValueError(
                f"{path} was trained with another image encoder ({meta.get('image_encoder_class')} with weights "
                f"{str(meta['image_encoder'])[:12]}..., this adapter's is {own['image_encoder_class']} with "
                f"{str(own['image_encoder'])[:12]}...); use the encoder it was trained with (--image_encoder_*) "
                "or pass check_encoder=False."
            )
        if meta.get("base") and meta.get("base") != own["base"]:
            warnings.warn(
                f"{path} was trained on a base with other weights ({str(meta['base'])[:12]}..., this "
                f"base: {str(own['base'])[:12]}...); fine for a fine-tuned version of that base, "
                "wrong for an unrelated one.",
                stacklevel=3,
            )
    adapter.load_adapter_state_dict(state, source=str(path))
