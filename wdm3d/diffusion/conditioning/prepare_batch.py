"""Paired / conditional batches -> wavelet diffusion training examples, with the condition dropout that
classifier-free guidance needs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from ...networks.attention import ContextEmbedding
from ...networks.ip_adapter import ConditionDropout
from ..training import DiffusionTarget
from ..wavelet_diffusion import WaveletDiffusion

__all__ = ["CONDITIONING_MODES", "ConditionalPrepareBatch"]

#: What :class:`ConditionalPrepareBatch` prepares: context only (the base), context + image prompt (IP-Adapter),
#: context + concatenated reference coefficients (cWDM baseline).
CONDITIONING_MODES = ("context", "ip_adapter", "concat")


def _as_labels(value: Any, name: str) -> list:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"batch field {name!r} must be a list of labels (one per sample), got {type(value).__name__}.")


class ConditionalPrepareBatch(PrepareBatch):
    """Paired / conditional batch -> a wavelet diffusion training example, with condition dropout for CFG.

    Returns ``(x0, target, (), kwargs)``: ``x0`` the wavelet coefficients of the target volumes
    ``(B, 8C, D/2, H/2, W/2)``, ``target`` the diffusion target, and ``kwargs`` for
    :class:`~wdm3d.diffusion.WaveletDiffusionInferer`:

    - ``noise``, ``timesteps``;
    - ``context``: condition indices ``(B, num_fields)`` in the vocabularies' field order; a sample whose context is
      dropped gets the null index in every field;
    - mode ``"ip_adapter"``: ``image``, the reference volumes ``(B, C, D, H, W)``, and ``drop_image`` ``(B,)`` bool
      (the inferer zeroes those samples' image tokens, which is exactly "no image prompt");
    - mode ``"concat"``: ``concat``, the reference's wavelet coefficients ``(B, 8C, D/2, H/2, W/2)``.

    Dropout (IP-Adapter: 5% image only, 5% context only, 5% both) draws per sample with
    :meth:`ConditionDropout.masks`; in mode ``"context"`` / ``"concat"`` only the context mask is used (the context
    is then dropped with probability ``context_rate + both_rate``). The masks of the last call are kept in
    ``last_drop_image`` / ``last_drop_context``.

    Args:
        diffusion: the :class:`WaveletDiffusion` (wavelet space, timesteps, target).
        vocabularies: field -> value names, the same as the network's (e.g. ``@vocabularies`` in a bundle).
        mode: one of :data:`CONDITIONING_MODES`.
        target_key: batch key of the volumes to generate.
        reference_key: batch key of the reference volumes (modes ``"ip_adapter"`` and ``"concat"``).
        condition_keys: field -> batch key of its labels (default: each field's own name, e.g. ``"modality"``);
            a field without a key gets the null index.
        dropout: a :class:`ConditionDropout`, or None (no dropout).
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        vocabularies: Mapping[str, Sequence[str]],
        mode: str = "context",
        target_key: str = "target",
        reference_key: str = "reference",
        condition_keys: Mapping[str, str] | None = None,
        dropout: ConditionDropout | None = None,
    ) -> None:
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"mode must be one of {CONDITIONING_MODES}, got {mode!r}.")
        if dropout is not None and not isinstance(dropout, ConditionDropout):
            raise TypeError(f"dropout must be a ConditionDropout or None, got {type(dropout).__name__}.")
        self._embedding = ContextEmbedding(vocabularies, 1)  # only for its label checks; no weights used
        self.vocabularies = self._embedding.vocabularies
        keys = dict(condition_keys) if condition_keys is not None else {f: f for f in self.vocabularies}
        unknown = [f for f in keys if f not in self.vocabularies]
        if unknown:
            raise ValueError(f"condition_keys names {unknown[0]!r}, not a field of {list(self.vocabularies)}.")
        self.diffusion, self.mode = diffusion, mode
        self.target_key, self.reference_key = target_key, reference_key
        self.condition_keys = keys
        self.dropout = dropout
        self.last_drop_image: torch.Tensor | None = None
        self.last_drop_context: torch.Tensor | None = None

    def _volumes(self, batch: Mapping, key: str, device, non_blocking: bool) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"batch has no key {key!r} (keys: {sorted(batch)}); check the datalist expansion / keys.")
        v = torch.as_tensor(batch[key]).to(device=device, non_blocking=non_blocking)
        if v.ndim != 5:
            raise ValueError(f"batch[{key!r}] must be volumes (B, C, D, H, W), got {tuple(v.shape)}.")
        return v if v.is_floating_point() else v.float()

    def context_indices(self, batch: Mapping, batch_size: int, device=None) -> torch.Tensor:
        """The batch's condition labels as indices ``(B, num_fields)``."""
        cols = []
        for field in self.vocabularies:
            key = self.condition_keys.get(field)
            labels = _as_labels(batch[key], key) if key is not None and key in batch else None
            if labels is not None and len(labels) != batch_size:
                raise ValueError(f"batch field {key!r} has {len(labels)} labels for {batch_size} volumes.")
            cols.append(self._embedding.indices(field, labels, batch_size).cpu())
        return torch.stack(cols, dim=1).to(device)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"ConditionalPrepareBatch needs dict batches, got {type(batchdata).__name__}.")
        images = self._volumes(batchdata, self.target_key, device, non_blocking)
        b = images.shape[0]
        x0 = self.diffusion.encode(images)
        noise = torch.randn_like(x0)
        timesteps = self.diffusion.sample_timesteps(b, device=x0.device)
        target = self.diffusion.target(x0, noise, timesteps)
        if self.diffusion.loss_weighting != "none":  # the per-sample weights travel with the target to the loss
            target = DiffusionTarget(target, self.diffusion.loss_weight(timesteps))

        context = self.context_indices(batchdata, b, x0.device)
        drop_image = torch.zeros(b, dtype=torch.bool, device=x0.device)
        drop_context = torch.zeros(b, dtype=torch.bool, device=x0.device)
        if self.dropout is not None:
            drop_image, drop_context = self.dropout.masks(b, device=x0.device)
            if self.mode != "ip_adapter":  # no image prompt: only the context can be dropped
                drop_image = torch.zeros_like(drop_image)
        nulls = torch.tensor([len(v) for v in self.vocabularies.values()], device=x0.device)
        context = torch.where(drop_context[:, None], nulls.expand_as(context), context)
        self.last_drop_image, self.last_drop_context = drop_image, drop_context

        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps, "context": context}
        if self.mode == "ip_adapter":
            infer_kwargs.update(
                image=self._volumes(batchdata, self.reference_key, device, non_blocking), drop_image=drop_image
            )
        elif self.mode == "concat":
            ref = self._volumes(batchdata, self.reference_key, device, non_blocking)
            if ref.shape[2:] != images.shape[2:]:
                raise ValueError(
                    f"reference {tuple(ref.shape)} and target {tuple(images.shape)} volumes must have the same size."
                )
            infer_kwargs["concat"] = self.diffusion.encode(ref)
        return x0, target, (), infer_kwargs
