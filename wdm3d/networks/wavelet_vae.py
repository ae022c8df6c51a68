"""Wavelet-VAE-3D: a VAE whose latent is a multi-scale Haar decomposition refined by learned networks.

After Kiruluta 2025 (arXiv 2504.13214, "wavelet-based VAE"): the latent space is built from multi-scale Haar
coefficients, a learnable noise scale keeps it stochastic, and a sparsity (Laplacian / L1) prior on the detail
coefficients replaces, or joins, the Gaussian KL. The paper has no public code; the design below is ours.

One module because it is one network: its encoder, refinement networks and decoder are only meaningful together.

Layout (``x`` is ``(B, C, D, H, W)``, ``L = levels``, ``f = 2**L``, ``Z = latent_channels``, ``Zd = Z - C``)::

    analysis      c_l = DWT(low_l), low_0 = x, low_{l+1} = LLL of c_l       c_l: (B, 8C, D/2^(l+1), ...), l = 0..L-1
    normalise     every level divided by its Haar gain g_{l+1} = (2 sqrt 2)^(l+1), so all levels are in image units
                  (the normalised LLL of the last level is the local mean over f^3 voxels)
    latent mean   mu = [ a | d ]  on the grid (D/f, H/f, W/f)
                    a (C channels)  = LLL_L / g_L            + r_a(h)   Haar pass-through + learned residual
                    d (Zd channels) = P . pack(details / g)  + r_d(h)   linear wavelet code + learned residual
                  h: a conv encoder over the whole pyramid (each level's 8C coefficients injected at its own grid,
                  stride-2 convolutions between levels); pack: space-to-depth of every level's 7C detail bands onto
                  the latent grid, C (8^L - 1) channels; P: a 1x1x1 projection to Zd channels, orthogonal at init.
    noise         z = mu + s * eps, s = min_std + softplus(rho), one learnable rho per latent channel
    decoder       LLL_hat = (a + q_a(g_L)) * g_L; then for each level, coarsest first: the features are upsampled and
                  told the current low band, the detail bands are predicted as unpack(Q . d) + q_d(g_l) (Q: 1x1x1,
                  P^T at init), and the low band of the next finer level is the IDWT of [low | details]
    refinement    x_hat = x_idwt + R(x_idwt), a small residual conv net on the image

Design choices and what they guarantee:

- The approximation part of the latent is the coarse Haar low band itself (in image units), so the latent is a
  true low-resolution image plus detail channels; the learned residual ``r_a`` starts at zero.
- Every learned residual head (``r_a``, ``r_d``, ``q_a``, ``q_d`` and the refinement's output layer) starts at zero
  (``zero_init_residual=True``), and ``Q = P^T`` with ``P`` orthogonal. Hence at initialisation the model is a pure
  linear Haar code: with ``latent_channels = C * 8**levels`` (the "lossless" setting, ``Zd = C (8^L - 1)``)
  ``decode(encode(x).mean) == x`` up to float rounding; with fewer channels the detail code is an orthogonal
  projection of the (normalised) detail coefficients, the best linear start, and the networks learn the rest.
- :meth:`synthesize` turns exact coefficients into the image through the same IDWT and refinement the decoder uses:
  with the refinement at zero it reconstructs exactly, whatever the latent size.
- Sparsity prior: ``extra_losses["sparsity"]`` is the mean absolute value of the detail part ``d`` of the latent mean
  (an L1 / Laplacian negative log-likelihood up to its scale, which the loss weight absorbs). It is on the latent, not
  on the predicted image coefficients, so it shapes the space a latent diffusion model learns without fighting the
  reconstruction of image detail.
- ``prior`` chooses the regulariser: ``"gaussian"`` (Gaussian KL only, no sparsity term), ``"laplace"`` (sparsity
  only; ``use_gaussian_kl`` is False and :class:`wdm3d.losses.VAELoss` leaves the KL out) or ``"both"``. With
  ``"laplace"`` nothing pulls the noise scale up, so reconstruction shrinks it; keep ``"both"`` or set ``min_std``
  if the latent must stay stochastic (a noise floor also stops the encoder from beating the L1 by shrinking ``d``).
- Encoder-side and decoder-side coefficient pyramids (raw, un-normalised Haar coefficients, finest first, identical
  shapes) are returned for the wavelet loss (:func:`wdm3d.losses.wavelet_pyramid_loss`).
- GroupNorm in the conv blocks (no chunked inference is promised for this model). Haar only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..wavelets import haar_dwt3d, haar_idwt3d
from .scripting import TensorModule
from .vae_base import LatentDistribution, VAEOutput, latent_sample

__all__ = ["PRIORS", "WaveletVAE3D", "haar_gain"]

#: Accepted values of ``prior``.
PRIORS: tuple[str, ...] = ("gaussian", "laplace", "both")

_GAIN = 2.0 * math.sqrt(2.0)


def haar_gain(level: int) -> float:
    """Gain of the orthonormal 3D Haar low band after ``level`` levels: ``(2 sqrt 2) ** level``.

    The LLL band after ``level`` levels is this gain times the mean of each ``2**level``-cube of voxels.

    Args:
        level: number of DWT levels (>= 0).
    """
    if not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be an integer >= 0, got {level!r}.")
    return _GAIN**level


def _space_to_depth(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, C, k*d, k*h, k*w) -> (B, C*k^3, d, h, w)``; channel ``c*k^3 + (i*k + j)*k + l`` holds offset (i, j, l)."""
    if k == 1:
        return x
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // k, k, h // k, k, w // k, k).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * k * k * k, d // k, h // k, w // k)  # (k * k * k: TorchScript's int ** int is a float)


def _depth_to_space(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth`: ``(B, C*k^3, d, h, w) -> (B, C, k*d, k*h, k*w)``."""
    if k == 1:
        return x
    b, ck, d, h, w = x.shape
    c = ck // (k * k * k)
    x = x.reshape(b, c, k, k, k, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * k, h * k, w * k)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus the identity; channels and size unchanged."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _head(channels: int, out_channels: int, groups: int) -> nn.Sequential:
    """GroupNorm-SiLU-conv(3^3) to ``out_channels``: the residual heads (the last conv is the one zero-initialised)."""
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1))


class WaveletVAE3D(nn.Module):
    """A VAE whose latent is the coarse Haar low band plus a learned code of the Haar detail pyramid.

    See the module docstring for the layout and the design choices. ``x (B, C, D, H, W) -> z (B, Z, D/f, H/f, W/f)``
    with ``f = 2**levels``; D, H and W must be multiples of ``f``.

    Args:
        in_channels: image channels ``C``.
        levels: Haar levels ``L`` in {1, 2, 3}; the downsample factor per axis is ``2**levels``.
        latent_channels: ``Z``; the first ``C`` channels are the approximation (the coarse low band), the other
            ``Z - C`` the detail code. Must satisfy ``C < Z <= C * 8**levels``; ``C * 8**levels`` is lossless at
            initialisation.
        base_channels: width of the conv nets at the finest level; level ``l`` uses ``base_channels * 2**l``.
        num_res_blocks: residual blocks per level, in the encoder and in the decoder.
        norm_num_groups: GroupNorm groups; must divide ``base_channels``.
        refine_channels: width of the image-space refinement net (three 3^3 convs); 0 turns the refinement off.
        prior: ``"gaussian"``, ``"laplace"`` or ``"both"`` (see the module docstring); sets ``use_gaussian_kl`` and
            whether ``extra_losses["sparsity"]`` is returned.
        noise_init: initial noise scale ``s`` of every latent channel (> ``min_std``).
        min_std: floor added to ``softplus(rho)``; 0 gives ``s = softplus(rho)`` exactly.
        zero_init_residual: start every learned residual head and the refinement output at zero, so that the model
            starts as the linear Haar code (exact in the lossless setting).

    Attributes:
        latent_channels, downsample_factor, levels, in_channels, prior.
        use_gaussian_kl: whether the training loss should add the Gaussian KL of the posterior (``prior`` is
            ``"gaussian"`` or ``"both"``).
        noise_rho: the learnable ``rho``, shape ``(Z,)``.

    Example:
        >>> vae = WaveletVAE3D(levels=2, latent_channels=8, base_channels=8)
        >>> out = vae(torch.randn(1, 1, 16, 16, 16))
        >>> out.latent.shape, out.reconstruction.shape, sorted(out.extra_losses)
        (torch.Size([1, 8, 4, 4, 4]), torch.Size([1, 1, 16, 16, 16]), ['sparsity'])
    """

    def __init__(
        self,
        in_channels: int = 1,
        levels: int = 2,
        latent_channels: int = 8,
        base_channels: int = 64,
        num_res_blocks: int = 2,
        norm_num_groups: int = 8,
        refine_channels: int = 16,
        prior: str = "both",
        noise_init: float = 0.1,
        min_std: float = 0.0,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("base_channels", base_channels, 1),
            ("num_res_blocks", num_res_blocks, 0),
            ("norm_num_groups", norm_num_groups, 1),
            ("refine_channels", refine_channels, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if levels not in (1, 2, 3) or isinstance(levels, bool):
            raise ValueError(f"levels must be 1, 2 or 3 (downsample factor 2, 4 or 8 per axis), got {levels!r}.")
        full = in_channels * 8**levels
        if not isinstance(latent_channels, int) or not in_channels < latent_channels <= full:
            raise ValueError(
                f"latent_channels must be an integer with in_channels < latent_channels <= in_channels * 8**levels "
                f"(here {in_channels} < Z <= {full}): {in_channels} approximation channel(s) plus at least one detail "
                f"channel; got {latent_channels!r}."
            )
        if base_channels % norm_num_groups:
            raise ValueError(
                f"norm_num_groups ({norm_num_groups}) must divide base_channels ({base_channels}); e.g. "
                "base_channels=8 with norm_num_groups=8 or 4."
            )
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}.")
        if not (isinstance(min_std, (int, float)) and min_std >= 0 and math.isfinite(min_std)):
            raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}.")
        if not (isinstance(noise_init, (int, float)) and math.isfinite(noise_init) and noise_init > min_std):
            raise ValueError(f"noise_init must be a finite number > min_std ({min_std}), got {noise_init!r}.")

        self.in_channels, self.levels, self.latent_channels = in_channels, levels, latent_channels
        self.downsample_factor = 2**levels
        self.prior = prior
        self.use_gaussian_kl = prior in ("gaussian", "both")
        self.min_std = float(min_std)
        # every constructor setting readable (a checkpoint's run_config rebuilds the network from them)
        self.base_channels, self.num_res_blocks, self.refine_channels = base_channels, num_res_blocks, refine_channels
        self.noise_init, self.zero_init_residual = noise_init, zero_init_residual
        c, zd, groups = in_channels, latent_channels - in_channels, norm_num_groups
        widths = [base_channels * 2**lvl for lvl in range(levels)]
        self._detail_sizes = [7 * c * 8 ** (levels - 1 - lvl) for lvl in range(levels)]  # packed, finest first
        self._gains = [haar_gain(lvl) for lvl in range(levels + 1)]  # what forward divides by (TorchScript-readable)
        n_detail = sum(self._detail_sizes)  # = C (8^L - 1)

        # learnable noise scale: s = min_std + softplus(rho), one rho per latent channel
        rho = math.log(math.expm1(noise_init - self.min_std))
        self.noise_rho = nn.Parameter(torch.full((latent_channels,), rho))

        # encoder: each level's 8C coefficients enter at their own grid; stride-2 convs between levels
        def blocks(ch: int) -> nn.Sequential:
            return nn.Sequential(*[_ResBlock(ch, groups) for _ in range(num_res_blocks)])

        self.enc_in = nn.ModuleList(nn.Conv3d(8 * c, w, 3, padding=1) for w in widths)
        self.enc_blocks = nn.ModuleList(blocks(w) for w in widths)
        self.enc_down = nn.ModuleList(nn.Conv3d(widths[i], widths[i + 1], 2, stride=2) for i in range(levels - 1))
        self.enc_approx = _head(widths[-1], c, groups)  # r_a
        self.enc_detail = _head(widths[-1], zd, groups)  # r_d
        self.detail_proj = nn.Conv3d(n_detail, zd, 1, bias=False)  # P

        # decoder: coarsest level first; the current low band is injected at every level
        self.dec_in = nn.Conv3d(latent_channels, widths[-1], 3, padding=1)
        self.dec_approx = _head(widths[-1], c, groups)  # q_a
        self.dec_low_in = nn.ModuleList(nn.Conv3d(c, w, 3, padding=1) for w in widths)
        self.dec_blocks = nn.ModuleList(blocks(w) for w in widths)
        self.dec_up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(widths[i + 1], widths[i], 3, padding=1)
            )
            for i in range(levels - 1)
        )
        self.dec_detail = nn.ModuleList(_head(w, 7 * c, groups) for w in widths)  # q_d per level
        self.detail_unproj = nn.Conv3d(zd, n_detail, 1, bias=False)  # Q

        self.refine: nn.Sequential | None = None
        if refine_channels:
            self.refine = nn.Sequential(
                nn.Conv3d(c, refine_channels, 3, padding=1),
                nn.SiLU(),
                nn.Conv3d(refine_channels, refine_channels, 3, padding=1),
                nn.SiLU(),
                nn.Conv3d(refine_channels, c, 3, padding=1),
            )

        # P orthogonal (orthonormal rows or columns), Q = P^T: the linear detail code starts as an orthogonal projection
        with torch.no_grad():
            weight = torch.empty(zd, n_detail)
            nn.init.orthogonal_(weight)
            self.detail_proj.weight.copy_(weight[:, :, None, None, None])
            self.detail_unproj.weight.copy_(weight.t()[:, :, None, None, None])
        if zero_init_residual:
            for head in (self.enc_approx, self.enc_detail, self.dec_approx, *self.dec_detail):
                nn.init.zeros_(head[-1].weight)
                nn.init.zeros_(head[-1].bias)
            if self.refine is not None:
                nn.init.zeros_(self.refine[-1].weight)
                nn.init.zeros_(self.refine[-1].bias)

    # ----------------------------------------------------------------------------------------------------------------
    # checks and small helpers
    # ----------------------------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, C, D, H, W), got {shape}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the model was built with in_channels={self.in_channels}.")
        f = self.downsample_factor
        if any(s % f for s in x.shape[-3:]):
            raise ValueError(
                f"spatial sizes must be multiples of the downsample factor {f} (levels={self.levels}); got "
                f"{tuple(x.shape[-3:])}. Pad or crop the volume (e.g. MONAI DivisiblePadd(k={f}))."
            )

    @property
    def noise_std(self) -> torch.Tensor:
        """The noise scale per latent channel, ``min_std + softplus(rho)``: ``(Z,)``, positive."""
        return self.min_std + F.softplus(self.noise_rho)

    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's output layer (the refinement's last conv; the finest detail head without one)."""
        if self.refine is not None:
            return self.refine[-1].weight
        return self.dec_detail[0][-1].weight

    def _refined(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.refine is None else x + self.refine(x)

    # ----------------------------------------------------------------------------------------------------------------
    # analysis / synthesis
    # ----------------------------------------------------------------------------------------------------------------

    def wavelet_coefficients(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder-side Haar pyramid: raw coefficients per level, finest first.

        Args:
            x: ``(B, C, D, H, W)``.

        Returns:
            ``L`` tensors; level ``l`` is ``(B, 8C, D/2^(l+1), H/2^(l+1), W/2^(l+1))`` = DWT of the level-``l`` low
            band (channels ``[:C]`` LLL, ``[C:]`` the 7 detail subbands, in :data:`wdm3d.wavelets.SUBBANDS` order).
        """
        if not torch.jit.is_scripting():  # (TorchScript: see wdm3d.networks.scripting)
            self._check_input(x)
        coeffs: list[torch.Tensor] = []
        low = x
        for _ in range(self.levels):
            y = haar_dwt3d(low)
            coeffs.append(y)
            low = y[:, : self.in_channels]
        return coeffs

    def synthesize(self, low: torch.Tensor, details: Sequence[torch.Tensor]) -> torch.Tensor:
        """Image from raw Haar coefficients: IDWT level by level, then the refinement.

        With the refinement at zero (the initial state) and ``low, details`` from :meth:`wavelet_coefficients`
        (``coeffs[-1][:, :C]`` and ``[c[:, C:] for c in coeffs]``) this reconstructs the input exactly.

        Args:
            low: coarsest LLL band, ``(B, C, D/f, H/f, W/f)``.
            details: ``L`` detail tensors, finest first, level ``l`` ``(B, 7C, D/2^(l+1), ...)``.

        Returns:
            ``(B, C, D, H, W)``.
        """
        if len(details) != self.levels:
            raise ValueError(f"details must hold {self.levels} levels (finest first), got {len(details)}.")
        for detail in reversed(list(details)):
            if detail.shape[-3:] != low.shape[-3:] or detail.shape[1] != 7 * self.in_channels:
                raise ValueError(
                    f"detail bands of shape {tuple(detail.shape)} do not fit the low band {tuple(low.shape)} "
                    f"(expected 7*C = {7 * self.in_channels} channels on the same grid)."
                )
            low = haar_idwt3d(torch.cat((low, detail), dim=1))
        return self._refined(low)

    # ----------------------------------------------------------------------------------------------------------------
    # encoder / decoder
    # ----------------------------------------------------------------------------------------------------------------

    def _posterior(self, coeffs: list[torch.Tensor]) -> LatentDistribution:
        # (loops and interface-typed modules rather than comprehensions over enumerate and indexed ModuleLists:
        # TorchScript compiles these; 1 << n is 2 ** n as an int)
        c = self.in_channels
        normed: list[torch.Tensor] = []
        for lvl in range(len(coeffs)):
            normed.append(coeffs[lvl] / self._gains[lvl + 1])
        h = self.enc_blocks[0](self.enc_in[0](normed[0]))
        for lvl in range(1, self.levels):
            blocks: TensorModule = self.enc_blocks[lvl]
            down: TensorModule = self.enc_down[lvl - 1]
            inject: TensorModule = self.enc_in[lvl]
            if torch.jit.is_scripting():
                h = blocks.forward(down.forward(h) + inject.forward(normed[lvl]))
            else:
                h = blocks(down(h) + inject(normed[lvl]))
        parts: list[torch.Tensor] = []
        for lvl in range(len(normed)):
            parts.append(_space_to_depth(normed[lvl][:, c:], 1 << (self.levels - 1 - lvl)))
        packed = torch.cat(parts, dim=1)
        approx = normed[-1][:, :c] + self.enc_approx(h)
        detail = self.detail_proj(packed) + self.enc_detail(h)
        mean = torch.cat((approx, detail), dim=1)
        std = self.noise_std.to(mean.dtype).view(1, -1, 1, 1, 1).expand_as(mean)
        return LatentDistribution(mean=mean, std=std)

    @torch.jit.export  # (a TorchScript export of the network keeps encode and decode)
    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Posterior ``N(mean, s^2)`` with the learnable per-channel noise scale ``s``.

        Args:
            x: ``(B, C, D, H, W)``, sizes multiples of ``downsample_factor``.

        Returns:
            :class:`LatentDistribution` with ``mean`` ``(B, Z, D/f, H/f, W/f)`` (channels ``[:C]`` the normalised coarse
            low band, ``[C:]`` the detail code) and ``std`` = :attr:`noise_std` broadcast to that shape.
        """
        return self._posterior(self.wavelet_coefficients(x))

    def _decode(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not torch.jit.is_scripting():  # noqa: SIM102 - TorchScript drops this branch only when it tests this alone
            if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != self.latent_channels:
                shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"z must have shape (B, {self.latent_channels}, d, h, w), got {shape}.")
        c, top = self.in_channels, self.levels - 1
        z_approx, z_detail = z[:, :c], z[:, c:]
        lin = torch.split(self.detail_unproj(z_detail), self._detail_sizes, dim=1)
        g = self.dec_in(z)
        low = z_approx + self.dec_approx(g)  # normalised LLL of the coarsest level
        dec_coeffs: list[torch.Tensor] = []  # filled coarsest first, each inserted in front: finest first
        for lvl in range(top, -1, -1):
            blocks: TensorModule = self.dec_blocks[lvl]
            low_in: TensorModule = self.dec_low_in[lvl]
            detail_head: TensorModule = self.dec_detail[lvl]
            if lvl < top:
                up: TensorModule = self.dec_up[lvl]
                g = up.forward(g) if torch.jit.is_scripting() else up(g)
            if torch.jit.is_scripting():
                g = blocks.forward(g + low_in.forward(low))
                detail = _depth_to_space(lin[lvl], 1 << (top - lvl)) + detail_head.forward(g)
            else:
                g = blocks(g + low_in(low))
                detail = _depth_to_space(lin[lvl], 1 << (top - lvl)) + detail_head(g)
            coeffs = torch.cat((low, detail), dim=1) * self._gains[lvl + 1]
            dec_coeffs.insert(0, coeffs)
            low = haar_idwt3d(coeffs) / self._gains[lvl]
        return self._refined(low), dec_coeffs

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image from a latent.

        Args:
            z: ``(B, Z, d, h, w)``.

        Returns:
            ``(B, C, d*f, h*f, w*f)``.
        """
        return self._decode(z)[0]

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        """Encode, reparameterise (``sample=True``) or take the mean, decode.

        Args:
            x: ``(B, C, D, H, W)``.
            sample: draw ``z = mean + s * eps``; False decodes the mean.

        Returns:
            :class:`VAEOutput` with ``enc_coeffs`` / ``dec_coeffs`` (raw Haar, finest first, ``(B, 8C, ...)`` per
            level) and ``extra_losses`` holding ``"sparsity"`` (mean ``|detail part of the latent mean|``) unless
            ``prior="gaussian"``.
        """
        coeffs = self.wavelet_coefficients(x)
        posterior = self._posterior(coeffs)
        z = latent_sample(posterior) if sample else posterior.mean  # posterior.sample() / .mode()
        reconstruction, dec_coeffs = self._decode(z)
        extra: dict[str, torch.Tensor] = {}
        if self.prior == "laplace" or self.prior == "both":
            extra["sparsity"] = posterior.mean[:, self.in_channels :].abs().mean()
        return VAEOutput(
            reconstruction=reconstruction,
            posterior=posterior,
            latent=z,
            enc_coeffs=coeffs,
            dec_coeffs=dec_coeffs,
            extra_losses=extra,
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, levels={self.levels}, latent_channels={self.latent_channels}, "
            f"prior={self.prior!r}, min_std={self.min_std}"
        )
