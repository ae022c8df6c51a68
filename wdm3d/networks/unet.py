"""The WDM 3D U-Net (guided-diffusion style) and its 128^3 / 256^3 presets.

One module because it is one network: :class:`WDMUNet`, its residual block, the anchors where conditioning attaches
and the presets that size it are read together.

Why not MONAI's ``DiffusionModelUNet``: it concatenates skip connections (and offers no gradient checkpointing).
WDM adds them, ``h = (h + skip) / 2``, with each decoder block producing the width of the next skip; that keeps
the decoder convolutions at the encoder's width. With the WDM widths MONAI's network has 81.7M parameters where
WDM has 57.9M, and its decoder activations are larger, which matters at 256^3. This module implements the WDM
structure, with optional concatenated skips, gradient checkpointing and the MONAI call signature
``model(x, timesteps, context=None)`` so that MONAI's inferers and our diffusion code drive either network.
:func:`monai_unet` builds MONAI's network with the same widths for comparison.

Structure (per the WDM paper/repo): input conv; per level ``num_res_blocks`` residual blocks then (except at the
last level) a residual block that average-pools; a middle of two residual blocks; per level (reversed)
``num_res_blocks + 1`` residual blocks, the last of which (except at level 0) upsamples by nearest neighbour;
GroupNorm + SiLU + zero-initialised output conv. Each residual block adds a projection of the time embedding
(sinusoidal -> Linear -> SiLU -> Linear, width ``4 * base_channels``) and has a zero-initialised second conv, so
a fresh network outputs zeros.

Optional cross-attention conditioning (off by default; with ``context_dim=None`` the network, its parameter count
and its state_dict keys are exactly WDM's): a :class:`~wdm3d.networks.attention.CrossAttentionBlock` after every
non-resampling residual block of the chosen levels (encoder and decoder, as in guided-diffusion/LDM) and between
the two middle blocks, attending to context tokens ``(B, N, context_dim)`` such as
:class:`~wdm3d.networks.attention.ContextEmbedding`'s (modality, dataset), the analogue of text conditioning.
The blocks' output projections are zero-initialised, so a fresh conditioned network still outputs zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, get_timestep_embedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttentionBlock, ImagePrompt
from .scripting import shape_repr
from .time_embedding import interval_mlp, interval_values

__all__ = [
    "WDMUNet",
    "ResBlock",
    "AttentionAnchor",
    "wdm_unet",
    "monai_unet",
    "PRESETS",
    "count_parameters",
    "default_attention_levels",
]

#: WDM's U-Net settings by image size (the network runs on the wavelet grid, half the image size).
PRESETS: dict[str, dict] = {
    "wdm_128": {"base_channels": 64, "channel_mult": (1, 2, 2, 4, 4), "num_res_blocks": 2},
    "wdm_256": {"base_channels": 64, "channel_mult": (1, 2, 2, 4, 4, 4), "num_res_blocks": 2},
}


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with a time-embedding bias and optional 2x resampling.

    ``(B, in_ch, D, H, W), (B, emb_dim) -> (B, out_ch, D', H', W')`` with ``D' = D/2`` (down), ``2D`` (up) or ``D``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        emb_dim: width of the time embedding.
        norm_num_groups: GroupNorm groups (must divide both channel counts).
        dropout: dropout before the second convolution.
        resample: None, ``"down"`` (average pooling) or ``"up"`` (nearest), applied after the first norm/SiLU
            to the residual branch and to the skip path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}.")
        for ch in (in_channels, out_channels):
            if ch % norm_num_groups:
                raise ValueError(f"norm_num_groups={norm_num_groups} must divide the channel count {ch}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resample = resample
        # what forward reads: TorchScript cannot compare an attribute that may be None with a string
        self._resample_mode = resample or ""
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def _resample(self, t: torch.Tensor) -> torch.Tensor:
        if self._resample_mode == "down":
            return F.avg_pool3d(t, 2)
        if self._resample_mode == "up":
            return F.interpolate(t, scale_factor=2.0, mode="nearest")
        return t

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        h = h + self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(self._resample(x)) + h


def default_attention_levels(num_levels: int) -> tuple[bool, ...]:
    """Cross-attention at every level but the first (full-resolution) one: context tokens are global conditions,
    and the first level has 8x the voxels of the second."""
    return tuple(level > 0 for level in range(num_levels))


class AttentionAnchor(NamedTuple):
    """A residual block after which a cross-attention block sits (or could sit).

    Attributes:
        path: the residual block's module path in the network, e.g. ``"down.3"``, ``"middle.0"``, ``"up.4.0"``.
        level: its level (0 = full resolution), or None for the middle.
        channels: its output channels.
        attention: the path of the network's own cross-attention block after it, or None if it has none.
    """

    path: str
    level: int | None
    channels: int
    attention: str | None


class WDMUNet(nn.Module):
    """3D U-Net for wavelet-domain diffusion (WDM's network, written anew).

    ``(B, in_channels, D, H, W), (B,) -> (B, out_channels, D, H, W)``; D, H, W must be divisible by
    ``2 ** (len(channel_mult) - 1)``.

    Args:
        in_channels: input channels (8 per image channel for a one-level DWT).
        out_channels: output channels.
        base_channels: width of the first level (WDM: 64).
        channel_mult: width multipliers per level (WDM: (1,2,2,4,4) at 128^3, (1,2,2,4,4,4) at 256^3).
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        norm_num_groups: GroupNorm groups.
        dropout: dropout inside residual blocks.
        additive_skips: True (WDM): ``h = (h + skip) / 2``; False: concatenate as in the original U-Net.
        use_checkpoint: recompute residual (and attention) blocks in the backward pass (less memory, ~30% more
            compute); only active while training with gradients enabled.
        context_dim: width of the context tokens; None (default): no cross-attention, no ``context``.
        attention_levels: per level, whether its residual blocks are followed by cross-attention (needs
            ``context_dim``); default with a ``context_dim``: every level but the first
            (:func:`default_attention_levels`).
        attention_middle: cross-attention between the two middle blocks (with a ``context_dim``).
        num_heads: attention heads per block (must divide every attended width); takes precedence over ``head_dim``.
        head_dim: width per attention head when ``num_heads`` is None (capped at the block's width).
        fp32_io: run ``conv_in`` and ``conv_out`` (the convolutions on the 8 wavelet channels) in fp32 even under
            autocast. A performance switch for bf16 training: on an H100, cuDNN's bf16 weight-gradient kernel for
            one 8-channel convolution took 142 ms of a 374 ms step (see BENCHMARKS.md); the rest of the network
            keeps bf16 (``conv_in``'s output is cast back). Without autocast, or on a model cast to bf16, it changes
            nothing.
        interval_embedding: also take a second time, the ``interval`` of a flow map (``t - r`` in timestep units:
            :mod:`wdm3d.diffusion.flow_map`), embedded like ``timesteps`` (sinusoids, then an MLP of the same shape)
            and added to their embedding. The MLP's last layer starts at zero, so a new network equals the one
            without it; False (default) adds no parameters.

    Example:
        >>> net = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4)
        >>> net(torch.randn(2, 8, 8, 8, 8), torch.tensor([1, 500])).shape
        torch.Size([2, 8, 8, 8, 8])
        >>> cond = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, context_dim=16)
        >>> cond(torch.randn(2, 8, 8, 8, 8), torch.tensor([1, 500]), context=torch.randn(2, 3, 16)).shape
        torch.Size([2, 8, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 8,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        additive_skips: bool = True,
        use_checkpoint: bool = False,
        context_dim: int | None = None,
        attention_levels: Sequence[bool] | None = None,
        attention_middle: bool = True,
        num_heads: int | None = None,
        head_dim: int = 32,
        fp32_io: bool = False,
        interval_embedding: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError("in_channels, out_channels, base_channels and num_res_blocks must all be >= 1.")
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive integers, got {channel_mult}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels = base_channels
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.num_res_blocks = num_res_blocks
        self.additive_skips = additive_skips
        self.use_checkpoint = use_checkpoint
        self.fp32_io = bool(fp32_io)
        self.norm_num_groups = norm_num_groups
        levels = self._check_attention(context_dim, attention_levels, attention_middle, num_heads, head_dim)
        self.context_dim = context_dim
        self.attention_levels = levels if context_dim is not None else None
        self.attention_middle = bool(attention_middle)
        self.num_heads, self.head_dim = num_heads, head_dim
        emb_dim = 4 * base_channels
        self._anchors = []  # list[AttentionAnchor] (unannotated: TorchScript warns about annotations here)
        self.__dict__["_anchor_processors"] = {}  # anchor path -> processor (see set_anchor_processor)

        def block(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, norm_num_groups, dropout, resample)

        def attention(channels: int) -> CrossAttentionBlock:
            return CrossAttentionBlock(channels, context_dim, num_heads, head_dim, norm_num_groups)

        def anchor(path: str, level: int | None, channels: int, with_attention: bool, attention_path: str) -> None:
            self._anchors.append(AttentionAnchor(path, level, channels, attention_path if with_attention else None))

        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.interval_embedding = bool(interval_embedding)
        self.interval_embed = interval_mlp(base_channels, emb_dim) if interval_embedding else None
        self.conv_in = nn.Conv3d(in_channels, base_channels, 3, padding=1)

        # encoder: every module's output is a skip
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, mult * base_channels))
                ch = mult * base_channels
                anchor(f"down.{len(self.down) - 1}", level, ch, levels[level], f"down.{len(self.down)}")
                if levels[level]:  # attends in place: the attended output is the skip
                    self.down.append(attention(ch))
                skip_channels.append(ch)
            if level < len(self.channel_mult) - 1:
                self.down.append(block(ch, ch, "down"))
                skip_channels.append(ch)

        with_middle = context_dim is not None and self.attention_middle
        self.middle = nn.ModuleList([block(ch, ch), *([attention(ch)] if with_middle else []), block(ch, ch)])
        anchor("middle.0", None, ch, with_middle, "middle.1")

        # decoder: one module list per decoder step, consuming one skip each
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                if additive_skips:
                    # output the width of the next skip so that (h + skip) / 2 is defined
                    cin, cout = ch, (skip_channels[-1] if skip_channels else base_channels)
                else:
                    cin, cout = ch + skip, mult * base_channels
                step = nn.ModuleList([block(cin, cout)])
                anchor(f"up.{len(self.up)}.0", level, cout, levels[level], f"up.{len(self.up)}.1")
                if levels[level]:
                    step.append(attention(cout))
                if level > 0 and i == num_res_blocks:
                    step.append(block(cout, cout, "up"))
                self.up.append(step)
                ch = cout

        self.norm_out = nn.GroupNorm(norm_num_groups, ch)
        self.conv_out = _zero(nn.Conv3d(ch, out_channels, 3, padding=1))
        self._factor = 2 ** (len(self.channel_mult) - 1)

    def _check_attention(
        self,
        context_dim: int | None,
        attention_levels: Sequence[bool] | None,
        attention_middle: bool,
        num_heads: int | None,
        head_dim: int,
    ) -> tuple[bool, ...]:
        n = len(self.channel_mult)
        if context_dim is None:
            if attention_levels is not None and any(attention_levels):
                raise ValueError("attention_levels needs context_dim (the width of the context tokens) to be set.")
            return (False,) * n
        if not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer or None, got {context_dim!r}.")
        levels = default_attention_levels(n) if attention_levels is None else tuple(bool(a) for a in attention_levels)
        if len(levels) != n:
            raise ValueError(f"attention_levels must have one entry per level ({n}), got {list(attention_levels)}.")
        if not any(levels) and not attention_middle:
            raise ValueError(
                f"context_dim={context_dim} but no cross-attention block: enable a level in attention_levels or "
                "attention_middle (or set context_dim=None)."
            )
        if num_heads is None and (head_dim is None or head_dim < 1):
            raise ValueError(f"head_dim must be a positive integer when num_heads is None, got {head_dim!r}.")
        return levels

    def __prepare_scriptable__(self) -> WDMUNet:
        # torch.jit.script calls this first; forward hooks and anchor processors are Python objects
        hooked = [name for name, m in self.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        hooked += sorted(self.__dict__["_anchor_processors"])
        if hooked:
            raise RuntimeError(
                f"cannot script a WDMUNet with forward hooks or anchor processors on {hooked[:3]}: TorchScript cannot "
                "compile them and the scripted network would differ. Remove them first (an installed IPAdapter: "
                "adapter.remove())."
            )
        return self

    def set_anchor_processor(
        self, path: str, processor: Callable[[torch.Tensor, ImagePrompt], torch.Tensor] | None
    ) -> None:
        """Install (or, with None, remove) a processor after the residual block at an anchor.

        The processor runs on the block's output when a call carries an image prompt,
        ``h = processor(h, image_prompt)``, and not otherwise; this is how an add-on attaches image cross-attention
        where this network has none (:class:`~wdm3d.networks.IPAdapter`'s added blocks) without editing it. Like
        attention processors, it is not a registered submodule: its owner saves and moves its parameters.

        Args:
            path: an anchor's path in this network (:meth:`attention_anchors`), e.g. ``"down.3"``.
            processor: ``(h, image_prompt) -> h``, or None to remove the one installed.
        """
        paths = {a.path for a in self._anchors}
        if path not in paths:
            raise ValueError(f"{path!r} is not an anchor of this WDMUNet; anchors: {sorted(paths)}.")
        if processor is None:
            self.__dict__["_anchor_processors"].pop(path, None)
        elif not callable(processor):
            raise TypeError(f"an anchor processor must be callable, got {type(processor).__name__}.")
        else:
            self.__dict__["_anchor_processors"][path] = processor

    __jit_unused_properties__ = ("anchor_processors",)  # Python callables, not part of a scripted module

    @property
    def anchor_processors(self) -> dict[str, Callable[[torch.Tensor, ImagePrompt], torch.Tensor]]:
        """The installed anchor processors by anchor path (a copy)."""
        return dict(self.__dict__["_anchor_processors"])

    def attention_anchors(self, levels: Sequence[int] | None = None, middle: bool = True) -> list[AttentionAnchor]:
        """The residual blocks after which cross-attention sits (or would sit), encoder, middle, decoder order.

        Every non-resampling residual block of a level is an anchor, plus the first middle block. Add-ons that attach
        blocks without editing this network (:class:`~wdm3d.networks.ip_adapter.IPAdapter`) hook these modules.

        Args:
            levels: the levels to list (0 = full resolution); None: all.
            middle: include the middle anchor.
        """
        n = len(self.channel_mult)
        if levels is not None:
            bad = [lv for lv in levels if not isinstance(lv, int) or not 0 <= lv < n]
            if bad:
                raise ValueError(f"levels must be integers in [0, {n}), got {list(levels)}.")
        return [
            a
            for a in self._anchors
            if (a.level is None and middle) or (a.level is not None and (levels is None or a.level in levels))
        ]

    def _io(self, conv: nn.Conv3d, h: torch.Tensor, back_to_autocast: bool = False) -> torch.Tensor:
        # the input/output convolution, in fp32 outside autocast when fp32_io asks for it (an fp32 model only: a model
        # cast to bf16 has bf16 weights). ``back_to_autocast``: return the autocast dtype, so that the fp32 output of
        # conv_in does not promote the full-resolution level (its residual stream and skips) to fp32 as well
        device = h.device.type
        if self.fp32_io and conv.weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                out = conv(h.float())
            return out.to(torch.get_autocast_dtype(device)) if back_to_autocast else out
        return conv(h)

    def _run(self, blk: Callable[..., torch.Tensor], h: torch.Tensor, *cond: object) -> torch.Tensor:
        # cond: the time embedding for residual blocks, the context (and image prompt) for attention blocks, the
        # image prompt for anchor processors
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(blk, h, *cond, use_reentrant=False)
        return blk(h, *cond)

    def _after_anchor(self, path: str, h: torch.Tensor, image_prompt: ImagePrompt) -> torch.Tensor:
        processor = self.__dict__["_anchor_processors"].get(path)
        return h if processor is None else self._run(processor, h, image_prompt)

    def _check_image_prompt(self, image_prompt: ImagePrompt, x: torch.Tensor) -> None:
        if not isinstance(image_prompt, ImagePrompt):
            raise TypeError(f"image_prompt must be an ImagePrompt, got {type(image_prompt).__name__}.")
        if self.context_dim is None and not self.__dict__["_anchor_processors"]:
            raise ValueError(
                "an image prompt reached a WDMUNet without cross-attention or anchor processors, where nothing reads "
                "it: install an IPAdapter on this network, or call it without image_prompt."
            )
        tokens, scale, places = image_prompt.tokens, image_prompt.scale, image_prompt.places
        b = x.shape[0]
        if tokens.ndim != 3 or tokens.shape[0] != b:
            raise ValueError(f"image_prompt.tokens must have shape ({b}, N, dim), got {tuple(tokens.shape)}.")
        if scale.shape != (b,):
            raise ValueError(
                f"image_prompt.scale must have shape ({b},) (one lambda per sample), got {tuple(scale.shape)}."
            )
        if places is not None and (places.ndim != 2 or places.shape[0] != tokens.shape[1]):
            raise ValueError(
                f"image_prompt.places must have shape ({tokens.shape[1]}, P), one row per token, "
                f"got {tuple(places.shape)}."
            )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}.")
        if any(s < 1 or s % self._factor for s in x.shape[2:]):
            raise ValueError(
                f"spatial sizes must be divisible by {self._factor} for {len(self.channel_mult)} levels, "
                f"got {tuple(x.shape[2:])}."
            )

    def _check_context(self, context: torch.Tensor | None, x: torch.Tensor) -> None:
        if self.context_dim is None:
            if context is not None:
                raise ValueError("WDMUNet has no cross-attention and takes no context; pass context=None.")
            return
        if context is None:
            raise ValueError(
                f"this WDMUNet has cross-attention (context_dim={self.context_dim}) and needs context tokens "
                f"(B, N, {self.context_dim}); for unconditional output pass null tokens (ContextEmbedding.null)."
            )
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != self.context_dim:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, N, {self.context_dim}) (context_dim), got {shape}.")
        if context.shape[0] not in (1, x.shape[0]) or context.shape[1] < 1:
            raise ValueError(
                f"context must have batch size 1 or {x.shape[0]} (that of x) and at least one token, "
                f"got {tuple(context.shape)}."
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, D, H, W)``.
            timesteps: ``(B,)`` (or a scalar) diffusion timesteps, integer or float.
            context: ``(B, N, context_dim)`` (or ``(1, N, context_dim)``, broadcast) context tokens; required with
                a ``context_dim``, must be None without.
            interval: ``(B,)`` (or a scalar) flow-map interval ``t - r`` in timestep units; needs
                ``interval_embedding`` (None: a network with it treats the interval as 0, the instantaneous
                velocity).
            image_prompt: image tokens and per-sample lambda (:class:`~wdm3d.networks.attention.ImagePrompt`),
                passed to the attention processors and anchor processors an installed
                :class:`~wdm3d.networks.IPAdapter` put there; nothing else reads it, and nothing keeps it after the
                call. Not part of the TorchScript form.
        """
        # TorchScript (torch.jit.script, MONAI's ckpt_export) compiles only the scripting branches below: no
        # eager-only input checks, no gradient checkpointing, no fp32_io switch, no image prompt (see
        # wdm3d.networks.scripting)
        if not torch.jit.is_scripting():
            self._check_input(x)
            self._check_context(context, x)
            if image_prompt is not None:
                self._check_image_prompt(image_prompt, x)
        if context is not None:
            context = context.expand(x.shape[0], -1, -1).to(x.dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0 or (timesteps.ndim == 1 and timesteps.shape[0] == 1):
            timesteps = timesteps.reshape(()).expand(x.shape[0])
        if timesteps.ndim != 1 or timesteps.shape[0] != x.shape[0]:
            # (a batch-1 x with B timesteps would otherwise broadcast into a batch of B outputs without an error)
            raise ValueError(
                f"timesteps must be a scalar or have shape ({x.shape[0]},) (the batch of x), got "
                f"{shape_repr(timesteps.shape)}."
            )
        emb = self.time_embed(get_timestep_embedding(timesteps, self.base_channels).to(x.dtype))
        if self.interval_embed is not None:
            gap = interval_values(interval, timesteps)
            emb = emb + self.interval_embed(get_timestep_embedding(gap, self.base_channels).to(x.dtype))
        elif interval is not None:
            raise ValueError("this network takes no interval: build it with interval_embedding=True (a flow map).")

        h = self.conv_in(x) if torch.jit.is_scripting() else self._io(self.conv_in, x, back_to_autocast=True)
        skips = [h]
        # the lists hold residual blocks (which take the time embedding) and cross-attention blocks (the context).
        # Told apart by hasattr, which TorchScript resolves at compile time: its isinstance is False for modules of
        # one class with different submodules (compiled as distinct types), e.g. ResBlocks with and without a skip conv
        # eager: after each anchor (a residual block, see attention_anchors) an installed anchor processor may run
        for i, blk in enumerate(self.down):
            if hasattr(blk, "emb_proj"):
                if torch.jit.is_scripting():
                    h = blk(h, emb)
                else:
                    h = self._run(blk, h, emb)
                    if image_prompt is not None:  # (no path strings on the plain hot path)
                        h = self._after_anchor(f"down.{i}", h, image_prompt)
                skips.append(h)
            else:  # attends in place: the attended output is the skip
                assert context is not None  # checked above: a network with cross-attention has its context
                h = blk(h, context) if torch.jit.is_scripting() else self._run(blk, h, context, image_prompt)
                skips[-1] = h
        for i, blk in enumerate(self.middle):
            if hasattr(blk, "emb_proj"):
                if torch.jit.is_scripting():
                    h = blk(h, emb)
                else:
                    h = self._run(blk, h, emb)
                    if image_prompt is not None:
                        h = self._after_anchor(f"middle.{i}", h, image_prompt)
            else:
                assert context is not None
                h = blk(h, context) if torch.jit.is_scripting() else self._run(blk, h, context, image_prompt)
        for j, step in enumerate(self.up):
            skip = skips.pop()
            h = (h + skip) / 2 if self.additive_skips else torch.cat((h, skip), dim=1)
            for k, blk in enumerate(step):
                if hasattr(blk, "emb_proj"):
                    if torch.jit.is_scripting():
                        h = blk(h, emb)
                    else:
                        h = self._run(blk, h, emb)
                        if image_prompt is not None:
                            h = self._after_anchor(f"up.{j}.{k}", h, image_prompt)
                else:
                    assert context is not None
                    h = blk(h, context) if torch.jit.is_scripting() else self._run(blk, h, context, image_prompt)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h) if torch.jit.is_scripting() else self._io(self.conv_out, h)


def wdm_unet(preset: str = "wdm_128", in_channels: int = 8, out_channels: int | None = None, **overrides) -> WDMUNet:
    """Build a WDM U-Net preset.

    Args:
        preset: ``"wdm_128"`` (128^3 images, 64^3 wavelet grid; 57.91M parameters with 8 channels) or
            ``"wdm_256"`` (256^3 images, 128^3 grid; 83.16M).
        in_channels: 8 per modality; add conditioning channels here for concatenation conditioning.
        out_channels: defaults to ``in_channels``.
        overrides: any other :class:`WDMUNet` argument (``use_checkpoint=True`` for 256^3 training,
            ``context_dim=...`` for cross-attention conditioning, ...).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    kwargs = {**PRESETS[preset], **overrides}
    return WDMUNet(in_channels=in_channels, out_channels=out_channels or in_channels, **kwargs)


def monai_unet(preset: str = "wdm_128", in_channels: int = 8, out_channels: int | None = None, **overrides):
    """MONAI's ``DiffusionModelUNet`` with the widths of a WDM preset (concatenated skips, resampling in residual
    blocks, no attention). Same call signature as :class:`WDMUNet`; more parameters (81.73M at ``wdm_128``).

    Args:
        preset: a name of :data:`PRESETS`.
        in_channels: input channels (8 per image channel in wavelet space).
        out_channels: output channels (default ``in_channels``).
        overrides: further ``DiffusionModelUNet`` arguments.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    p = PRESETS[preset]
    channels = tuple(p["base_channels"] * m for m in p["channel_mult"])
    kwargs = dict(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        num_res_blocks=p["num_res_blocks"],
        channels=channels,
        attention_levels=[False] * len(channels),
        norm_num_groups=32,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return DiffusionModelUNet(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
