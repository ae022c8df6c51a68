"""Cross-attention for the WDM U-Net: an attention module whose computation is a swappable processor, the 3D
cross-attention block built on it, and the image prompt that an add-on's processors read from a call (the learned
embeddings of categorical conditions, the context tokens, live in :mod:`wdm3d.networks.context` and are re-exported
here).

The processor pattern follows diffusers' ``Attention`` / ``AttnProcessor``: the module owns ``to_q``, ``to_k``,
``to_v`` and ``to_out``; *how* they are combined is delegated to ``attention.processor``, so that an add-on
(:class:`wdm3d.networks.ip_adapter.IPAdapter`) changes the computation by installing a processor instead of editing
or forking the network. Unlike diffusers, an installed processor is not registered as a submodule: its parameters
belong to whatever installed it, and the network's ``state_dict()`` / ``parameters()`` stay those of the network.

MONAI's ``SpatialTransformer`` (in ``diffusion_model_unet``) is a full transformer (self-attention, cross-attention,
feed-forward, conv projections) with no processor hook; here a single cross-attention with a swappable processor
is what is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .context import ContextEmbedding
from .positions import place_features

__all__ = [
    "ImagePrompt",
    "Attention",
    "AttnProcessor",
    "CrossAttentionBlock",
    "ContextEmbedding",
    "attention_heads",
    "split_heads",
    "merge_heads",
]


def attention_heads(channels: int, num_heads: int | None = None, head_dim: int | None = 32) -> tuple[int, int]:
    """``(num_heads, head_dim)`` for an attention over ``channels`` features.

    Args:
        channels: feature width the heads split.
        num_heads: number of heads (must divide ``channels``); takes precedence over ``head_dim``.
        head_dim: width per head when ``num_heads`` is None; capped at ``channels`` and must divide it.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}.")
    if num_heads is not None:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide the attention width {channels}.")
        return num_heads, channels // num_heads
    if head_dim is None or head_dim < 1:
        raise ValueError(f"give num_heads or a positive head_dim, got head_dim={head_dim}.")
    head_dim = min(head_dim, channels)
    if channels % head_dim:
        raise ValueError(
            f"head_dim={head_dim} must divide the attention width {channels}; choose another head_dim or num_heads."
        )
    return channels // head_dim, head_dim


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, heads * d) -> (B, heads, L, d)``."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, L, d) -> (B, L, heads * d)``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class ImagePrompt(NamedTuple):
    """Image-prompt tokens travelling with a network call, to the attention processors that read them.

    The network passes it down unchanged (``WDMUNet.forward(..., image_prompt=...)``, like diffusers'
    ``cross_attention_kwargs``); only processors installed by an add-on (:class:`~wdm3d.networks.IPAdapter`) use it,
    so nothing about a prompt is stored between calls.

    Attributes:
        tokens: ``(B, N, token_dim)`` image tokens, one set per sample.
        scale: ``(B,)`` the weight lambda of each sample's image branch (0: that sample is the base's output).
        places: ``(N, P)`` where each token sits in the volume (:func:`~wdm3d.networks.positions.place_features`;
            zero rows for tokens without a place), or None; read by place-biased cross-attention.
    """

    tokens: torch.Tensor
    scale: torch.Tensor
    places: Optional[torch.Tensor] = None  # noqa: UP045 - TorchScript cannot read ``X | None`` in a NamedTuple


class AttnProcessor:
    """The default processor: ``to_out(softmax(Q K^T / sqrt(d)) V)`` with ``Q = to_q(x)``, ``K = to_k(c)``,
    ``V = to_v(c)`` (Vaswani et al. 2017, eq. 1), computed by ``F.scaled_dot_product_attention``.

    Called as ``processor(attn, hidden_states, context, image_prompt)``:
    ``(B, L, query_dim), (B, N, context_dim), None -> (B, L, query_dim)``. It reads no image prompt and refuses one
    (a prompt reaching it would otherwise be ignored without a word).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        image_prompt: ImagePrompt | None = None,
    ) -> torch.Tensor:
        if image_prompt is not None:
            raise ValueError(
                "an image prompt reached an attention without an image-prompt processor: install an IPAdapter on "
                "this network (its processors read the prompt), or call it without image_prompt."
            )
        return attn.default_attention(hidden_states, context)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers-style projections and a swappable processor.

    ``(B, L, query_dim), (B, N, context_dim) -> (B, L, query_dim)``; without a context it attends to itself.

    Args:
        query_dim: width of the queries' source (and of the output).
        context_dim: width of the context tokens (defaults to ``query_dim``).
        num_heads: attention heads.
        head_dim: width per head (defaults to ``query_dim // num_heads``).
        out_bias: give ``to_out`` a bias.
        zero_out: zero-initialise ``to_out`` (weight and bias), so that the module outputs zeros when fresh.

    ``to_q``, ``to_k``, ``to_v`` are bias-free ``nn.Linear`` layers, ``to_out`` an ``nn.Linear``. The computation is
    ``self.processor(self, hidden_states, context)``; replace it with :meth:`set_processor` (or by assigning
    ``attention.processor``). The processor is not a registered submodule (see the module docstring).

    ``torch.jit.script`` compiles the default computation (:meth:`default_attention`); scripting a module with
    another processor installed raises instead of silently dropping it (see :meth:`__prepare_scriptable__`).

    Example:
        >>> attn = Attention(32, context_dim=16, num_heads=4)
        >>> attn(torch.randn(2, 100, 32), torch.randn(2, 3, 16)).shape
        torch.Size([2, 100, 32])
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        num_heads: int = 1,
        head_dim: int | None = None,
        out_bias: bool = True,
        zero_out: bool = False,
    ) -> None:
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        if query_dim < 1 or context_dim < 1 or num_heads < 1:
            raise ValueError(
                f"query_dim, context_dim and num_heads must be >= 1, got {query_dim}, {context_dim}, {num_heads}."
            )
        if head_dim is None:
            if query_dim % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide query_dim={query_dim} (or give head_dim).")
            head_dim = query_dim // num_heads
        self.query_dim, self.context_dim = query_dim, context_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)
        if zero_out:
            for p in self.to_out.parameters():
                nn.init.zeros_(p)
        self.set_processor(AttnProcessor())

    __jit_unused_properties__ = ("processor",)  # a Python callable, not part of a scripted module

    @property
    def processor(self) -> Callable[..., torch.Tensor]:
        return self.__dict__["_processor"]

    def set_processor(self, processor: Callable[..., torch.Tensor]) -> None:
        """Use ``processor(attn, hidden_states, context, image_prompt) -> output`` for the computation (not registered
        as a submodule: whoever installs a processor with parameters owns, saves and moves them)."""
        if not callable(processor):
            raise TypeError(f"an attention processor must be callable, got {type(processor).__name__}.")
        self.__dict__["_processor"] = processor

    def __setattr__(self, name: str, value) -> None:
        if name == "processor":  # keep processors out of the module tree even when they are nn.Modules
            self.set_processor(value)
        else:
            super().__setattr__(name, value)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled dot-product attention over heads: ``(B, L, h*d), (B, N, h*d), (B, N, h*d) -> (B, L, h*d)``;
        ``bias`` ``(L, N)`` is added to every head's logits."""
        q, k, v = (split_heads(t, self.num_heads) for t in (query, key, value))
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))

    def default_attention(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """What :class:`AttnProcessor` computes: ``to_out(attend(to_q(x), to_k(c), to_v(c)))``,
        ``(B, L, query_dim), (B, N, context_dim) -> (B, L, query_dim)``."""
        query = self.to_q(hidden_states)
        out = self.attend(query, self.to_k(context), self.to_v(context))
        return self.to_out(out)

    def __prepare_scriptable__(self) -> Attention:
        # torch.jit.script calls this before compiling; the scripted forward is default_attention
        if type(self.processor) is not AttnProcessor:
            raise RuntimeError(
                f"cannot script an Attention with the processor {self.processor!r}: TorchScript compiles the default "
                "computation only and would drop it. Uninstall it first (e.g. IPAdapter.remove())."
            )
        return self

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: ``(B, L, query_dim)`` queries' source.
            context: ``(B, N, context_dim)`` keys' and values' source; None: ``hidden_states`` (self-attention).
            image_prompt: image tokens for an installed image-prompt processor (the default processor refuses one).
        """
        if context is None:
            context = hidden_states
        if torch.jit.is_scripting():  # the installed processor is a Python callable: scripted, the default one
            return self.default_attention(hidden_states, context)
        self._check_inputs(hidden_states, context)
        if image_prompt is None:  # (a processor written for three arguments keeps working)
            return self.processor(self, hidden_states, context)
        return self.processor(self, hidden_states, context, image_prompt)

    def _check_inputs(self, hidden_states: torch.Tensor, context: torch.Tensor) -> None:
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.query_dim:
            raise ValueError(
                f"hidden_states must have shape (B, L, {self.query_dim}), got {tuple(hidden_states.shape)}."
            )
        if context.ndim != 3 or context.shape[-1] != self.context_dim or context.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"context must have shape ({hidden_states.shape[0]}, N, {self.context_dim}), "
                f"got {tuple(context.shape)}."
            )

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, processor={self.processor!r}"


class CrossAttentionBlock(nn.Module):
    """3D cross-attention block: ``x + to_out(Attn(GroupNorm(x) as tokens, context))``.

    ``(B, C, D, H, W), (B, N, context_dim) -> (B, C, D, H, W)``: the volume is normalised, flattened to ``D*H*W``
    tokens of width C that attend to the context tokens, and the result is added back. The output projection is
    zero-initialised, so a fresh block is the identity (exactly).

    Args:
        channels: C.
        context_dim: width of the context tokens.
        num_heads: attention heads (takes precedence over ``head_dim``).
        head_dim: width per head when ``num_heads`` is None (capped at ``channels``).
        norm_num_groups: GroupNorm groups (must divide ``channels``).
        out_bias: give the output projection a bias. Without it, all-zero context tokens give exactly zero
            attention output (``V = 0``), i.e. the block is the identity for them.
        place_attention: bias the attention toward context tokens at the voxel's own place in the volume:
            ``logits += g * <place(voxel), place(token)>`` with the tokens' places given to :meth:`branch` and a
            learned gain ``g`` (starts at 8, where the nearest token gets most of the weight); relative position
            biases as in Swin / T5, here between a U-Net level and an image prompt's feature grid.

    Example:
        >>> block = CrossAttentionBlock(16, context_dim=8, norm_num_groups=4)
        >>> x = torch.randn(1, 16, 4, 4, 4)
        >>> torch.equal(block(x, torch.randn(1, 2, 8)), x)  # zero-initialised output projection
        True
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int | None = None,
        head_dim: int | None = 32,
        norm_num_groups: int = 32,
        out_bias: bool = True,
        place_attention: bool = False,
    ) -> None:
        super().__init__()
        if channels % norm_num_groups:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide the channel count {channels}.")
        heads, dim = attention_heads(channels, num_heads, head_dim)
        self.channels, self.context_dim = channels, context_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.attn = Attention(channels, context_dim, heads, dim, out_bias=out_bias, zero_out=True)
        self.place_attention = bool(place_attention)
        self.place_gain = nn.Parameter(torch.tensor(8.0)) if place_attention else None

    def branch(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        image_prompt: ImagePrompt | None = None,
        places: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual branch alone: ``(B, C, D, H, W), (B, N, context_dim) -> (B, C, D, H, W)``
        (``image_prompt``: passed to the attention's processor; ``places`` ``(N, P)``: where the context tokens sit,
        for ``place_attention``)."""
        if not torch.jit.is_scripting():  # noqa: SIM102 - TorchScript drops this branch only when it tests this alone
            if x.ndim != 5 or x.shape[1] != self.channels:
                raise ValueError(f"x must have shape (B, {self.channels}, D, H, W), got {tuple(x.shape)}.")
        # (B, D*H*W, C), contiguous: for a transposed input torch.matmul folds the batch into one mm only when
        # the weight needs no gradient, so the last bits of the result would depend on whether the network is
        # frozen (an installed IP-Adapter at scale 0 would then not be exactly its base)
        tokens = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        context = context.to(tokens.dtype)
        if torch.jit.is_scripting():
            out = self.attn(tokens, context)
        elif self.place_gain is not None and places is not None:  # (an add-on's block: never scripted)
            bias = self.place_gain * (place_features(x.shape[2:], tokens.device) @ places.T.to(tokens.device))
            attn = self.attn
            out = attn.to_out(
                attn.attend(attn.to_q(tokens), attn.to_k(context), attn.to_v(context), bias.to(tokens.dtype))
            )
        else:
            out = self.attn(tokens, context, image_prompt)
        return out.transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_prompt: ImagePrompt | None = None) -> torch.Tensor:
        return x + self.branch(x, context, image_prompt)
