"""IP-Adapter for 3D volumes: image-prompt conditioning of a trained, frozen U-Net by decoupled cross-attention
(Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
arXiv 2308.06721).

A reference volume goes through a frozen image encoder (default intent: the project's WF-VAE encoder) to features,
a trainable projection turns them into image tokens ``(B, N, token_dim)``, and the U-Net attends to them:

- at every cross-attention site of the base (``Attention`` modules, e.g. those of a ``WDMUNet`` built with a
  ``context_dim``), a processor is installed that computes ``Z = Attn(Q, K, V) + lambda * Attn(Q, K', V')``
  (paper eq. 5) with the base's query, ``K' = to_k_ip(tokens)``, ``V' = to_v_ip(tokens)`` (new bias-free
  projections initialised from the base's ``to_k`` / ``to_v``), and the base's output projection;
- at chosen residual blocks where the base has no cross-attention (e.g. a base without context), a new
  cross-attention block over the image tokens is attached by a forward hook; its output projection is
  zero-initialised (and bias-free), so installation leaves the base's output unchanged.

Nothing of the base's code or weights is edited: processors and hooks are installed on its modules, the base is
frozen, and :meth:`IPAdapter.remove` restores it. The adapter's weights are stored apart from the base's as
``{"image_proj": ..., "ip_adapter": ...}`` keyed by module path in the base, so they load onto any base of the same
architecture.

All-zero image tokens make every image branch contribute exactly zero (bias-free ``to_k_ip`` / ``to_v_ip`` and
added output projections give ``V' = 0``): a dropped image prompt (:class:`ConditionDropout`) is exactly the base
model, in training and in the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .attention import Attention, CrossAttentionBlock, attention_heads
from .scripting import shape_repr
from .unet import default_attention_levels

__all__ = [
    "IPAdapter",
    "IPAttnProcessor",
    "ImageProjection",
    "PerceiverResampler",
    "FrozenImageEncoder",
    "ConditionDropout",
    "DroppedConditions",
    "sincos_position_3d",
    "weights_fingerprint",
]

PROJECTIONS = ("linear", "perceiver")


# -- image encoder and projections -----------------------------------------------------------------------------------


class FrozenImageEncoder(nn.Module):
    """A frozen image encoder: reference volume ``(B, C, D, H, W)`` -> features ``(B, F, d, h, w)`` or ``(B, F)``.

    Wraps an ``nn.Module`` or any callable. An autoencoder with the wdm3d VAE interface (``encode(x)`` returning a
    distribution with ``mode()``, and ``latent_channels``) is used through its encoder: the features are the
    posterior mode. The wrapped module's parameters get ``requires_grad=False``, it stays in eval mode, and
    encoding runs under ``torch.no_grad()``.

    Args:
        encoder: the module or callable.
        feature_dim: F; read from the encoder (``feature_dim``, ``latent_channels`` or ``out_channels``) if None.
    """

    def __init__(self, encoder: nn.Module | Callable[[torch.Tensor], Any], feature_dim: int | None = None) -> None:
        super().__init__()
        if not callable(encoder) and not hasattr(encoder, "encode"):
            raise TypeError(f"image_encoder must be an nn.Module or a callable, got {type(encoder).__name__}.")
        self.is_autoencoder = hasattr(encoder, "encode") and hasattr(encoder, "latent_channels")
        if isinstance(encoder, nn.Module):
            self.encoder = encoder
            encoder.requires_grad_(False)
            encoder.eval()
        else:
            self.__dict__["encoder"] = encoder  # a plain callable: nothing to register
        if feature_dim is None:
            for name in ("feature_dim", "latent_channels", "out_channels"):
                value = getattr(encoder, name, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    feature_dim = value
                    break
        if feature_dim is None or feature_dim < 1:
            raise ValueError(
                "could not read the image encoder's feature width (no feature_dim / latent_channels / out_channels "
                "attribute); pass feature_dim= (the channels of its output feature map or the length of its vector)."
            )
        self.feature_dim = int(feature_dim)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        super().train(mode)
        if isinstance(self.encoder, nn.Module):
            self.encoder.eval()  # frozen: always in eval mode (dropout off, norm statistics fixed)
        return self

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or image.ndim != 5:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"the reference image must have shape (B, C, D, H, W), got {shape}.")
        out = self.encoder.encode(image) if self.is_autoencoder else self.encoder(image)
        if not isinstance(out, torch.Tensor) and callable(getattr(out, "mode", None)):  # a posterior (not Tensor.mode)
            out = out.mode()
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 5):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the image encoder must return (B, F, d, h, w) features or a (B, F) vector, got {shape}.")
        if out.shape[1] != self.feature_dim:
            raise ValueError(
                f"the image encoder returned {out.shape[1]} features, expected feature_dim={self.feature_dim}."
            )
        return out


def weights_fingerprint(module: nn.Module | None) -> str | None:
    """SHA-256 of a module's state (names, dtypes, shapes and values, in name order); None for no module or no state.

    Identifies the exact frozen encoder / base an adapter was trained with, whatever file they came from.
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


def _check_features(features: torch.Tensor, feature_dim: int) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim not in (2, 3, 5):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"image features must be (B, F), (B, L, F) or (B, F, d, h, w), got {shape}.")
    width = features.shape[-1] if features.ndim == 3 else features.shape[1]
    if width != feature_dim:
        raise ValueError(f"image features have width {width}, but the projection expects feature_dim={feature_dim}.")


class ImageProjection(nn.Module):
    """IP-Adapter's projection: a global image embedding -> ``Linear`` -> N tokens -> ``LayerNorm``.

    ``(B, F)`` | ``(B, L, F)`` | ``(B, F, d, h, w)`` -> ``(B, num_tokens, token_dim)``; feature maps and token
    sequences are averaged to one ``(B, F)`` vector first.

    Args:
        feature_dim: F.
        token_dim: width of the image tokens (the cross-attention context width).
        num_tokens: N (IP-Adapter: 4).
    """

    def __init__(self, feature_dim: int, token_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        if min(feature_dim, token_dim, num_tokens) < 1:
            raise ValueError(
                f"feature_dim, token_dim, num_tokens must be >= 1, got {feature_dim}, {token_dim}, {num_tokens}."
            )
        self.feature_dim, self.token_dim, self.num_tokens = feature_dim, token_dim, num_tokens
        self.proj = nn.Linear(feature_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dim)
        if features.ndim == 5:
            features = features.flatten(2).mean(-1)
        elif features.ndim == 3:
            features = features.mean(1)
        tokens = self.proj(features).view(features.shape[0], self.num_tokens, self.token_dim)
        return self.norm(tokens)


def sincos_position_3d(
    size: list[int], dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed sinusoidal positions of a ``(d, h, w)`` grid (Vaswani et al. 2017, sec. 3.5, one third per axis).

    Returns ``(d*h*w, dim)`` (row-major voxel order): per axis ``dim // 6`` frequencies ``10000^(-k/n)``, sine and
    cosine of the voxel index; zero-padded to ``dim``. ``size`` may be any sequence of three ints and ``device`` a
    string outside TorchScript (which compiles this for :class:`~wdm3d.networks.DiT3D`).
    """
    if len(size) != 3 or dim < 1:
        raise ValueError(f"size must be (d, h, w) and dim >= 1, got {shape_repr(size)}, {dim}.")
    n = dim // 6
    grids = torch.meshgrid([torch.arange(s, device=device, dtype=torch.float64) for s in size], indexing="ij")
    parts: list[torch.Tensor] = []
    if n > 0:
        freqs = 10000.0 ** (-torch.arange(n, device=device, dtype=torch.float64) / n)
        for g in grids:
            angle = g.reshape(-1, 1) * freqs
            parts.append(angle.sin())
            parts.append(angle.cos())
    if len(parts) > 0:
        pos = torch.cat(parts, 1)
    else:
        pos = torch.zeros(size[0] * size[1] * size[2], 0, device=device, dtype=torch.float64)
    pos = torch.nn.functional.pad(pos, [0, dim - pos.shape[1]])
    return pos.to(dtype)


class _PerceiverLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.norm_features = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.attn = Attention(width, width, num_heads, head_dim, out_bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, ff_mult * width, bias=False), nn.GELU(),
            nn.Linear(ff_mult * width, width, bias=False),
        )

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        kv = torch.cat((self.norm_features(features), lat), dim=1)  # latents attend to features and to themselves
        latents = latents + self.attn(lat, kv)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """IP-Adapter-Plus projection: learned latent queries that attend to patch features (Perceiver resampler,
    Alayrac et al. 2022 "Flamingo", sec. 2.1 / appendix A.1.1).

    ``(B, F, d, h, w)`` | ``(B, L, F)`` | ``(B, F)`` -> ``(B, num_latents, token_dim)``: feature maps are flattened
    to ``d*h*w`` patch tokens (plus fixed 3D sinusoidal positions, as conv features carry none), projected to
    ``width``; ``depth`` layers of [latents += Attn(LN(latents), [LN(features); LN(latents)]); latents += FF];
    then ``Linear`` -> ``LayerNorm`` to ``token_dim``.

    Args:
        feature_dim: F.
        token_dim: width of the output tokens.
        num_latents: output tokens (IP-Adapter-Plus: 16).
        depth: layers (IP-Adapter-Plus: 4).
        width: internal width (default ``token_dim``).
        num_heads: heads (takes precedence over ``head_dim``).
        head_dim: width per head (64; capped at ``width``).
        ff_mult: feed-forward expansion.
        positional: add sinusoidal positions to feature-map patches.
    """

    def __init__(
        self,
        feature_dim: int,
        token_dim: int,
        num_latents: int = 16,
        depth: int = 4,
        width: int | None = None,
        num_heads: int | None = None,
        head_dim: int = 64,
        ff_mult: int = 4,
        positional: bool = True,
    ) -> None:
        super().__init__()
        width = token_dim if width is None else width
        if min(feature_dim, token_dim, num_latents, depth, width, ff_mult) < 1:
            raise ValueError("feature_dim, token_dim, num_latents, depth, width and ff_mult must all be >= 1.")
        heads, hd = attention_heads(width, num_heads, head_dim)
        self.feature_dim, self.token_dim, self.num_tokens = feature_dim, token_dim, num_latents
        self.width, self.positional = width, positional
        self.latents = nn.Parameter(torch.randn(1, num_latents, width) / width**0.5)
        self.proj_in = nn.Linear(feature_dim, width)
        self.layers = nn.ModuleList([_PerceiverLayer(width, heads, hd, ff_mult) for _ in range(depth)])
        self.proj_out = nn.Linear(width, token_dim)
        self.norm_out = nn.LayerNorm(token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_features(features, self.feature_dim)
        if features.ndim == 2:
            x = self.proj_in(features[:, None])
        elif features.ndim == 3:
            x = self.proj_in(features)
        else:
            x = self.proj_in(features.flatten(2).transpose(1, 2))
            if self.positional:
                x = x + sincos_position_3d(features.shape[2:], self.width, x.device, x.dtype)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm_out(self.proj_out(latents))


# -- installation on the base ----------------------------------------------------------------------------------------


class _ImagePrompt:
    """What the installed processors and hooks read during a forward of the base (set by ``IPAdapter.forward``).

    ``generation`` counts the adapter's forwards, so that a backward can tell whether the prompt it recomputes
    checkpointed blocks with is still its own; ``lock`` is held during a forward (one adapter, one forward at a
    time: the state is shared by every thread, as it must be, since autograd may recompute on another thread).
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.scale: float = 0.0
        self.generation = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle of an adapter: a fresh, empty prompt
        return {"tokens": None, "scale": 0.0, "generation": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.tokens is not None and self.scale != 0.0

    def clear(self) -> None:
        self.tokens, self.scale = None, 0.0


class IPAttnProcessor(nn.Module):
    """Decoupled cross-attention processor (IP-Adapter eq. 5): ``to_out(Attn(Q, K, V) + lambda * Attn(Q, K', V'))``.

    ``Q = to_q(x)``, ``K = to_k(c)``, ``V = to_v(c)`` are the base attention's; ``K' = to_k_ip(t)``,
    ``V' = to_v_ip(t)`` are new bias-free projections of the image tokens ``t``, initialised as copies of the base's
    ``to_k`` / ``to_v``. Without an active image prompt (no tokens, or lambda = 0) it computes exactly what the
    default processor does.

    Args:
        attn: the base attention module it is made for.
        token_dim: width of the image tokens (must equal the base's context width, as K' / V' start as K / V).
    """

    def __init__(self, attn: Attention, token_dim: int) -> None:
        super().__init__()
        if attn.to_k.in_features != token_dim:
            raise ValueError(
                f"image tokens of width {token_dim} cannot start from the base's to_k "
                f"({attn.to_k.in_features} inputs); use token_dim={attn.to_k.in_features}."
            )
        self.to_k_ip = nn.Linear(token_dim, attn.to_k.out_features, bias=False)
        self.to_v_ip = nn.Linear(token_dim, attn.to_v.out_features, bias=False)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(attn.to_k.weight)
            self.to_v_ip.weight.copy_(attn.to_v.weight)
        self.__dict__["prompt"] = _ImagePrompt()  # replaced by the installing adapter's shared prompt

    def forward(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = attn.to_q(hidden_states)
        out = attn.attend(query, attn.to_k(context), attn.to_v(context))
        prompt = self.__dict__["prompt"]
        if prompt.active:
            tokens = prompt.tokens.to(query.dtype)
            out = out + prompt.scale * attn.attend(query, self.to_k_ip(tokens), self.to_v_ip(tokens))
        return attn.to_out(out)


class _AddedBlockHook:
    """Forward hook: ``output + lambda * block.branch(output, image tokens)`` while an image prompt is active."""

    def __init__(self, block: CrossAttentionBlock, prompt: _ImagePrompt) -> None:
        self.block, self.prompt = block, prompt

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.prompt.active:
            return None  # unchanged
        return output + self.prompt.scale * self.block.branch(output, self.prompt.tokens)


def _prompt_consumed(prompt: _ImagePrompt, generation: int, grad: torch.Tensor) -> None:
    """Hook on the image tokens of a forward through a checkpointing base: runs when their gradient is complete,
    i.e. after every recomputed block used them. Checks that the recomputation saw this forward's prompt, then
    clears it (the base alone is the base again)."""
    if prompt.generation != generation or prompt.tokens is None:
        why = "another adapter forward ran" if prompt.generation != generation else "this backward already ran once"
        raise RuntimeError(
            f"IP-Adapter with a gradient-checkpointing base: {why} between this forward and its backward, so the "
            "recomputed blocks did not see this forward's image prompt and the gradients are wrong. Run backward "
            "once after each adapter forward (or turn checkpointing off)."
        )
    prompt.clear()


def _key(path: str) -> str:  # ModuleDict keys cannot hold "."
    return path.replace(".", ":")


def _path(key: str) -> str:
    return key.replace(":", ".")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class IPAdapter(nn.Module):
    """Image-prompt adapter installed onto a trained base U-Net without editing its code.

    Called like the base plus an image prompt:
    ``adapter(x, timesteps, context=None, image=None, image_tokens=None, scale=None) -> base output``.

    Args:
        base: the trained network, e.g. a :class:`~wdm3d.networks.WDMUNet` (with or without a ``context_dim``);
            it is frozen (``requires_grad=False``). Its :class:`~wdm3d.networks.attention.Attention` modules get
            decoupled cross-attention processors.
        image_encoder: frozen encoder of the reference volume (an ``nn.Module`` or callable, or a wdm3d VAE whose
            posterior mode is used), see :class:`FrozenImageEncoder`; None: ``image`` is passed already encoded
            (cached features).
        feature_dim: the encoder's feature width (read from the encoder if None; required without an encoder).
        projection: ``"linear"`` (:class:`ImageProjection`), ``"perceiver"`` (:class:`PerceiverResampler`) or a
            module mapping features to ``(B, N, token_dim)`` tokens.
        num_tokens: image tokens (default 4 for linear, 16 for perceiver).
        token_dim: image token width; defaults to (and, where the base has cross-attention, must be) the base's
            ``context_dim``; 256 for a base without context.
        perceiver_depth: Perceiver layers (4).
        added_levels: levels (of a ``WDMUNet``) whose residual blocks get an added image cross-attention block;
            default: none if the base has cross-attention, else the base's default attention levels.
        added_middle: add a block in the middle (default: as for ``added_levels``).
        added_sites: instead of levels, module paths in the base (any network) after which a block is added, or a
            mapping path -> output channels for modules without an ``out_channels`` attribute.
        num_heads: heads of added blocks (default: the base's ``num_heads``).
        head_dim: width per head of added blocks (default: the base's ``head_dim`` or 32).
        norm_num_groups: GroupNorm groups of added blocks (default: the base's ``norm_num_groups`` or 32).
        scale: default lambda (1.0 image-only; ~0.5 alongside other conditions).

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
        The base's own ``forward`` runs unmodified; the image prompt reaches the installed processors and hooks
        through state set for the duration of ``adapter(...)``. With the base's gradient checkpointing, that
        state is kept until the backward pass has recomputed the blocks with it (then cleared): run ``backward``
        once before the next adapter forward (the usual training loop does); a backward that would recompute with
        another forward's prompt raises instead of returning wrong gradients. Until that backward, calling the
        base directly still sees the prompt. One forward at a time per adapter: a concurrent call from another
        thread raises.
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
        added_sites: Sequence[str] | Mapping[str, int] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        norm_num_groups: int | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module (the trained U-Net), got {type(base).__name__}.")
        self.base = base
        base.requires_grad_(False)
        prompt = _ImagePrompt()
        self.__dict__["_prompt"] = prompt
        self._handles: list[Any] = []
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
        added = self._added_sites(base, bool(sites), added_levels, added_middle, added_sites)
        heads = num_heads if num_heads is not None else getattr(base, "num_heads", None)
        hdim = head_dim if head_dim is not None else getattr(base, "head_dim", None) or 32
        groups = norm_num_groups if norm_num_groups is not None else getattr(base, "norm_num_groups", None) or 32
        blocks = {
            path: CrossAttentionBlock(ch, token_dim, heads, hdim, groups, out_bias=False) for path, ch in added.items()
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
        else:
            raise ValueError(f"projection must be one of {PROJECTIONS} or an nn.Module, got {projection!r}.")

        # install
        self.ip_layers = nn.ModuleDict()
        for name, attn in sites:
            proc = processors[name]
            proc.__dict__["prompt"] = prompt
            self.ip_layers[_key(name)] = proc
            self._replaced.append((attn, attn.processor))
            attn.set_processor(proc)
        self.added_blocks = nn.ModuleDict()
        for path, block in blocks.items():
            self.added_blocks[_key(path)] = block
            self._handles.append(base.get_submodule(path).register_forward_hook(_AddedBlockHook(block, prompt)))
        self.scale = float(scale)

    @staticmethod
    def _added_sites(
        base: nn.Module,
        has_sites: bool,
        levels: Sequence[int] | None,
        middle: bool | None,
        sites: Sequence[str] | Mapping[str, int] | None,
    ) -> dict[str, int]:
        if sites is not None:
            if levels is not None or middle:
                raise ValueError("give either added_sites or added_levels / added_middle, not both.")
            out: dict[str, int] = {}
            items = sites.items() if isinstance(sites, Mapping) else ((s, None) for s in sites)
            for path, channels in items:
                try:
                    module = base.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"added_sites: the base has no module {path!r}.") from None
                channels = channels if channels is not None else getattr(module, "out_channels", None)
                if not isinstance(channels, int):
                    raise ValueError(
                        f"added_sites: cannot tell the output channels of {path!r}; pass added_sites as a mapping "
                        "{path: channels}."
                    )
                out[path] = channels
            return out
        anchors_of = getattr(base, "attention_anchors", None)
        if levels is None and middle is None:
            if has_sites:
                return {}
            if anchors_of is None:
                raise ValueError(
                    "the base has no cross-attention (no Attention modules) and no attention_anchors(); "
                    "pass added_sites (module paths after which image cross-attention blocks are added)."
                )
            n = len(base.channel_mult)
            levels = [lv for lv, on in enumerate(default_attention_levels(n)) if on]
            middle = True
        if anchors_of is None:
            raise ValueError(
                f"added_levels needs a base with attention_anchors() (a WDMUNet), got {type(base).__name__}; "
                "use added_sites."
            )
        anchors = anchors_of(levels=list(levels or []), middle=bool(middle))
        taken = [a for a in anchors if a.attention is not None]
        if taken:
            where = "the middle" if taken[0].level is None else f"level {taken[0].level}"
            raise ValueError(
                f"{where} already has cross-attention in the base ({taken[0].attention!r}); image attention reaches it "
                "through to_k_ip / to_v_ip. Leave it out of added_levels / added_middle."
            )
        if not anchors:
            raise ValueError("added_levels / added_middle select no residual blocks.")
        return {a.path: a.channels for a in anchors}

    # -- parameters ------------------------------------------------------------------------------------------------

    def adapter_modules(self) -> dict[str, nn.Module]:
        """The trainable parts: ``{"image_proj": ..., "ip_layers": ..., "added_blocks": ...}``."""
        return {"image_proj": self.image_proj, "ip_layers": self.ip_layers, "added_blocks": self.added_blocks}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's, the new K'/V' projections' and the added blocks' parameters (the optimizer's list)."""
        return [p for m in self.adapter_modules().values() for p in m.parameters()]

    def __prepare_scriptable__(self) -> IPAdapter:
        # torch.jit.script calls this first: say why it cannot work, before TorchScript fails somewhere inside
        raise RuntimeError(
            "an IPAdapter cannot be compiled with TorchScript (torch.jit.script, MONAI's ckpt_export): it reaches the "
            "base through Python attention processors, forward hooks and a prompt shared between them. Export the base "
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
        scale: float | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: the base's input ``(B, C, D, H, W)``.
            timesteps: ``(B,)`` timesteps.
            context: the base's context tokens ``(B, N, context_dim)`` (None for a base without context).
            image: reference volume ``(B or 1, C, D, H, W)``; None (and no ``image_tokens``): the base model.
            image_tokens: precomputed tokens ``(B or 1, N, token_dim)`` (from :meth:`encode_image`, possibly with
                condition dropout applied) instead of ``image``; all-zero rows are "no image" for those samples.
            scale: lambda for this call (default ``self.scale``); 0 gives exactly the base model.
        """
        if image is not None and image_tokens is not None:
            raise ValueError("pass either image or image_tokens, not both.")
        scale = self.scale if scale is None else float(scale)
        tokens = None
        if scale != 0.0 and (image is not None or image_tokens is not None):
            tokens = self.encode_image(image) if image is not None else image_tokens
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[-1] != self.token_dim:
                shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise ValueError(f"image_tokens must have shape (B, N, {self.token_dim}), got {shape}.")
            if tokens.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"the image prompt has batch size {tokens.shape[0]}; expected 1 or {x.shape[0]} (that of x)."
                )
            tokens = tokens.expand(x.shape[0], -1, -1)
        prompt = self.__dict__["_prompt"]
        if not prompt.lock.acquire(blocking=False):
            raise RuntimeError("this IPAdapter is already running a forward (in another thread): its image prompt is "
                               "shared state, so use one adapter per thread (or DistributedDataParallel, not "
                               "DataParallel).")
        # a checkpointing base recomputes blocks in backward, reading the prompt then: keep it until that backward
        keep = getattr(self.base, "use_checkpoint", False) and self.base.training and torch.is_grad_enabled()
        try:
            prompt.generation += 1
            generation = prompt.generation
            prompt.tokens, prompt.scale = tokens, scale
            out = self.base(x, timesteps, context=context)
        except BaseException:
            keep = False  # no backward will follow
            raise
        finally:
            if not keep:
                prompt.clear()
            prompt.lock.release()
        if keep and tokens is not None and tokens.requires_grad:
            tokens.register_hook(functools.partial(_prompt_consumed, prompt, generation))
        return out

    def remove(self) -> nn.Module:
        """Uninstall: restore the base's processors, remove the hooks; returns the (still frozen) base."""
        for attn, proc in self._replaced:
            attn.set_processor(proc)
        for handle in self._handles:
            handle.remove()
        self._replaced, self._handles = [], []
        self.__dict__["_prompt"].clear()
        return self.base

    # -- saving and loading ----------------------------------------------------------------------------------------

    def _own_state(self) -> dict[str, dict[str, torch.Tensor]]:
        ip: dict[str, torch.Tensor] = {}
        for key, proc in self.ip_layers.items():
            ip.update({f"{_path(key)}.{k}": v for k, v in proc.state_dict().items()})
        for key, block in self.added_blocks.items():
            ip.update({f"{_path(key)}.ip_block.{k}": v for k, v in block.state_dict().items()})
        return {"image_proj": dict(self.image_proj.state_dict()), "ip_adapter": ip}

    def adapter_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's weights alone: ``{"image_proj": {...}, "ip_adapter": {...}}``.

        ``ip_adapter`` keys are module paths in the base: ``"<attention path>.to_k_ip.weight"`` for the processors
        (e.g. ``"down.4.attn.to_k_ip.weight"``), ``"<residual block path>.ip_block.<...>"`` for added blocks.
        """
        return {sec: {k: v.detach().clone() for k, v in d.items()} for sec, d in self._own_state().items()}

    def check_adapter_state(self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "the file") -> None:
        """Raise ``ValueError`` naming the first key that is missing, unexpected or of another shape."""
        if not isinstance(state, Mapping) or set(state) - {"meta"} != {"image_proj", "ip_adapter"}:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{source} is not IP-Adapter weights: expected keys 'image_proj' and 'ip_adapter', got {found}."
            )
        for section, own in self._own_state().items():
            theirs = state[section]
            if not isinstance(theirs, Mapping):
                raise ValueError(f"{source}: {section!r} must be a dict of tensors, got {type(theirs).__name__}.")
            where = "this base" if section == "ip_adapter" else "this adapter"
            for key, value in own.items():
                if key not in theirs:
                    raise ValueError(
                        f"{section}: {key!r} (shape {_shape(value)}) of {where} is missing in {source}; it was "
                        "saved from an adapter of another configuration (sites, projection) or for another base."
                    )
                if not isinstance(theirs[key], torch.Tensor):
                    raise ValueError(f"{section}: {key!r} in {source} is a {type(theirs[key]).__name__}, not a tensor.")
                if _shape(theirs[key]) != _shape(value):
                    raise ValueError(
                        f"{section}: {key!r} has shape {_shape(theirs[key])} in {source} but {_shape(value)} in "
                        f"{where}; load it onto a base of the architecture it was trained with."
                    )
            extra = [k for k in theirs if k not in own]
            if extra:
                raise ValueError(
                    f"{section}: {source} has {extra[0]!r} (shape {_shape(theirs[extra[0]])}) that {where} lacks "
                    f"({len(extra)} such key(s)); it was saved from an adapter of another configuration."
                )

    @torch.no_grad()
    def load_adapter_state_dict(
        self, state: Mapping[str, Mapping[str, torch.Tensor]], source: str = "the state"
    ) -> None:
        """Load weights from :meth:`adapter_state_dict` (checked first, see :meth:`check_adapter_state`)."""
        self.check_adapter_state(state, source)
        for section, own in self._own_state().items():
            for key, value in own.items():
                value.copy_(state[section][key])

    def provenance(self) -> dict[str, Any]:
        """What the adapter's weights only make sense with: the fingerprints (:func:`weights_fingerprint`) of the
        frozen image encoder and base, and the feature / token widths. Saved under ``"meta"`` by
        :meth:`save_adapter` and checked by :meth:`load_adapter`."""
        encoder = getattr(self.image_encoder, "encoder", None) if self.image_encoder is not None else None
        return {"image_encoder": weights_fingerprint(encoder), "image_encoder_class": type(encoder).__name__
                if encoder is not None else None, "base": weights_fingerprint(self.base),
                "feature_dim": int(self.feature_dim), "token_dim": int(self.token_dim)}

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write :meth:`adapter_state_dict` (CPU tensors) and :meth:`provenance` (``"meta"``) to ``path`` atomically
        (temporary file + rename)."""
        from ..io import atomic_write_bytes

        buffer = io.BytesIO()
        state: dict[str, Any] = {sec: {k: v.cpu() for k, v in d.items()} for sec, d in self.adapter_state_dict().items()}
        state["meta"] = self.provenance()
        torch.save(state, buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    def load_adapter(self, path: str | os.PathLike, check_encoder: bool = True) -> None:
        """Load weights written by :meth:`save_adapter` (``torch.load(weights_only=True)``) onto this base.

        A file that records its image encoder (``"meta"``) is refused when this adapter's encoder has other weights
        (the projection learnt that encoder's features; ``check_encoder=False`` skips the check); a base with other
        weights only warns (IP-Adapters are meant to carry over to fine-tuned versions of their base).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"IP-Adapter weights {path} do not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"Could not load IP-Adapter weights {path} with weights_only=True ({type(err).__name__}: {err})."
            ) from err
        self.check_adapter_state(state, source=str(path))
        meta = state.get("meta")
        if isinstance(meta, Mapping):
            own = self.provenance()
            if check_encoder and meta.get("image_encoder") and meta.get("image_encoder") != own["image_encoder"]:
                raise ValueError(
                    f"{path} was trained with another image encoder ({meta.get('image_encoder_class')} with weights "
                    f"{str(meta['image_encoder'])[:12]}..., this adapter's is {own['image_encoder_class']} with "
                    f"{str(own['image_encoder'])[:12]}...); use the encoder it was trained with (--image_encoder_*) "
                    "or pass check_encoder=False."
                )
            if meta.get("base") and meta.get("base") != own["base"]:
                warnings.warn(f"{path} was trained on a base with other weights ({str(meta['base'])[:12]}..., this "
                              f"base: {str(own['base'])[:12]}...); fine for a fine-tuned version of that base, "
                              "wrong for an unrelated one.", stacklevel=2)
        self.load_adapter_state_dict(state, source=str(path))


# -- condition dropout for classifier-free guidance ------------------------------------------------------------------


class DroppedConditions(NamedTuple):
    """Conditions after :class:`ConditionDropout`: tokens / context with dropped rows replaced, and the masks."""

    image_tokens: torch.Tensor | None
    context: torch.Tensor | None
    drop_image: torch.Tensor
    drop_context: torch.Tensor


class ConditionDropout:
    """Per-sample condition dropout for classifier-free guidance (IP-Adapter: 5% image, 5% context, 5% both).

    Each sample independently: with probability ``image_rate`` only its image prompt is dropped, with
    ``context_rate`` only its context, with ``both_rate`` both, else neither (so the image is dropped with
    probability ``image_rate + both_rate``). A dropped image prompt becomes all-zero tokens (exactly the base, see
    the module docstring), a dropped context the null tokens (e.g. :meth:`ContextEmbedding.null`).

    Args:
        image_rate: probability of dropping only the image.
        context_rate: probability of dropping only the context.
        both_rate: probability of dropping both.

    Example:
        >>> dropout = ConditionDropout()
        >>> drop_image, drop_context = dropout.masks(4, generator=torch.Generator().manual_seed(0))
        >>> drop_image.dtype, drop_image.shape
        (torch.bool, torch.Size([4]))
    """

    def __init__(self, image_rate: float = 0.05, context_rate: float = 0.05, both_rate: float = 0.05) -> None:
        rates = {"image_rate": image_rate, "context_rate": context_rate, "both_rate": both_rate}
        for name, rate in rates.items():
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}.")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"image_rate + context_rate + both_rate must be <= 1, got {sum(rates.values())}.")
        self.image_rate, self.context_rate, self.both_rate = float(image_rate), float(context_rate), float(both_rate)

    def masks(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(drop_image, drop_context)``, two ``(batch_size,)`` bool masks."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        u = torch.rand(batch_size, generator=generator, device=generator.device if generator is not None else device)
        a, b, c = self.image_rate, self.context_rate, self.both_rate
        both = (u >= a + b) & (u < a + b + c)
        drop_image = (u < a) | both
        drop_context = ((u >= a) & (u < a + b)) | both
        if device is not None:
            drop_image, drop_context = drop_image.to(device), drop_context.to(device)
        return drop_image, drop_context

    def __call__(
        self,
        image_tokens: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        null_context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DroppedConditions:
        """Apply dropout to a batch.

        Args:
            image_tokens: ``(B, N, token_dim)`` (from :meth:`IPAdapter.encode_image`), or None.
            context: ``(B, M, context_dim)`` base context tokens, or None.
            null_context: ``(1 or B, M, context_dim)`` tokens that replace a dropped context (required with one).
            generator: for reproducible masks.
        """
        present = [t for t in (image_tokens, context) if t is not None]
        if not present:
            raise ValueError("ConditionDropout needs image_tokens and/or context.")
        batch = present[0].shape[0]
        if any(t.ndim != 3 or t.shape[0] != batch for t in present):
            raise ValueError(
                f"image_tokens and context must be (B, N, dim) with the same B, got "
                f"{[tuple(t.shape) for t in present]}."
            )
        drop_image, drop_context = self.masks(batch, generator, present[0].device)
        if image_tokens is not None:
            image_tokens = torch.where(drop_image[:, None, None], torch.zeros_like(image_tokens), image_tokens)
        if context is not None:
            if null_context is None:
                if self.context_rate + self.both_rate > 0:
                    raise ValueError("dropping the context needs null_context (e.g. ContextEmbedding.null(1)).")
            else:
                fits = null_context.ndim == 3 and null_context.shape[1:] == context.shape[1:]
                if not fits or null_context.shape[0] not in (1, batch):
                    raise ValueError(
                        f"null_context must have shape (1 or {batch}, {context.shape[1]}, {context.shape[2]}), "
                        f"got {tuple(null_context.shape)}."
                    )
                null = null_context.to(context.dtype).expand_as(context)
                context = torch.where(drop_context[:, None, None], null, context)
        return DroppedConditions(image_tokens, context, drop_image, drop_context)
