"""WF-VAE-3D: the Wavelet Flow VAE (Li et al., CVPR 2025) for volumes, with an exact causal cache along depth.

One module because it is one network: the encoder, the decoder and the VAE that runs them in chunks share the
causal-cache contract below, which is checked by reading them together.

What it is: a convolutional VAE whose encoder and decoder work on Haar wavelet coefficients, with an "energy flow"
path that routes the low-frequency wavelet pyramid of the volume past the backbone. The slice axis (depth, axis 2)
plays the role of time in the paper's video model.

Structure, with ``L = levels`` Haar levels and downsample factor ``f = 2**L`` per axis (input ``C`` channels):

- Encoder. ``w_1 = DWT(x)`` ``(B, 8C, D/2, ...)`` is the backbone's input (conv_in). Level ``i = 1..L`` runs
  ``num_res_blocks`` residual blocks at resolution ``/2**i``; between levels a stride-2 conv halves the resolution
  and the next level of the input's pyramid, ``w_i = DWT(LLL of w_{i-1})`` ``(B, 8C, D/2**i, ...)``, is injected:
  a 1x1x1 conv to ``energy_flow_channels``, concatenated to the features (energy flow). Then ``num_mid_blocks``
  residual blocks, norm, SiLU and a conv to ``2 * latent_channels`` (mean, log-variance).
- Decoder. conv_in and mid blocks at ``/f``; level ``i = L..1`` runs ``num_res_blocks + 1`` residual blocks and a
  head (norm, SiLU, conv) that predicts the ``8C`` coefficients ``c_i`` of that level; the lower level's inverse
  transform ``IDWT(c_{i+1})`` is added to the low-band (LLL) channels of ``c_i`` (energy flow upward); between
  levels nearest-neighbour x2 and a conv. Output ``= IDWT(c_1)``.
- The wavelet (WL) loss compares ``enc_coeffs = [w_1, ..., w_L]`` with ``dec_coeffs = [c_1, ..., c_L]`` (finest
  first, same shapes when ``out_channels == in_channels``). As we read the paper, its WL loss covers the
  energy-flow levels (``[1:]`` here); ``[0]`` is the finest prediction itself (``x_hat = IDWT(c_1)``), included so the
  loss can weight the finest level too, or drop it.

Departures from the paper's video model, each for the volume setting:

- No attention anywhere (the paper's mid-block attention is omitted: along depth it would break the cache, and within
  a slice it costs memory at these resolutions for little gain in a VAE).
- Depth downsampling is a conv with depth kernel = stride = 2 (not an overlapping causal strided conv): cache-free,
  and a volume has no "first frame" to keep apart, so depth and in-plane axes are halved together.
- Injection is a 1x1x1 conv then concatenation, and each decoder head is norm, SiLU, conv on the backbone features
  (not a separate channel split with its own residual branch): fewer moving parts, same energy-flow routes.
- Norms are per-voxel channel RMS norms (condition (b) of the cache).

Causality along depth, and why chunked inference is exact (see :mod:`wdm3d.networks.causal`):

- every conv is causal along depth (front padding / cache of ``k_d - 1`` slices) or has stride = kernel along depth
  (the downsampling convs, the Haar transforms, nearest-neighbour upsampling);
- the norms are per-voxel channel RMS norms (no statistics across depth; GroupNorm is not used);
- nothing else mixes slices (no attention).

So :meth:`WFVAE3D.encode_chunked` / :meth:`WFVAE3D.decode_chunked` give what :meth:`~WFVAE3D.encode` /
:meth:`~WFVAE3D.decode` give (to float rounding) provided encoder slabs are a multiple of ``f`` slices (every Haar level
and strided conv then sees whole groups); decoder slabs may have any length. Latent slice ``j`` depends on input slices
``< (j + 1) * f`` only, and output slices ``[j*f, (j+1)*f)`` on latent slices ``<= j`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..wavelets import haar_dwt3d, haar_idwt3d
from .causal import CausalConv3d, CausalDownsample3d, CausalResBlock3d, CausalUpsample3d, ChannelRMSNorm, causal_cache
from .scripting import TensorBlock, TensorModule
from .vae_base import LatentDistribution, VAEOutput, latent_sample

__all__ = ["WFVAE3D", "WFEncoder3D", "WFDecoder3D"]

_LEVELS = (1, 2, 3)


def _run(block: nn.Module, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    # recompute in backward only when a graph is being built, and never while the causal cache is on: the
    # recomputation would read the cache as it is at backward time (a later slab's), not as this forward saw it
    if use_checkpoint and torch.is_grad_enabled() and h.requires_grad and not _streaming(block):
        return checkpoint(block, h, use_reentrant=False)
    return block(h)


def _streaming(block: nn.Module) -> bool:
    return any(getattr(m, "_streaming", False) for m in block.modules() if isinstance(m, CausalConv3d))


class _NoUpsample(nn.Module):
    """The decoder's unused ``up[0]`` (the finest level is not upsampled); called like the upsamplers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class WFEncoder3D(nn.Module):
    """The WF-VAE encoder: Haar input, residual levels with the wavelet pyramid injected, moments out.

    ``(B, C, D, H, W) -> (B, 2Z, D/f, H/f, W/f)`` moments, plus the pyramid ``[w_1, ..., w_L]`` with ``w_i`` of
    shape ``(B, 8C, D/2**i, H/2**i, W/2**i)``.

    Args:
        in_channels: image channels ``C``.
        latent_channels: latent channels ``Z``.
        channels: backbone width per level (finest first), one per Haar level.
        num_res_blocks: residual blocks per level.
        num_mid_blocks: residual blocks at the coarsest level after the last injection.
        energy_flow_channels: width of each injected pyramid level; 0 builds no energy-flow path.
        use_checkpoint: recompute residual blocks in the backward pass.
        eps: epsilon of the norms.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        num_mid_blocks: int,
        energy_flow_channels: int,
        use_checkpoint: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.levels = len(channels)
        self.has_energy_flow = energy_flow_channels > 0
        self.energy_flow_channels = energy_flow_channels
        self.use_checkpoint = use_checkpoint
        self.conv_in = CausalConv3d(8 * in_channels, channels[0], 3)
        self.down = nn.ModuleList()
        self.inject = nn.ModuleList()
        self.blocks = nn.ModuleList()
        ch = channels[0]
        for i, width in enumerate(channels):
            if i > 0:
                self.down.append(CausalDownsample3d(ch, width))
                ch = width
                if self.has_energy_flow:
                    self.inject.append(CausalConv3d(8 * in_channels, energy_flow_channels, 1))
                    ch += energy_flow_channels
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(CausalResBlock3d(ch, width, eps=eps))
                ch = width
            if ch != width:  # num_res_blocks == 0 after an injection: still return to the level's width
                level.append(CausalResBlock3d(ch, width, eps=eps))
                ch = width
            self.blocks.append(level)
        self.mid = nn.ModuleList([CausalResBlock3d(ch, ch, eps=eps) for _ in range(num_mid_blocks)])
        self.norm_out = ChannelRMSNorm(ch, eps)
        self.conv_out = CausalConv3d(ch, 2 * latent_channels, 3)

    def forward(self, x: torch.Tensor, energy_flow: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            x: ``(B, C, D, H, W)`` with D, H, W divisible by ``2**levels`` (checked by :class:`WFVAE3D`).
            energy_flow: False feeds zeros instead of the injected pyramid levels (an ablation switch).

        Returns:
            moments ``(B, 2Z, D/f, H/f, W/f)`` and the pyramid ``[w_1, ..., w_L]``.
        """
        c = self.in_channels
        w = haar_dwt3d(x)
        pyramid = [w]
        h = self.conv_in(w)
        for i, level in enumerate(self.blocks):
            if i > 0:
                down: TensorBlock = self.down[i - 1]  # (an interface type: TorchScript indexes with a variable)
                h = down.forward(h) if torch.jit.is_scripting() else down(h)
                w = haar_dwt3d(w[:, :c])  # the next level of the input's pyramid: DWT of the previous LLL
                pyramid.append(w)
                if self.has_energy_flow:
                    if energy_flow:
                        inject: TensorBlock = self.inject[i - 1]
                        e = inject.forward(w) if torch.jit.is_scripting() else inject(w)
                    else:
                        e = h.new_zeros((h.shape[0], self.energy_flow_channels, h.shape[2], h.shape[3], h.shape[4]))
                    h = torch.cat((h, e), dim=1)
            for block in level:
                h = block(h) if torch.jit.is_scripting() else _run(block, h, self.use_checkpoint)
        for block in self.mid:
            h = block(h) if torch.jit.is_scripting() else _run(block, h, self.use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h))), pyramid


class WFDecoder3D(nn.Module):
    """The WF-VAE decoder: residual levels, a coefficient head per level, energy flow upward, inverse Haar out.

    ``(B, Z, d, h, w) -> (B, C, 2**L d, 2**L h, 2**L w)``, plus the predicted pyramid ``[c_1, ..., c_L]`` (finest
    first; only ``[c_1]`` without an energy-flow path).

    Args:
        out_channels: image channels ``C``.
        latent_channels: latent channels ``Z``.
        channels: backbone width per level (finest first), one per Haar level.
        num_res_blocks: residual blocks per level (each level runs ``num_res_blocks + 1``).
        num_mid_blocks: residual blocks right after conv_in.
        energy_flow: build the coefficient heads of the coarser levels and their upward path.
        use_checkpoint: recompute residual blocks and upsamplers in the backward pass.
        eps: epsilon of the norms.
    """

    def __init__(
        self,
        out_channels: int,
        latent_channels: int,
        channels: Sequence[int],
        num_res_blocks: int,
        num_mid_blocks: int,
        energy_flow: bool,
        use_checkpoint: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.levels = len(channels)
        self.has_energy_flow = energy_flow
        self.use_checkpoint = use_checkpoint
        ch = channels[-1]
        self.conv_in = CausalConv3d(latent_channels, ch, 3)
        self.mid = nn.ModuleList([CausalResBlock3d(ch, ch, eps=eps) for _ in range(num_mid_blocks)])
        # indexed by level, finest first (built coarse to fine); up[i] maps level i to level i - 1 (up[0] unused).
        # Each level is an nn.Sequential (state-dict keys as a ModuleList's) and the unused up[0] a _NoUpsample, so
        # that every list has one call signature: TorchScript runs them coarse to fine through an interface type.
        blocks: list[nn.Module] = [nn.Identity()] * self.levels
        heads: list[nn.Module] = [nn.Identity()] * self.levels
        up: list[nn.Module] = [_NoUpsample()] * self.levels
        for i in reversed(range(self.levels)):
            width = channels[i]
            level = nn.Sequential()
            for _ in range(num_res_blocks + 1):
                level.append(CausalResBlock3d(ch, width, eps=eps))
                ch = width
            blocks[i] = level
            if i == 0 or energy_flow:
                heads[i] = nn.Sequential(
                    ChannelRMSNorm(width, eps), nn.SiLU(), CausalConv3d(width, 8 * out_channels, 3)
                )
            if i > 0:
                up[i] = CausalUpsample3d(width, channels[i - 1])
                ch = channels[i - 1]
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.up = nn.ModuleList(up)

    def forward(self, z: torch.Tensor, energy_flow: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            z: ``(B, Z, d, h, w)``.
            energy_flow: False skips adding the lower level's inverse transform (an ablation switch).

        Returns:
            the volume ``(B, C, 2**L d, ...)`` and the predicted pyramid (finest first).
        """
        c = self.out_channels
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h) if torch.jit.is_scripting() else _run(block, h, self.use_checkpoint)
        coeffs: list[torch.Tensor] = []
        coarser: torch.Tensor | None = None
        for i in range(self.levels - 1, -1, -1):
            if torch.jit.is_scripting():  # no checkpointing; modules by interface type (see __init__)
                level: TensorModule = self.blocks[i]
                h = level.forward(h)
            else:
                for block in self.blocks[i]:
                    h = _run(block, h, self.use_checkpoint)
            if i == 0 or self.has_energy_flow:
                head: TensorModule = self.heads[i]
                pred = head.forward(h) if torch.jit.is_scripting() else head(h)
                if coarser is not None and energy_flow:
                    pred = torch.cat((pred[:, :c] + haar_idwt3d(coarser), pred[:, c:]), dim=1)
                coeffs.insert(0, pred)
                coarser = pred
            if i > 0:
                upsample: TensorBlock = self.up[i]
                h = upsample.forward(h) if torch.jit.is_scripting() else _run(upsample, h, self.use_checkpoint)
        return haar_idwt3d(coeffs[0]), coeffs


class WFVAE3D(nn.Module):
    """Wavelet Flow VAE for 3D volumes, causal along depth, with exact chunked encode/decode.

    ``x (B, C, D, H, W) -> z (B, Z, D/f, H/f, W/f) -> x_hat (B, C_out, D, H, W)`` with ``f = 2**levels``; D, H, W
    must be divisible by ``f``. See the module docstring for the structure and the causality rules.

    Args:
        in_channels: image channels (1 for a single MRI/CT modality).
        out_channels: reconstructed channels; None means ``in_channels``. The WL loss needs them equal.
        latent_channels: latent channels ``Z``.
        levels: Haar levels, 1, 2 or 3 (= log2 of the downsample factor per axis). 2 turns 128^3 into 32^3.
        base_channels: backbone width at the finest level (resolution ``/2``).
        channel_mult: width multipliers per level, finest first, one per level; None means ``(1, 2, 2)[:levels]``.
        num_res_blocks: residual blocks per encoder level (decoder levels have one more).
        num_mid_blocks: residual blocks at the latent resolution in the encoder and in the decoder.
        energy_flow: build the energy-flow path (pyramid injection in the encoder, coarse coefficient heads and the
            upward low-band path in the decoder). False builds the ablation without it. On a model built with it,
            setting the attribute ``model.energy_flow = False`` switches the path off (zeros injected, nothing added).
        energy_flow_channels: width of each injected pyramid level; None means ``base_channels // 2``.
        use_checkpoint: recompute residual blocks in the backward pass (less activation memory for 128^3/256^3
            training, ~30% more compute); only when gradients are being recorded.
        eps: epsilon of the per-voxel RMS norms.

    Example:
        >>> vae = WFVAE3D(latent_channels=4, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1)
        >>> x = torch.randn(1, 1, 16, 16, 16)
        >>> vae.encode(x).mean.shape
        torch.Size([1, 4, 4, 4, 4])
        >>> torch.allclose(vae.encode_chunked(x, 4).mean, vae.encode(x).mean, atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        latent_channels: int = 8,
        levels: int = 2,
        base_channels: int = 128,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 2,
        num_mid_blocks: int = 2,
        energy_flow: bool = True,
        energy_flow_channels: int | None = None,
        use_checkpoint: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("latent_channels", latent_channels, 1),
            ("base_channels", base_channels, 1),
            ("num_res_blocks", num_res_blocks, 0),
            ("num_mid_blocks", num_mid_blocks, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not isinstance(levels, int) or isinstance(levels, bool) or levels not in _LEVELS:
            raise ValueError(
                f"levels must be one of {_LEVELS} (Haar levels = log2 of the downsample factor), got {levels!r}."
            )
        if channel_mult is None:
            channel_mult = (1, 2, 2)[:levels]
        channel_mult = tuple(channel_mult)
        if len(channel_mult) != levels or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult must hold one positive integer per level ({levels} levels), got {channel_mult!r}."
            )
        if energy_flow_channels is None:
            energy_flow_channels = max(1, base_channels // 2)
        if not isinstance(energy_flow_channels, int) or energy_flow_channels < 1:
            raise ValueError(f"energy_flow_channels must be an integer >= 1 (or None), got {energy_flow_channels!r}.")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.latent_channels = latent_channels
        self.levels = levels
        self.downsample_factor = 2**levels
        self.base_channels = base_channels
        self.channel_mult = channel_mult
        self.num_res_blocks, self.num_mid_blocks = num_res_blocks, num_mid_blocks
        self.energy_flow_channels, self.eps = energy_flow_channels, eps  # all settings readable (checkpoint run_config)
        self.use_checkpoint = use_checkpoint
        self._built_energy_flow = bool(energy_flow) and levels > 1
        self.energy_flow = bool(energy_flow)
        channels = [base_channels * m for m in channel_mult]
        self.encoder = WFEncoder3D(
            in_channels,
            latent_channels,
            channels,
            num_res_blocks,
            num_mid_blocks,
            energy_flow_channels if self._built_energy_flow else 0,
            use_checkpoint,
            eps,
        )
        self.decoder = WFDecoder3D(
            out_channels,
            latent_channels,
            channels,
            num_res_blocks,
            num_mid_blocks,
            self._built_energy_flow,
            use_checkpoint,
            eps,
        )

    __jit_unused_properties__ = ("use_checkpoint",)  # TorchScript: the scripted network does not checkpoint

    @property
    def use_checkpoint(self) -> bool:
        """Gradient checkpointing of the encoder's and decoder's blocks; settable at run time (both follow)."""
        return self._use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        self._use_checkpoint = bool(value)
        for part in ("encoder", "decoder"):
            module = self._modules.get(part)
            if module is not None:
                module.use_checkpoint = self._use_checkpoint

    # ---------------------------------------------------------------------------------------------------------------
    # checks
    # ---------------------------------------------------------------------------------------------------------------

    def _energy_flow_on(self) -> bool:
        if self.energy_flow and not self._built_energy_flow and self.levels > 1:
            raise RuntimeError(
                "energy_flow=True on a WFVAE3D built with energy_flow=False: the path has no weights; build the "
                "model with energy_flow=True to use it."
            )
        return self.energy_flow

    def _check_volume(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, C, D, H, W), got {shape}.")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the model was built with in_channels={self.in_channels} "
                f"(shape {tuple(x.shape)})."
            )
        f = self.downsample_factor
        bad = [f"{ax}={s}" for ax, s in zip("DHW", x.shape[2:]) if s % f or s == 0]
        if bad:
            raise ValueError(
                f"x spatial sizes must be positive multiples of the downsample factor {f} (2**levels), got shape "
                f"{tuple(x.shape)} ({', '.join(bad)} not divisible); pad or crop the volume (depth included)."
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor of shape (B, Z, d, h, w), got {shape}.")
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating-point tensor, got dtype {z.dtype}.")
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f"z has {z.shape[1]} channels but the model has latent_channels={self.latent_channels} "
                f"(shape {tuple(z.shape)})."
            )

    @staticmethod
    def _check_chunk(chunk: int, multiple: int, what: str) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer number of {what} slices, got {chunk!r}.")
        if chunk % multiple:
            raise ValueError(
                f"encoder chunk must be a multiple of the downsample factor 2**levels = {multiple} (each Haar level "
                f"and strided conv needs whole groups of slices), got chunk={chunk}."
            )

    # ---------------------------------------------------------------------------------------------------------------
    # the autoencoder interface
    # ---------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _distribution(moments: torch.Tensor) -> LatentDistribution:
        mean, logvar = moments.chunk(2, dim=1)
        # clamped here too: a NamedTuple constructed by TorchScript code skips LatentDistribution's own clamp
        return LatentDistribution(mean=mean, logvar=logvar.clamp(-30.0, 20.0))

    @torch.jit.export  # (a TorchScript export of the network keeps encode and decode)
    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Posterior over the latent.

        Args:
            x: ``(B, in_channels, D, H, W)``, D, H, W divisible by ``downsample_factor``.

        Returns:
            a :class:`LatentDistribution` with mean and log-variance ``(B, Z, D/f, H/f, W/f)``.
        """
        if not torch.jit.is_scripting():
            self._check_volume(x)
        moments, _ = self.encoder(x, self._energy_flow_on())
        return self._distribution(moments)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Volume from a latent.

        Args:
            z: ``(B, latent_channels, d, h, w)``.

        Returns:
            ``(B, out_channels, f*d, f*h, f*w)``.
        """
        if not torch.jit.is_scripting():
            self._check_latent(z)
        x, _ = self.decoder(z, self._energy_flow_on())
        return x

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """Training forward: encode, sample (or take the mean), decode.

        Args:
            x: ``(B, in_channels, D, H, W)``, D, H, W divisible by ``downsample_factor``.
            sample: draw ``z`` from the posterior (True) or use its mean (False).

        Returns:
            :class:`VAEOutput` with ``enc_coeffs = [w_1, ..., w_L]`` (the input's pyramid, ``w_i`` of shape
            ``(B, 8C, D/2**i, H/2**i, W/2**i)``) and ``dec_coeffs`` the decoder's predictions for the same levels
            (only level 1 on a model built without energy flow).
        """
        if not torch.jit.is_scripting():  # (TorchScript: see wdm3d.networks.scripting)
            self._check_volume(x)
        energy_flow = self._energy_flow_on()
        moments, enc_coeffs = self.encoder(x, energy_flow)
        posterior = self._distribution(moments)
        z = latent_sample(posterior) if sample else posterior.mean  # posterior.sample() / .mode()
        recon, dec_coeffs = self.decoder(z, energy_flow)
        extra_losses: dict[str, torch.Tensor] = {}
        return VAEOutput(
            reconstruction=recon,
            posterior=posterior,
            latent=z,
            enc_coeffs=enc_coeffs[: len(dec_coeffs)],
            dec_coeffs=dec_coeffs,
            extra_losses=extra_losses,
        )

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the conv that predicts the finest coefficients (the output layer, for the adaptive GAN weight)."""
        return self.decoder.heads[0][-1].weight

    # ---------------------------------------------------------------------------------------------------------------
    # chunked inference with the causal cache
    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_chunked(self, x: torch.Tensor, chunk: int) -> LatentDistribution:
        """:meth:`encode` slab by slab along depth, carrying the causal cache; same result, flat peak memory.

        Only one slab's activations and the cache (``k_d - 1`` slices per causal conv) live at a time; the latent
        slabs are concatenated at the end. Runs without autograd (inference).

        Args:
            x: ``(B, in_channels, D, H, W)``, D, H, W divisible by ``downsample_factor``.
            chunk: slices per slab, a multiple of ``downsample_factor``; the last slab may be shorter.

        Returns:
            the same :class:`LatentDistribution` as :meth:`encode` (to float rounding).
        """
        self._check_volume(x)
        self._check_chunk(chunk, self.downsample_factor, "input")
        energy_flow = self._energy_flow_on()
        parts = []
        with causal_cache(self.encoder):
            for start in range(0, x.shape[2], chunk):
                moments, _ = self.encoder(x[:, :, start : start + chunk], energy_flow)
                parts.append(moments)
        return self._distribution(torch.cat(parts, dim=2))

    @torch.no_grad()
    def decode_chunked(self, z: torch.Tensor, chunk: int) -> torch.Tensor:
        """:meth:`decode` slab by slab along depth, carrying the causal cache; same result, flat peak memory.

        Args:
            z: ``(B, latent_channels, d, h, w)``.
            chunk: latent slices per slab (any positive integer; the last slab may be shorter).

        Returns:
            the same volume as :meth:`decode`, ``(B, out_channels, f*d, f*h, f*w)`` (to float rounding).
        """
        self._check_latent(z)
        self._check_chunk(chunk, 1, "latent")
        energy_flow = self._energy_flow_on()
        parts = []
        with causal_cache(self.decoder):
            for start in range(0, z.shape[2], chunk):
                x, _ = self.decoder(z[:, :, start : start + chunk], energy_flow)
                parts.append(x)
        return torch.cat(parts, dim=2)
