"""WDM's LLL scaling, the wavelet space diffusion runs in, and the transforms as modules (for networks and MONAI
bundle configs).

WDM divides the LLL band by 3 before diffusion and multiplies it back before the inverse. :func:`to_wavelet_space` /
:func:`from_wavelet_space` and :class:`WaveletSpace` do the DWT together with that scaling (``lll_scale=3.0`` by
default, ``1.0`` turns it off). The effect: a wavelet-domain MSE weights the LLL error by ``1 / lll_scale**2``
relative to image space, and the low band sees a lower signal-to-noise ratio at every t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .dwt import dwt3d, idwt3d
from .layout import WAVELET_MODES, _check_pad_mode, _is_haar

__all__ = [
    "DWT3d",
    "IDWT3d",
    "WaveletSpace",
    "from_wavelet_space",
    "scale_lll",
    "to_wavelet_space",
    "unscale_lll",
]


def _check_lll_scale(lll_scale: float) -> float:
    if not (isinstance(lll_scale, (int, float)) and lll_scale > 0 and math.isfinite(lll_scale)):
        raise ValueError(f"lll_scale must be a positive finite number (3.0 as WDM, 1.0 for none), got {lll_scale!r}.")
    return float(lll_scale)


def scale_lll(y: torch.Tensor, lll_scale: float = 3.0) -> torch.Tensor:
    """Divide the LLL channels of ``y`` (B, 8C, ...) by ``lll_scale`` (out of place).

    Args:
        y: subband-major coefficients.
        lll_scale: WDM's divisor (3.0; 1.0 returns ``y`` itself).
    """
    lll_scale = _check_lll_scale(lll_scale)
    if lll_scale == 1.0:
        return y
    c = y.shape[1] // 8
    return torch.cat((y[:, :c] / lll_scale, y[:, c:]), dim=1)


def unscale_lll(y: torch.Tensor, lll_scale: float = 3.0) -> torch.Tensor:
    """Multiply the LLL channels of ``y`` (B, 8C, ...) by ``lll_scale`` (out of place); inverse of :func:`scale_lll`.

    Args:
        y: subband-major coefficients.
        lll_scale: WDM's divisor (3.0; 1.0 returns ``y`` itself).
    """
    lll_scale = _check_lll_scale(lll_scale)
    if lll_scale == 1.0:
        return y
    c = y.shape[1] // 8
    return torch.cat((y[:, :c] * lll_scale, y[:, c:]), dim=1)


def to_wavelet_space(x: torch.Tensor, lll_scale: float = 3.0, wavelet: str = "haar", **kwargs) -> torch.Tensor:
    """Image ``(B, C, D, H, W)`` -> diffusion space ``(B, 8C, D/2, H/2, W/2)``: DWT, then LLL / ``lll_scale``.

    Args:
        x: volume batch.
        lll_scale: WDM's LLL divisor.
        wavelet: ``"haar"`` or a PyWavelets name.
        kwargs: ``mode`` / ``pad_mode`` of :func:`~wdm3d.wavelets.dwt3d`.
    """
    return scale_lll(dwt3d(x, wavelet, **kwargs), lll_scale)


def from_wavelet_space(
    y: torch.Tensor, lll_scale: float = 3.0, wavelet: str = "haar", output_shape: Sequence[int] | None = None, **kwargs
) -> torch.Tensor:
    """Diffusion space -> image: LLL * ``lll_scale``, then IDWT (cropped to ``output_shape`` if given).

    Args:
        y: diffusion-space coefficients ``(B, 8C, d, h, w)``.
        lll_scale: the LLL divisor used by :func:`to_wavelet_space`.
        wavelet: the wavelet used by :func:`to_wavelet_space`.
        output_shape: spatial shape to crop to (after padding), or None.
        kwargs: ``mode`` of :func:`~wdm3d.wavelets.idwt3d`.
    """
    return idwt3d(unscale_lll(y, lll_scale), wavelet, output_shape=output_shape, **kwargs)


class DWT3d(nn.Module):
    """Module form of :func:`dwt3d`. ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``.

    Args:
        wavelet: ``"haar"`` or a PyWavelets name.
        mode: boundary mode for non-Haar wavelets.
        pad_mode: None (odd sizes raise) or a padding mode for odd axes.
    """

    def __init__(self, wavelet: str = "haar", mode: str = "periodization", pad_mode: str | None = None) -> None:
        super().__init__()
        _check_pad_mode(pad_mode)
        if not _is_haar(wavelet) and mode not in WAVELET_MODES:
            raise ValueError(f"mode must be one of {WAVELET_MODES}, got {mode!r}.")
        self.wavelet, self.mode, self.pad_mode = wavelet, mode, pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwt3d(x, self.wavelet, self.mode, self.pad_mode)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, mode={self.mode!r}, pad_mode={self.pad_mode!r}"


class IDWT3d(nn.Module):
    """Module form of :func:`idwt3d`. ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)`` (cropped to ``output_shape``)."""

    def __init__(self, wavelet: str = "haar", mode: str = "periodization") -> None:
        super().__init__()
        if not _is_haar(wavelet) and mode not in WAVELET_MODES:
            raise ValueError(f"mode must be one of {WAVELET_MODES}, got {mode!r}.")
        self.wavelet, self.mode = wavelet, mode

    def forward(self, y: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        return idwt3d(y, self.wavelet, self.mode, output_shape)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, mode={self.mode!r}"


class WaveletSpace(nn.Module):
    """The space WDM diffuses in: DWT with the LLL band divided by ``lll_scale``, and its inverse.

    With ``levels=2`` every subband of the first level is transformed again (a full wavelet packet), giving
    ``8**2 * C = 64C`` channels at a quarter of the resolution; the coarsest band (LLL of LLL, channels ``[:C]``)
    is divided by ``lll_scale`` once per level, so it stays near the local mean as in one-level WDM
    (``8 * mean / 9`` against ``2 sqrt(2) * mean / 3``). Channel ``j`` of level ``l + 1`` holds subband
    ``j // (8**l * C)`` of level-``l`` channel ``j % (8**l * C)``. Every level is orthonormal, so the inverse is
    exact and Parseval holds up to the LLL scaling.

    Args:
        lll_scale: WDM's LLL divisor (3.0 for parity with WDM; 1.0 turns the scaling off).
        wavelet: ``"haar"`` (WDM) or a PyWavelets name.
        mode: boundary mode for non-Haar wavelets.
        pad_mode: None (odd sizes raise) or a padding mode; pass ``output_shape`` to :meth:`decode` to crop back.
        levels: 1 (WDM: ``(B, 8C, D/2, H/2, W/2)``) or more (``(B, 8**levels C, D/2**levels, ...)``).

    Example:
        >>> space = WaveletSpace(lll_scale=3.0)
        >>> x = torch.rand(1, 1, 8, 8, 8)
        >>> torch.allclose(space.decode(space.encode(x)), x, atol=1e-6)
        True
        >>> WaveletSpace(levels=2).encode(x).shape
        torch.Size([1, 64, 2, 2, 2])
    """

    def __init__(
        self,
        lll_scale: float = 3.0,
        wavelet: str = "haar",
        mode: str = "periodization",
        pad_mode: str | None = None,
        levels: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1 (1 as WDM, 2 for a two-level packet), got {levels!r}.")
        if levels > 1 and pad_mode is not None:
            raise ValueError("levels > 1 needs sizes divisible by 2**levels; pad_mode is only for one level.")
        self.lll_scale = _check_lll_scale(lll_scale)
        self.levels = levels
        self.dwt = DWT3d(wavelet, mode, pad_mode)
        self.idwt = IDWT3d(wavelet, mode)

    @property
    def channel_factor(self) -> int:
        """Wavelet channels per image channel: ``8 ** levels``."""
        return 8**self.levels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, 8**L C, D/2**L, H/2**L, W/2**L)``."""
        c = x.shape[1]
        y = scale_lll(self.dwt(x), self.lll_scale)
        for _ in range(1, self.levels):
            y = self.dwt(y)
            y = torch.cat((y[:, :c] / self.lll_scale, y[:, c:]), dim=1) if self.lll_scale != 1.0 else y
        return y

    def decode(self, y: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, 8**L C, d, h, w) -> (B, C, 2**L d, 2**L h, 2**L w)`` (cropped to ``output_shape``)."""
        if y.shape[1] % self.channel_factor:
            raise ValueError(
                f"a {self.levels}-level wavelet space needs a multiple of {self.channel_factor} channels, "
                f"got {tuple(y.shape)}."
            )
        c = y.shape[1] // self.channel_factor
        for _ in range(1, self.levels):
            y = torch.cat((y[:, :c] * self.lll_scale, y[:, c:]), dim=1) if self.lll_scale != 1.0 else y
            y = self.idwt(y)
        return self.idwt(unscale_lll(y, self.lll_scale), output_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def extra_repr(self) -> str:
        return f"lll_scale={self.lll_scale}, levels={self.levels}"
