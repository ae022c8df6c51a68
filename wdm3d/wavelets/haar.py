"""The Haar transform's arithmetic, written once, in a form ``torch.jit.script`` compiles.

Forward: a scaled gather of each 2x2x2 block into ``(B, 2, 2, 2, C, d, h, w)``, then a butterfly
``(a, b) -> (a + b, a - b)`` over each of the three size-2 axes (D, then H, then W), giving the eight subbands in
:data:`~wdm3d.wavelets.SUBBANDS` order. The inverse scatters into the interleaved layout ``(B, C, d, 2, h, 2, w, 2)``
and runs the same butterflies (the orthonormal Haar matrix is its own inverse). MONAI and torch have no 3D Haar, and
a ``conv3d`` with the eight filters was slower than this gather.

Two ways to run the same arithmetic, chosen by ``in_place``:

- in place on one fresh buffer (one allocation, two elementwise passes per butterfly): the eager path, run inside
  the ``autograd.Function`` of :mod:`wdm3d.wavelets.dwt`, whose backward is the other transform (``out=`` operations
  are not differentiable by autograd);
- out of place (``torch.stack`` per butterfly): differentiable by autograd, for TorchScript exports
  (:func:`~wdm3d.wavelets.haar_dwt3d`), which cannot call an ``autograd.Function``.

Both compute ``a - b`` as ``(a + b) - 2b`` (``2b`` is exact), so they give the same bits, and so does the fused GPU
kernel of :mod:`wdm3d.wavelets.fused` for float32 up to its last bit or two. Half types (bf16, fp16) are computed in
float32 and rounded once: in the half type the detail bands of smooth data (``a ~ b``) would lose most of their digits.
"""

from __future__ import annotations

import math

import torch

__all__ = ["haar_forward", "haar_inverse"]

#: ``1 / (2 sqrt 2)``: the three 1D Haar scalings ``1 / sqrt 2`` in one factor (TorchScript cannot read a module-level
#: float, so the functions below compute the same expression themselves).
_INV_2SQRT2 = 1.0 / (2.0 * math.sqrt(2.0))


def _butterfly(t: torch.Tensor, dim: int, in_place: bool) -> torch.Tensor:
    # along a size-2 dim: (a, b) -> (a + b, a - b), with a - b computed as (a + b) - 2b
    a, b = t.select(dim, 0), t.select(dim, 1)
    if in_place:
        torch.add(a, b, out=a)
        torch.sub(a, b, alpha=2, out=b)
        return t
    total = a + b
    return torch.stack((total, torch.sub(total, b, alpha=2)), dim)


def haar_forward(x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """One level of the orthonormal 3D Haar DWT, ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``, without checks.

    Args:
        x: a floating tensor with even spatial sizes (the callers check).
        in_place: run the butterflies in place on one buffer (fast, not differentiable by autograd).
    """
    t = x.float() if x.dtype == torch.float16 or x.dtype == torch.bfloat16 else x
    scale = 1.0 / (2.0 * math.sqrt(2.0))
    b, c, d2, h2, w2 = t.shape
    d, h, w = d2 // 2, h2 // 2, w2 // 2
    src = t.reshape(b, c, d, 2, h, 2, w, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    if in_place:
        out = torch.empty([b, 2, 2, 2, c, d, h, w], dtype=t.dtype, device=t.device)
        torch.mul(src, scale, out=out)
    else:
        out = (src * scale).contiguous()
    out = _butterfly(_butterfly(_butterfly(out, 1, in_place), 2, in_place), 3, in_place)
    return out.reshape(b, 8 * c, d, h, w).to(x.dtype)


def haar_inverse(y: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Inverse of :func:`haar_forward`, ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)``, without checks.

    Args:
        y: subband-major coefficients (the callers check the channel count).
        in_place: run the butterflies in place on one buffer (fast, not differentiable by autograd).
    """
    t = y.float() if y.dtype == torch.float16 or y.dtype == torch.bfloat16 else y
    scale = 1.0 / (2.0 * math.sqrt(2.0))
    b, c8, d, h, w = t.shape
    c = c8 // 8
    src = t.reshape(b, 2, 2, 2, c, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    if in_place:
        out = torch.empty([b, c, d, 2, h, 2, w, 2], dtype=t.dtype, device=t.device)
        torch.mul(src, scale, out=out)
    else:
        out = (src * scale).contiguous()
    out = _butterfly(_butterfly(_butterfly(out, 3, in_place), 5, in_place), 7, in_place)
    return out.reshape(b, c, 2 * d, 2 * h, 2 * w).to(y.dtype)


def _haar_forward_kernel(x: torch.Tensor) -> torch.Tensor:
    """The eager torch path of the forward transform (:func:`haar_forward` in place)."""
    return haar_forward(x, in_place=True)


def _haar_inverse_kernel(y: torch.Tensor) -> torch.Tensor:
    """The eager torch path of the inverse transform (:func:`haar_inverse` in place)."""
    return haar_inverse(y, in_place=True)
