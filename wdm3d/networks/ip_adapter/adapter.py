"""The IP-Adapter module: installs image-prompt conditioning onto a trained, frozen base network and runs it
(see :mod:`wdm3d.networks.ip_adapter` for the method)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import Attention, CrossAttentionBlock, ImagePrompt
from .encoder import FrozenImageEncoder
from .files import (
    adapter_provenance,
    adapter_weights,
    check_adapter_weights,
    load_adapter_file,
    save_adapter_file,
)
from .processors import AddedBlockProcessor, IPAttnProcessor
from .sites import _key, anchor_owner, resolve_added_sites
from .tokens import PROJECTIONS, GlobalGridProjection, GlobalSpatialProjection, ImageProjection, PerceiverResampler

__all__ = ["IPAdapter", "NULL_TOKENS"]

#: what stands for "no image prompt" (a dropped prompt in training, the unconditional branch of guidance)
NULL_TOKENS = ("zeros", "learned")


class IPAdapter(nn.Module):
    """Image-prompt adapter installed onto a trained base U-Net without editing its code.

    Called like the base plus an image prompt:
    ``adapter(x, timesteps, context=None, image=None, image_tokens=None, scale=None) -> base output``. The image
    tokens and lambda travel with that call (:class:`~wdm3d.networks.attention.ImagePrompt`, passed through the
    base's ``forward`` to the processors installed on it): each sample of a batch has its own prompt and lambda, and
    nothing is kept between calls.

    Args:
        base: the trained network, e.g. a :class:`~wdm3d.networks.WDMUNet` (with or without a ``context_dim``);
            it is frozen (``requires_grad=False``). Its :class:`~wdm3d.networks.attention.Attention` modules get
            decoupled cross-attention processors.
        image_encoder: frozen encoder of the reference volume (an ``nn.Module`` or callable, or a wdm3d VAE whose
            posterior mode is used), see :class:`FrozenImageEncoder`; None: ``image`` is passed already encoded
            (cached features).
        feature_dim: the encoder's feature width (read from the encoder if None; required without an encoder).
        projection: ``"linear"`` (:class:`ImageProjection`, global tokens of the pooled features),
            ``"perceiver"`` (:class:`PerceiverResampler`, spatial tokens of the feature grid), ``"global+spatial"``
            (:class:`GlobalSpatialProjection`, both), ``"global+grid"`` (:class:`GlobalGridProjection`: pooled
            tokens and one token per feature-grid cell with its place in the volume; needs ``feature_grid``) or a
            module mapping features to ``(B, N, token_dim)`` tokens.
        num_tokens: image tokens (default 4 for linear, 16 for perceiver, 4 + 16 for global+spatial).
        token_dim: image token width; defaults to (and, where the base has cross-attention, must be) the base's
            ``context_dim``; 256 for a base without context.
        perceiver_depth: Perceiver layers (4).
        added_levels: levels (of a ``WDMUNet``) whose residual blocks get an added image cross-attention block;
            default: none if the base has cross-attention, else the base's default attention levels.
        added_middle: add a block in the middle (default: as for ``added_levels``).
        added_sites: instead of levels, anchor paths (``base.attention_anchors()``) after which a block is added.
        num_heads: heads of added blocks (default: the base's ``num_heads``).
        head_dim: width per head of added blocks (default: the base's ``head_dim`` or 32).
        norm_num_groups: GroupNorm groups of added blocks (default: the base's ``norm_num_groups`` or 32).
        scale: default lambda (1.0 image-only; ~0.5 alongside other conditions).
        feature_grid: ``(d, h, w)`` of the encoder's feature map, for ``"global+grid"``.
        place_attention: the added blocks bias their attention toward tokens at the voxel's own place
            (``CrossAttentionBlock(place_attention=True)``; the projection must give ``token_places()``; default: True
            with ``"global+grid"``, else False). The base's own cross-attention sites read the same tokens without
            a place bias (their processors see flattened voxels).
        null_tokens: what a dropped image prompt becomes (training with condition dropout, and the unconditional
            branch of classifier-free guidance on the image, :meth:`null_image_tokens`): ``"learned"`` (default) a
            trained null prompt of ``num_tokens`` tokens, zero-initialised, so that it starts as the base; ``"zeros"``
            all-zero tokens, which stay exactly the base.

    Example:
        >>> from wdm3d.networks import WDMUNet
        >>> base = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16)
        >>> encoder = torch.nn.Conv3d(1, 8, 4, stride=4)
        >>> adapter = IPAdapter(base, encoder, feature_dim=8)
        >>> x, t, ctx = torch.randn(1, 8, 8, 8, 8), torch.tensor([10]), torch.randn(1, 2, 16)
        >>> ref = torch.randn(1, 1, 16, 16, 16)  # the reference volume
        >>> torch.equal(adapter(x, t, context=ctx, image=ref, scale=0.0), base(x, t, context=ctx))
        True

    Notes:
        The base must pass ``image_prompt`` down to its attention modules and anchors (``WDMUNet`` and
        :class:`~wdm3d.diffusion.conditioning.ContextConditionedUNet` do). Called without a prompt (or with lambda
        0) the installed base is exactly the base; gradient checkpointing recomputes blocks with the prompt of the
        call being differentiated, since the prompt is an argument of the checkpointed blocks.
    """

    def __init__(
        self,
        base: nn.Module,
        image_encoder: nn.Module | Callable[[torch.Tensor], Any] | None,
        feature_dim: int | None = None,
        projection: str | nn.Module = "linear",
        num_tokens: int | None = None,
        token_dim: int | None = None,
        perceiver_depth: int = 4,
        added_levels: Sequence[int] | None = None,
        added_middle: bool | None = None,
        added_sites: Sequence[str] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        norm_num_groups: int | None = None,
        scale: float = 1.0,
        null_tokens: str = "learned",
        feature_grid: Sequence[int] | None = None,
        place_attention: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module (the trained U-Net), got {type(base).__name__}.")
        self.base = base
        base.requires_grad_(False)
        if null_tokens not in NULL_TOKENS:
            raise ValueError(f"null_tokens must be one of {NULL_TOKENS}, got {null_tokens!r}.")
        self._added: list[tuple[nn.Module, str]] = []  # (owning WDMUNet, anchor path) of installed added blocks
        self._replaced: list[tuple[Attention, Callable]] = []

        # image encoder
        if image_encoder is None:
            if feature_dim is None:
                raise ValueError("without an image_encoder, pass feature_dim (the width of the cached features).")
            self.image_encoder = None
            self.feature_dim = int(feature_dim)
        else:
            self.image_encoder = FrozenImageEncoder(image_encoder, feature_dim)
            self.feature_dim = self.image_encoder.feature_dim

        # cross-attention sites of the base
        sites = [(name, m) for name, m in base.named_modules() if isinstance(m, Attention)]
        for name, attn in sites:
            if isinstance(attn.processor, IPAttnProcessor):
                raise ValueError(f"{name!r} already has an IP-Adapter installed; call .remove() on that adapter first.")
        context_widths = {attn.context_dim for _, attn in sites}
        if token_dim is None:
            token_dim = context_widths.pop() if len(context_widths) == 1 else getattr(base, "context_dim", None) or 256
        if not isinstance(token_dim, int) or token_dim < 1:
            raise ValueError(f"token_dim must be a positive integer, got {token_dim!r}.")
        self.token_dim = token_dim

        # the added blocks' sites (resolved before anything is installed, so that errors leave the base untouched)
        added = resolve_added_sites(base, bool(sites), added_levels, added_middle, added_sites)
        heads = num_heads if num_heads is not None else getattr(base, "num_heads", None)
        hdim = head_dim if head_dim is not None else getattr(base, "head_dim", None) or 32
        groups = norm_num_groups if norm_num_groups is not None else getattr(base, "norm_num_groups", None) or 32
        if place_attention is None:
            place_attention = projection == "global+grid"
        blocks = {
            path: CrossAttentionBlock(
                ch, token_dim, heads, hdim, groups, out_bias=False, place_attention=bool(place_attention)
            )
            for path, ch in added.items()
        }
        processors = {name: IPAttnProcessor(attn, token_dim) for name, attn in sites}

        # projection
        if isinstance(projection, nn.Module):
            self.image_proj = projection
            self.num_tokens = getattr(projection, "num_tokens", num_tokens)
        elif projection == "linear":
            self.image_proj = ImageProjection(self.feature_dim, token_dim, 4 if num_tokens is None else num_tokens)
            self.num_tokens = self.image_proj.num_tokens
        elif projection == "perceiver":
            self.image_proj = PerceiverResampler(
                self.feature_dim, token_dim, 16 if num_tokens is None else num_tokens, depth=perceiver_depth
            )
            self.num_tokens = self.image_proj.num_tokens
        elif projection == "global+spatial":
            spatial = 16 if num_tokens is None else num_tokens - 4
            if spatial < 1:
                raise ValueError(
                    f"global+spatial makes 4 global tokens and num_tokens - 4 spatial ones; got {num_tokens}."
                )
            self.image_proj = GlobalSpatialProjection(self.feature_dim, token_dim, 4, spatial, depth=perceiver_depth)
            self.num_tokens = self.image_proj.num_tokens
        elif projection == "global+grid":
            if feature_grid is None:
                raise ValueError("projection 'global+grid' needs feature_grid, the (d, h, w) of the encoder's output.")
            self.image_proj = GlobalGridProjection(self.feature_dim, token_dim, tuple(feature_grid))
            self.num_tokens = self.image_proj.num_tokens
        else:
            raise ValueError(f"projection must be one of {PROJECTIONS} or an nn.Module, got {projection!r}.")

        if place_attention and blocks and not callable(getattr(self.image_proj, "token_places", None)):
            raise ValueError(
                "place_attention needs tokens that know their place (a projection with token_places(), e.g. "
                "'global+grid')."
            )
        self.null_mode = null_tokens
        if null_tokens == "learned":
            if not isinstance(self.num_tokens, int):
                raise ValueError("null_tokens='learned' needs the projection's num_tokens (pass num_tokens=).")
            self.null_tokens = nn.Parameter(torch.zeros(1, self.num_tokens, token_dim))
        else:
            self.null_tokens = None

        # install
        owners = {path: anchor_owner(base, path) for path in blocks}
        self.ip_layers = nn.ModuleDict()
        for name, attn in sites:
            proc = processors[name]
            self.ip_layers[_key(name)] = proc
            self._replaced.append((attn, attn.processor))
            attn.set_processor(proc)
        self.added_blocks = nn.ModuleDict()
        for path, block in blocks.items():
            self.added_blocks[_key(path)] = block
            unet, rel = owners[path]
            unet.set_anchor_processor(rel, AddedBlockProcessor(block))
            self._added.append((unet, rel))
        self.scale = float(scale)

    # -- parameters ------------------------------------------------------------------------------------------------

    def adapter_modules(self) -> dict[str, nn.Module]:
        """The trainable modules: ``{"image_proj": ..., "ip_layers": ..., "added_blocks": ...}``."""
        return {"image_proj": self.image_proj, "ip_layers": self.ip_layers, "added_blocks": self.added_blocks}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's, the new K'/V' projections', the added blocks' and the learned null prompt's parameters
        (the optimizer's list)."""
        params = [p for m in self.adapter_modules().values() for p in m.parameters()]
        return params + ([self.null_tokens] if self.null_tokens is not None else [])

    def null_image_tokens(self, batch_size: int = 1) -> torch.Tensor:
        """The "no image prompt" tokens ``(batch_size, num_tokens, token_dim)``: the learned null prompt, or zeros
        (see ``null_tokens``). What condition dropout puts in place of a dropped prompt and what the unconditional
        branch of guidance on the image uses."""
        if self.null_tokens is not None:
            return self.null_tokens.expand(batch_size, -1, -1)
        device = next(self.image_proj.parameters()).device
        return torch.zeros(batch_size, self.num_tokens, self.token_dim, device=device)

    def __prepare_scriptable__(self) -> IPAdapter:
        # torch.jit.script calls this first: say why it cannot work, before TorchScript fails somewhere inside
        raise RuntimeError(
            "an IPAdapter cannot be compiled with TorchScript (torch.jit.script, MONAI's ckpt_export): it reaches the "
            "base through Python attention and anchor processors. Export the base "
            "network on its own (the bundle's network_def; call remove() first if the adapter is installed on it)."
        )

    def train(self, mode: bool = True) -> IPAdapter:
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.train(False)
        return self

    # -- forward ---------------------------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Reference volume ``(B, C, D, H, W)`` (or cached features without an encoder) -> tokens
        ``(B, num_tokens, token_dim)``. The encoder runs frozen under no_grad; the projection is trainable."""
        features = self.image_encoder(image) if self.image_encoder is not None else image
        tokens = self.image_proj(features)
        if tokens.ndim != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"the projection must return (B, N, {self.token_dim}) tokens, got {tuple(tokens.shape)}.")
        return tokens

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: the base's input ``(B, C, D, H, W)``.
            timesteps: ``(B,)`` timesteps.
            context: the base's context tokens ``(B, N, context_dim)`` (None for a base without context).
            image: reference volume ``(B or 1, C, D, H, W)``; None (and no ``image_tokens``): the base model.
            image_tokens: precomputed tokens ``(B or 1, N, token_dim)`` (from :meth:`encode_image`, possibly with
                condition dropout applied, :meth:`null_image_tokens` for dropped rows) instead of ``image``.
            scale: lambda for this call (default ``self.scale``): a number, or one per sample ``(B,)``; 0 gives
                exactly the base model (for a number, without encoding the image).
        """
        if image is not None and image_tokens is not None:
            raise ValueError("pass either image or image_tokens, not both.")
        scale = self.scale if scale is None else scale
        if image is None and image_tokens is None:
            return self.base(x, timesteps, context=context)
        if not isinstance(scale, torch.Tensor) and float(scale) == 0.0:
            return self.base(x, timesteps, context=context)  # lambda 0: exactly the base, without encoding
        b = x.shape[0]
        tokens = self.encode_image(image) if image is not None else image_tokens
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[-1] != self.token_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"image_tokens must have shape (B, N, {self.token_dim}), got {shape}.")
        if tokens.shape[0] not in (1, b):
            raise ValueError(f"the image prompt has batch size {tokens.shape[0]}; expected 1 or {b} (that of x).")
        lam = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        if lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] not in (1, b)):
            raise ValueError(f"scale must be a number or one per sample ({b},), got shape {tuple(lam.shape)}.")
        places_of = getattr(self.image_proj, "token_places", None)
        places = places_of().to(x.device) if places_of is not None else None
        prompt = ImagePrompt(tokens.to(x.device).expand(b, -1, -1), lam.reshape(-1).expand(b), places)
        return self.base(x, timesteps, context=context, image_prompt=prompt)

    def remove(self) -> nn.Module:
        """Uninstall: restore the base's attention processors, remove the anchor processors; returns the (still
        frozen) base."""
        for attn, proc in self._replaced:
            attn.set_processor(proc)
        for unet, path in self._added:
            unet.set_anchor_processor(path, None)
        self._replaced, self._added = [], []
        return self.base

    # -- saving and loading (the file and its checks: wdm3d.networks.ip_adapter.files) ------------------------------

    def adapter_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's weights alone: ``{"image_proj": {...}, "ip_adapter": {...}}``.

        ``ip_adapter`` keys are module paths in the base: ``"<attention path>.to_k_ip.weight"`` for the processors
        (e.g. ``"down.4.attn.to_k_ip.weight"``), ``"<residual block path>.ip_block.<...>"`` for added blocks.
        """
        return {sec: {k: v.detach().clone() for k, v in d.items()} for sec, d in adapter_weights(self).items()}

    def check_adapter_state(self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "the file") -> None:
        """Raise ``ValueError`` naming the first key that is missing, unexpected or of another shape.

        Args:
            state: weights as :meth:`adapter_state_dict` returns them.
            source: what they came from, for messages.
        """
        check_adapter_weights(self, state, source)

    @torch.no_grad()
    def load_adapter_state_dict(
        self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "the state"
    ) -> None:
        """Load weights from :meth:`adapter_state_dict` (checked first, see :meth:`check_adapter_state`).

        Args:
            state: weights as :meth:`adapter_state_dict` returns them.
            source: what they came from, for messages.
        """
        self.check_adapter_state(state, source)
        for section, own in adapter_weights(self).items():
            for key, value in own.items():
                value.copy_(state[section][key])

    def provenance(self) -> dict[str, Any]:
        """What the adapter's weights only make sense with: the fingerprints (:func:`weights_fingerprint`) of the
        frozen image encoder and base, and the feature / token widths. Saved under ``"meta"`` by
        :meth:`save_adapter` and checked by :meth:`load_adapter`."""
        return adapter_provenance(self)

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write :meth:`adapter_state_dict` (CPU tensors) and :meth:`provenance` (``"meta"``) to ``path`` atomically
        (temporary file + rename).

        Args:
            path: the file (its folder is created).
        """
        return save_adapter_file(self, path)

    def load_adapter(self, path: str | os.PathLike, check_encoder: bool = True) -> None:
        """Load weights written by :meth:`save_adapter` (``torch.load(weights_only=True)``) onto this base.

        A file that records its image encoder (``"meta"``) is refused when this adapter's encoder has other weights
        (the projection learnt that encoder's features; ``check_encoder=False`` skips the check); a base with other
        weights only warns (IP-Adapters are meant to carry over to fine-tuned versions of their base).

        Args:
            path: the file.
            check_encoder: refuse a file trained with an image encoder of other weights.
        """
        load_adapter_file(self, path, check_encoder)
