"""The context-conditioned base: a cross-attention U-Net with learned tokens of named conditions (modality, dataset)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...artifacts import network_arguments
from ...networks.attention import ContextEmbedding, ImagePrompt
from ...networks.unet import AttentionAnchor, WDMUNet

__all__ = ["ContextConditionedUNet"]


class ContextConditionedUNet(nn.Module):
    """A cross-attention :class:`~wdm3d.networks.WDMUNet` with its context tokens: learned embeddings of named
    conditions (modality, dataset; :class:`~wdm3d.networks.ContextEmbedding`), trained together.

    ``(B, C, D, H, W), (B,) -> (B, C', D, H, W)``, called like the U-Net: ``model(x, timesteps, context=...)``, where
    ``context`` is

    - integer indices ``(B, num_fields)`` (or ``(num_fields,)``), one per field in the vocabularies' order, the null
      index ``len(vocabulary)`` for a dropped condition (what :class:`ConditionalPrepareBatch` produces);
    - float tokens ``(B or 1, N, context_dim)`` used as they are (e.g. from :meth:`tokens`, or the null tokens that
      :class:`~wdm3d.diffusion.ClassifierFreeGuidance` swaps in);
    - None: the null tokens (unconditional), so MONAI-style samplers that pass no context still work.

    EMA copies, checkpoints and the IP-Adapter see one module (``unet.*`` and ``embedding.*`` weights).

    Args:
        unet: the U-Net, built with a ``context_dim`` (its width is the embedding width).
        vocabularies: field -> value names, e.g. ``{"modality": ["t1n", "t1c", "t2w", "t2f"], "dataset": ["brats"]}``.

    Example:
        >>> unet = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16)
        >>> net = ContextConditionedUNet(unet, {"modality": ["t1n", "t2w"], "dataset": ["brats"]})
        >>> ctx = net.indices({"modality": ["t2w", "t1n"], "dataset": "brats"})
        >>> ctx
        tensor([[1, 0],
                [0, 0]])
        >>> net(torch.randn(2, 8, 8, 8, 8), torch.tensor([3, 700]), context=ctx).shape
        torch.Size([2, 8, 8, 8, 8])
    """

    # read from Python; a TorchScript export needs none of them
    __jit_unused_properties__ = (
        "context_dim",
        "in_channels",
        "out_channels",
        "channel_mult",
        "use_checkpoint",
        "fields",
    )

    def __init__(self, unet: nn.Module, vocabularies: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        context_dim = getattr(unet, "context_dim", None)
        if not isinstance(unet, nn.Module) or not isinstance(context_dim, int):
            raise ValueError(
                f"unet must be a WDMUNet built with a context_dim (cross-attention), got {type(unet).__name__} with "
                f"context_dim={context_dim!r}; set network_def#unet#context_dim."
            )
        self.unet = unet
        self.embedding = ContextEmbedding(vocabularies, context_dim)
        self.vocabularies = {k: list(v) for k, v in self.embedding.vocabularies.items()}

    # what the rest of wdm3d reads from a U-Net
    @property
    def context_dim(self) -> int:
        return self.unet.context_dim

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def channel_mult(self) -> tuple[int, ...]:
        return self.unet.channel_mult

    @property
    def use_checkpoint(self) -> bool:
        return bool(getattr(self.unet, "use_checkpoint", False))

    @property
    def fields(self) -> tuple[str, ...]:
        return self.embedding.fields

    def attention_anchors(self, levels: Sequence[int] | None = None, middle: bool = True) -> list[AttentionAnchor]:
        """The U-Net's anchors (:meth:`WDMUNet.attention_anchors`) with paths in this module (``unet.`` prefix)."""
        return [
            a._replace(path=f"unet.{a.path}", attention=None if a.attention is None else f"unet.{a.attention}")
            for a in self.unet.attention_anchors(levels, middle)
        ]

    def indices(self, conditions: Mapping[str, Any] | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Condition labels -> indices ``(B, num_fields)`` (missing fields and None labels: the null index).

        Args:
            conditions: field -> a name, an index, None, or one per sample (see
                :meth:`ContextEmbedding.indices`).
            batch_size: broadcast single labels to this many samples.
        """
        conditions = dict(conditions or {})
        unknown = [f for f in conditions if f not in self.embedding.vocabularies]
        if unknown:
            raise ValueError(f"unknown condition field {unknown[0]!r}; this model has fields {list(self.fields)}.")
        if batch_size is None:
            sizes = {len(v) for v in conditions.values() if isinstance(v, (list, tuple))} | {
                v.numel() for v in conditions.values() if isinstance(v, torch.Tensor) and v.ndim == 1
            }
            sizes.discard(1)
            if len(sizes) > 1:
                raise ValueError(f"condition fields have different batch sizes {sorted(sizes)}.")
            batch_size = sizes.pop() if sizes else 1
        cols = [self.embedding.indices(f, conditions.get(f), batch_size) for f in self.fields]
        return torch.stack(cols, dim=1)

    def tokens(
        self, conditions: Mapping[str, Any] | torch.Tensor | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        """Context tokens ``(B, num_fields, context_dim)`` from labels (a mapping) or indices ``(B, num_fields)``."""
        if conditions is None or isinstance(conditions, Mapping):
            idx = self.indices(conditions, batch_size)
        else:
            idx = conditions
        return self._embed(idx)

    def null_context(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional tokens ``(batch_size, num_fields, context_dim)``."""
        return self.embedding.null(batch_size)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim == 1:
            idx = idx[None]
        if idx.ndim != 2 or idx.shape[1] != len(self.fields):
            raise ValueError(
                f"context indices must be (B, {len(self.fields)}) (one per field {list(self.fields)}), "
                f"got {tuple(idx.shape)}."
            )
        tables = self.embedding.embeddings
        sizes = [tables[field].num_embeddings for field in self.fields]  # the last row of each is the null embedding
        if idx.device.type == "cpu":
            # CPU values cost nothing to read: check them now and name the field and the values
            for j, (field, n) in enumerate(zip(self.fields, sizes)):
                col = idx[:, j]
                if col.numel() and (col.min() < 0 or col.max() >= n):
                    raise ValueError(f"{field} indices must be in [0, {n}) ({n - 1} = null), got {col.tolist()}.")
        else:
            # reading device values back would stall the stream on every forward: assert on the device instead
            # (comparisons with Python ints, so no host-to-device copy either)
            ok = (idx >= 0).all()
            for j, n in enumerate(sizes):
                ok = ok & (idx[:, j] < n).all()
            torch._assert_async(
                ok, f"context indices must be in [0, n) per field, n = {dict(zip(self.fields, sizes))} (n - 1 = null)"
            )
        idx = idx.to(next(iter(tables.values())).weight.device)
        return self.embedding.embed_indices(idx)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, D, H, W)``.
            timesteps: ``(B,)`` or a scalar.
            context: indices ``(B, num_fields)``, tokens ``(B or 1, N, context_dim)`` or None (null tokens).
            image_prompt: passed to the U-Net (read by an installed :class:`~wdm3d.networks.IPAdapter`).
        """
        # (TorchScript, e.g. MONAI's ckpt_export, compiles the scripting branches: see wdm3d.networks.scripting)
        if context is None:
            tokens = self.embedding.null_tokens(x.shape[0])
        elif not torch.jit.is_scripting() and not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a tensor of indices or tokens, or None; got {type(context).__name__}.")
        elif context.is_floating_point():
            tokens = context
        elif torch.jit.is_scripting():  # unchecked indices (_embed's checks format Python objects)
            tokens = self.embedding.embed_indices(context[None] if context.ndim == 1 else context)
        else:
            tokens = self._embed(context)
        if torch.jit.is_scripting():
            return self.unet(x, timesteps, context=tokens.to(x.device))
        return self.unet(x, timesteps, context=tokens.to(x.device), image_prompt=image_prompt)

    def config(self) -> dict[str, Any]:
        """The settings that rebuild this module: ``{"vocabularies": ..., "unet": <WDMUNet arguments>}``."""
        return {"vocabularies": self.vocabularies, "unet": network_arguments(self.unet)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ContextConditionedUNet:
        """Rebuild from :meth:`config` (weights not loaded)."""
        unet_args = {k: v for k, v in dict(config["unet"]).items() if k != "class"}
        return cls(WDMUNet(**unet_args), config["vocabularies"])
