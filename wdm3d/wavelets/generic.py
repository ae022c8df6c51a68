"""Non-Haar wavelets (``db2``, ``sym4``, ``coif1``, ... anything PyWavelets knows), applied separably with
pytorch_wavelets' 1D transforms along each axis (it has 1D and 2D transforms, no 3D one).

The subbands come out in the same subband-major order as the Haar path (:data:`~wdm3d.wavelets.SUBBANDS`).
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__: list[str] = []


def _import_pytorch_wavelets():
    try:
        with warnings.catch_warnings():  # its pkg_resources import warns on every setuptools < 81
            warnings.simplefilter("ignore", UserWarning)
            # it imports PyWavelets and pkg_resources (slow, and warns): only non-Haar wavelets need it
            import pytorch_wavelets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Non-Haar wavelets need pytorch_wavelets, which also imports PyWavelets and pkg_resources "
            f"(setuptools<81). Install them with: pip install pytorch_wavelets PyWavelets 'setuptools<81' ({err})"
        ) from err
    return pytorch_wavelets


@functools.lru_cache(maxsize=64)
def _wavelet_1d(wavelet: str, mode: str, device: torch.device, dtype: torch.dtype):
    ptw = _import_pytorch_wavelets()
    # pytorch_wavelets makes its filter taps in the default dtype: build them in float64 and round once to ``dtype``
    # (taps built in float32 and converted would leave a float64 transform float32-accurate: db2 round trip 2e-7)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fwd = ptw.DWT1DForward(J=1, wave=wavelet, mode=mode)
        inv = ptw.DWT1DInverse(wave=wavelet, mode=mode)
    except ValueError as err:
        raise ValueError(f"Unknown wavelet {wavelet!r}: use a PyWavelets name such as 'db2', 'sym4', 'coif1'.") from err
    finally:
        torch.set_default_dtype(previous)
    return fwd.to(device=device, dtype=dtype), inv.to(device=device, dtype=dtype)


def _analysis_along(t: torch.Tensor, spatial_dim: int, fwd) -> torch.Tensor:
    """Split axis ``spatial_dim`` of ``t`` (B, ..., L, ...) into (low, high): (B, 2, ..., L', ...)."""
    v = t.movedim(spatial_dim, -1)
    lead = v.shape[:-1]
    lo, (hi,) = fwd(v.reshape(-1, 1, v.shape[-1]))  # each (N, 1, L')
    out = torch.cat((lo, hi), dim=1).reshape(*lead, 2, lo.shape[-1])
    return out.movedim(-1, spatial_dim).movedim(-1, 1)


def _synthesis_along(t: torch.Tensor, bit_dim: int, spatial_dim: int, inv) -> torch.Tensor:
    """Merge the (low, high) axis ``bit_dim`` of ``t`` back into axis ``spatial_dim`` (bit_dim < spatial_dim)."""
    v = t.movedim((bit_dim, spatial_dim), (-2, -1))
    lead = v.shape[:-2]
    flat = v.reshape(-1, 2, v.shape[-1])
    out = inv((flat[:, :1], [flat[:, 1:]]))  # (N, 1, L')
    return out.reshape(*lead, out.shape[-1]).movedim(-1, spatial_dim - 1)


def _generic_forward(x: torch.Tensor, wavelet: str, mode: str) -> torch.Tensor:
    fwd, _ = _wavelet_1d(wavelet, mode, x.device, x.dtype)
    taps = fwd.h0.numel()
    if min(x.shape[-3:]) < taps:
        raise ValueError(
            f"Wavelet {wavelet!r} has {taps} taps; every spatial size must be at least that, got a tensor of shape "
            f"{tuple(x.shape)}. Use fewer levels, a shorter wavelet, or 'haar'."
        )
    b, c = x.shape[:2]
    # W, then H, then D: each pass puts its (low, high) axis at dim 1, so the D bit ends outermost:
    # (B, C, D, H, W) -> (B, 2w, C, ...) -> (B, 2h, 2w, C, ...) -> (B, 2d, 2h, 2w, C, d, h, w)
    t = _analysis_along(x, 4, fwd)
    t = _analysis_along(t, 4, fwd)
    t = _analysis_along(t, 4, fwd)
    return t.reshape(b, 8 * c, *t.shape[-3:])


def _generic_inverse(y: torch.Tensor, wavelet: str, mode: str) -> torch.Tensor:
    _, inv = _wavelet_1d(wavelet, mode, y.device, y.dtype)
    b, c8 = y.shape[:2]
    t = y.reshape(b, 2, 2, 2, c8 // 8, *y.shape[-3:])  # (B, 2d, 2h, 2w, C, d, h, w)
    t = _synthesis_along(t, 3, 7, inv)  # W -> (B, 2d, 2h, C, d, h, W)
    t = _synthesis_along(t, 2, 5, inv)  # H -> (B, 2d, C, d, H, W)
    return _synthesis_along(t, 1, 3, inv)  # D -> (B, C, D, H, W)
