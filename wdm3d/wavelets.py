"""3D discrete wavelet transforms for volumes, in the layout WDM diffuses in.

One level of the transform maps ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``. The eight subbands are stacked
*subband-major*: channels ``[k*C:(k+1)*C]`` hold subband ``k`` of every input channel, so ``y[:, :C]`` is LLL.
Subband ``k`` has the bits ``k = 4*d + 2*h + w`` where a bit is 0 for the low-pass and 1 for the high-pass filter
along that axis; the names in :data:`SUBBANDS` spell the same thing with letters for the axes (D, H, W) in order.

Haar (the WDM transform) has a fast path built from one strided gather and three in-place butterflies
(no matrices, no Python loops over voxels). Its low-pass taps are ``(1, 1)/sqrt(2)`` and its high-pass taps
``(1, -1)/sqrt(2)`` (``H = (x[2i] - x[2i+1]) / sqrt(2)``, the sign PyWavelets and pytorch_wavelets use), so the
transform is orthonormal: the inverse is the transpose, energy is preserved (Parseval) and
``LLL = 2*sqrt(2) * mean`` of each 2x2x2 block. On CUDA tensors (float32/bfloat16/float16) the same transform runs
as one fused Triton kernel (one read and one write of each voxel) when Triton imports; see :func:`set_fused_haar` and
:func:`fused_haar_available`. Both paths give the same coefficients (float32: to the last bit or two; half types:
both compute in float32 and round once).

Other wavelets (``db2``, ``sym4``, ``coif1``, ... anything PyWavelets knows) are applied separably with
pytorch_wavelets' 1D transforms. Their boundary handling is the ``mode`` argument: the default ``"periodization"``
keeps subbands at exactly half size and the transform orthonormal; ``"zero"``, ``"symmetric"`` and ``"reflect"``
give slightly larger subbands (pass ``output_shape`` to the inverse to crop back).

Odd sizes: by default an odd spatial size raises a ``ValueError`` naming the shape. With ``pad_mode`` set
(``"replicate"``, ``"reflect"`` or ``"constant"``) each odd axis is padded by one voxel at its end; the inverse
crops back when given ``output_shape`` (the multi-level functions record the shapes for you).

LLL scaling (WDM): WDM divides the LLL band by 3 before diffusion and multiplies it back before the inverse.
:func:`to_wavelet_space` / :func:`from_wavelet_space` and :class:`WaveletSpace` do the DWT together with that
scaling (``lll_scale=3.0`` by default, ``1.0`` turns it off). The effect: a wavelet-domain MSE weights the LLL error
by ``1 / lll_scale**2`` relative to image space, and the low band sees a lower signal-to-noise ratio at every t.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUBBANDS",
    "PAD_MODES",
    "WAVELET_MODES",
    "dwt3d",
    "idwt3d",
    "wavedec3d",
    "waverec3d",
    "WaveletPyramid",
    "scale_lll",
    "unscale_lll",
    "to_wavelet_space",
    "from_wavelet_space",
    "subband",
    "DWT3d",
    "IDWT3d",
    "WaveletSpace",
    "FUSED_HAAR_DTYPES",
    "fused_haar_available",
    "set_fused_haar",
]

#: Subband names in channel order; the letters are the filters along (D, H, W).
SUBBANDS: tuple[str, ...] = ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")
#: Accepted values of ``pad_mode`` (None: odd sizes are an error).
PAD_MODES: tuple[str | None, ...] = (None, "replicate", "reflect", "constant")
#: Boundary modes for non-Haar wavelets (pytorch_wavelets' names).
WAVELET_MODES: tuple[str, ...] = ("periodization", "zero", "symmetric", "reflect")

_INV_2SQRT2 = 1.0 / (2.0 * math.sqrt(2.0))


# --------------------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------------------


def _check_volume(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, D, H, W), got {type(x).__name__}.")
    if x.ndim != 5:
        raise ValueError(f"{name} must have shape (B, C, D, H, W) (5 dimensions), got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with .float().")


def _check_pad_mode(pad_mode: str | None) -> None:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")


def _is_haar(wavelet: str) -> bool:
    if not isinstance(wavelet, str):
        raise TypeError(f"wavelet must be a name such as 'haar' or 'db2', got {type(wavelet).__name__}.")
    return wavelet.lower() in ("haar", "db1")


def _pad_to_even(x: torch.Tensor, pad_mode: str | None) -> torch.Tensor:
    """Pad each odd spatial axis of ``x`` by one voxel at its end, or raise if ``pad_mode`` is None."""
    odd = [s % 2 for s in x.shape[-3:]]
    if not any(odd):
        return x
    if pad_mode is None:
        raise ValueError(
            f"3D DWT needs even spatial sizes, got a tensor of shape {tuple(x.shape)} (odd axes: "
            f"{[ax for ax, o in zip('DHW', odd) if o]}). Crop or pad the volume to even sizes, or pass "
            f"pad_mode='replicate' (or 'reflect'/'constant') and give output_shape to the inverse to crop back."
        )
    d, h, w = odd
    return F.pad(x, (0, w, 0, h, 0, d), mode=pad_mode)


def _crop(x: torch.Tensor, output_shape: Sequence[int] | None) -> torch.Tensor:
    if output_shape is None:
        return x
    shape = tuple(int(s) for s in output_shape)[-3:]
    if len(shape) != 3:
        raise ValueError(f"output_shape must give (D, H, W) (or a full shape ending in them), got {output_shape}.")
    if any(s > have for s, have in zip(shape, x.shape[-3:])):
        raise ValueError(
            f"output_shape {shape} is larger than the reconstructed volume {tuple(x.shape[-3:])}; it must be the "
            "spatial shape of the tensor that was transformed."
        )
    return x[..., : shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------------------------------------------------
# Haar fast path
# --------------------------------------------------------------------------------------------------------------------


def _butterfly_(t: torch.Tensor, dim: int) -> None:
    """In place along a size-2 dim: ``(a, b) -> (a + b, a - b)``. Two elementwise passes, no allocation."""
    a, b = t.select(dim, 0), t.select(dim, 1)
    torch.add(a, b, out=a)
    torch.sub(a, b, alpha=2, out=b)


def _half_in_float32(kernel):
    # the butterflies compute a - b as (a + b) - 2b: exact in float32/64, but in bf16/fp16 the detail bands of smooth
    # data (a ~ b) lose most of their digits (10% error); compute half types in float32 and round once, like the
    # fused kernel
    @functools.wraps(kernel)
    def run(t: torch.Tensor) -> torch.Tensor:
        if t.dtype in (torch.float16, torch.bfloat16):
            return kernel(t.float()).to(t.dtype)
        return kernel(t)

    return run


@_half_in_float32
def _haar_forward_kernel(x: torch.Tensor) -> torch.Tensor:
    # (B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2). One allocation: a scaled gather into (B, 2, 2, 2, C, d, h, w),
    # then butterflies over the three contiguous size-2 axes. MONAI/torch have no 3D Haar; conv3d was slower here.
    b, c, d2, h2, w2 = x.shape
    d, h, w = d2 // 2, h2 // 2, w2 // 2
    out = torch.empty((b, 2, 2, 2, c, d, h, w), dtype=x.dtype, device=x.device)
    src = x.contiguous().view(b, c, d, 2, h, 2, w, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    torch.mul(src, _INV_2SQRT2, out=out)
    _butterfly_(out, 1)
    _butterfly_(out, 2)
    _butterfly_(out, 3)
    return out.view(b, 8 * c, d, h, w)


@_half_in_float32
def _haar_inverse_kernel(y: torch.Tensor) -> torch.Tensor:
    # (B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w). One allocation: a scaled scatter into the interleaved layout
    # (B, C, d, 2, h, 2, w, 2), then butterflies over its size-2 axes (the Haar matrix is its own inverse).
    b, c8, d, h, w = y.shape
    c = c8 // 8
    out = torch.empty((b, c, d, 2, h, 2, w, 2), dtype=y.dtype, device=y.device)
    src = y.contiguous().view(b, 2, 2, 2, c, d, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    torch.mul(src, _INV_2SQRT2, out=out)
    _butterfly_(out, 3)
    _butterfly_(out, 5)
    _butterfly_(out, 7)
    return out.view(b, c, 2 * d, 2 * h, 2 * w)


# --------------------------------------------------------------------------------------------------------------------
# Haar fused GPU path: one Triton kernel, one read and one write of every voxel
# --------------------------------------------------------------------------------------------------------------------
# On a GPU the fast path above costs ~11 tensor passes (gather + 3 butterflies, each reading and writing the whole
# tensor), while the transform itself needs one. PyTorch has no fused 3D Haar; the Triton kernel below loads the
# 8 voxels of each 2x2x2 block (or the 8 subband values of one position), runs the same butterflies in registers
# (in float32 for half types) and stores 8 values. It is used for CUDA tensors of dtype float32/bfloat16/float16
# whenever Triton imports; everything else (CPU, float64, no Triton) takes the torch path above. If the kernel
# fails to build or launch, a warning is given once and the torch path is used from then on.

#: dtypes the fused kernel handles (float64 and CPU tensors use the torch path).
FUSED_HAAR_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_fused_haar = {"enabled": os.environ.get("WDM3D_FUSED_HAAR", "1").lower() not in ("0", "false", "no", "off"),
               "failed": None}


def set_fused_haar(enabled: bool) -> bool:
    """Turn the fused GPU Haar kernel on or off for this process; returns the previous setting.

    The environment variable ``WDM3D_FUSED_HAAR=0`` turns it off at import. Off (or on a CPU, or without Triton),
    the Haar transform runs as the torch path (gather + butterflies); both give the same coefficients.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}.")
    previous = _fused_haar["enabled"]
    _fused_haar["enabled"] = enabled
    return previous


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def fused_haar_available(x: torch.Tensor | torch.device | str | None = None) -> bool:
    """Whether the Haar transform of ``x`` (a tensor, or a device) runs the fused Triton kernel.

    True only if the fused path is enabled (:func:`set_fused_haar`), has not failed before in this process, Triton
    imports, and ``x`` lives on a CUDA device (and, for a tensor, has dtype in :data:`FUSED_HAAR_DTYPES`).
    With ``x=None`` the device is not checked.

    Example:
        >>> fused_haar_available(torch.zeros(1, 1, 2, 2, 2))  # a CPU tensor: the torch path
        False
    """
    if not _fused_haar["enabled"] or _fused_haar["failed"] is not None:
        return False
    if isinstance(x, torch.Tensor):
        if not _on_cuda(x.device) or x.dtype not in FUSED_HAAR_DTYPES:
            return False
    elif x is not None and not _on_cuda(torch.device(x)):
        return False
    return _triton_importable()


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _build_triton_kernel():
    """Compile-on-first-launch Triton kernel for both directions (built lazily: importing Triton is slow).

    The kernel is defined here rather than at module level so that importing wdm3d never imports Triton; Triton
    resolves ``tl`` from the module's globals, hence the ``global``.
    """
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def haar3d_kernel(src, dst, n_rows, C, d, h, w, scale,
                      INVERSE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # One program: BLOCK_R rows (b, c, i, j) x BLOCK_K positions k of the half-resolution grid (d, h, w).
        # Voxel side: x[b, c, 2i+z, 2j+y, 2k+x]; subband side: y[b, 4z+2y+x (times C) + c, i, j, k].
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        rmask = rows < n_rows
        mask = rmask[:, None] & (ks < w)[None, :]
        j = rows % h
        t = rows // h
        i = t % d
        bc = t // d
        b = bc // C
        c = bc % C
        W2 = 2 * w
        HW2 = 4 * h * w
        cs = C * d * h * w  # distance between two subbands
        vox_row = ((bc * (2 * d) + 2 * i) * (2 * h) + 2 * j) * W2
        sub = (((b * 8 * C + c) * d + i) * h + j) * w
        sub = sub[:, None] + ks[None, :]
        if SPLIT:  # contiguous loads/stores of 2*BLOCK_K voxels, de-interleaved in registers
            cols = 2 * k0 + tl.arange(0, 2 * BLOCK_K)
            vox = vox_row[:, None] + cols[None, :]
            vmask = rmask[:, None] & (cols < W2)[None, :]
        else:  # two stride-2 accesses per row (the cache merges them)
            vox = vox_row[:, None] + 2 * ks[None, :]
            vmask = mask
        if INVERSE:
            v0 = tl.load(src + sub, mask=mask).to(tl.float32) * scale
            v1 = tl.load(src + sub + cs, mask=mask).to(tl.float32) * scale
            v2 = tl.load(src + sub + 2 * cs, mask=mask).to(tl.float32) * scale
            v3 = tl.load(src + sub + 3 * cs, mask=mask).to(tl.float32) * scale
            v4 = tl.load(src + sub + 4 * cs, mask=mask).to(tl.float32) * scale
            v5 = tl.load(src + sub + 5 * cs, mask=mask).to(tl.float32) * scale
            v6 = tl.load(src + sub + 6 * cs, mask=mask).to(tl.float32) * scale
            v7 = tl.load(src + sub + 7 * cs, mask=mask).to(tl.float32) * scale
        elif SPLIT:
            p00 = tl.load(src + vox, mask=vmask).to(tl.float32) * scale
            p01 = tl.load(src + vox + W2, mask=vmask).to(tl.float32) * scale
            p10 = tl.load(src + vox + HW2, mask=vmask).to(tl.float32) * scale
            p11 = tl.load(src + vox + HW2 + W2, mask=vmask).to(tl.float32) * scale
            v0, v1 = tl.split(tl.reshape(p00, (BLOCK_R, BLOCK_K, 2)))
            v2, v3 = tl.split(tl.reshape(p01, (BLOCK_R, BLOCK_K, 2)))
            v4, v5 = tl.split(tl.reshape(p10, (BLOCK_R, BLOCK_K, 2)))
            v6, v7 = tl.split(tl.reshape(p11, (BLOCK_R, BLOCK_K, 2)))
        else:
            v0 = tl.load(src + vox, mask=mask).to(tl.float32) * scale
            v1 = tl.load(src + vox + 1, mask=mask).to(tl.float32) * scale
            v2 = tl.load(src + vox + W2, mask=mask).to(tl.float32) * scale
            v3 = tl.load(src + vox + W2 + 1, mask=mask).to(tl.float32) * scale
            v4 = tl.load(src + vox + HW2, mask=mask).to(tl.float32) * scale
            v5 = tl.load(src + vox + HW2 + 1, mask=mask).to(tl.float32) * scale
            v6 = tl.load(src + vox + HW2 + W2, mask=mask).to(tl.float32) * scale
            v7 = tl.load(src + vox + HW2 + W2 + 1, mask=mask).to(tl.float32) * scale
        # butterflies (a, b) -> (a + b, a + b - 2b) on the bit 4 (D), then 2 (H), then 1 (W): the torch path's order
        # and arithmetic, so float32 results agree to the last bit or two. The Haar matrix is its own inverse.
        v0 = v0 + v4
        v4 = v0 - 2 * v4
        v1 = v1 + v5
        v5 = v1 - 2 * v5
        v2 = v2 + v6
        v6 = v2 - 2 * v6
        v3 = v3 + v7
        v7 = v3 - 2 * v7
        v0 = v0 + v2
        v2 = v0 - 2 * v2
        v1 = v1 + v3
        v3 = v1 - 2 * v3
        v4 = v4 + v6
        v6 = v4 - 2 * v6
        v5 = v5 + v7
        v7 = v5 - 2 * v7
        v0 = v0 + v1
        v1 = v0 - 2 * v1
        v2 = v2 + v3
        v3 = v2 - 2 * v3
        v4 = v4 + v5
        v5 = v4 - 2 * v5
        v6 = v6 + v7
        v7 = v6 - 2 * v7
        out_t = dst.dtype.element_ty
        if INVERSE and SPLIT:
            tl.store(dst + vox, tl.reshape(tl.join(v0, v1), (BLOCK_R, 2 * BLOCK_K)).to(out_t), mask=vmask)
            tl.store(dst + vox + W2, tl.reshape(tl.join(v2, v3), (BLOCK_R, 2 * BLOCK_K)).to(out_t), mask=vmask)
            tl.store(dst + vox + HW2, tl.reshape(tl.join(v4, v5), (BLOCK_R, 2 * BLOCK_K)).to(out_t), mask=vmask)
            tl.store(dst + vox + HW2 + W2, tl.reshape(tl.join(v6, v7), (BLOCK_R, 2 * BLOCK_K)).to(out_t),
                     mask=vmask)
        elif INVERSE:
            tl.store(dst + vox, v0.to(out_t), mask=mask)
            tl.store(dst + vox + 1, v1.to(out_t), mask=mask)
            tl.store(dst + vox + W2, v2.to(out_t), mask=mask)
            tl.store(dst + vox + W2 + 1, v3.to(out_t), mask=mask)
            tl.store(dst + vox + HW2, v4.to(out_t), mask=mask)
            tl.store(dst + vox + HW2 + 1, v5.to(out_t), mask=mask)
            tl.store(dst + vox + HW2 + W2, v6.to(out_t), mask=mask)
            tl.store(dst + vox + HW2 + W2 + 1, v7.to(out_t), mask=mask)
        else:
            tl.store(dst + sub, v0.to(out_t), mask=mask)
            tl.store(dst + sub + cs, v1.to(out_t), mask=mask)
            tl.store(dst + sub + 2 * cs, v2.to(out_t), mask=mask)
            tl.store(dst + sub + 3 * cs, v3.to(out_t), mask=mask)
            tl.store(dst + sub + 4 * cs, v4.to(out_t), mask=mask)
            tl.store(dst + sub + 5 * cs, v5.to(out_t), mask=mask)
            tl.store(dst + sub + 6 * cs, v6.to(out_t), mask=mask)
            tl.store(dst + sub + 7 * cs, v7.to(out_t), mask=mask)

    return haar3d_kernel


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    return _build_triton_kernel()


#: kernel tuning. ``split``: contiguous voxel-side loads/stores de-interleaved in registers (tl.split / tl.join)
#: instead of stride-2 accesses; on an H100 it was 1.6x faster at 128^3 (benchmarks/wavelets.py, BENCHMARKS.md).
_FUSED_CONFIG = {"split": True, "block_k_max": 128, "block_elems": 1024, "num_warps": 4}


def _fused_haar_launch(src: torch.Tensor, inverse: bool, kernel=None) -> torch.Tensor:
    """Run the fused kernel: forward ``(B, C, D, H, W) -> (B, 8C, d, h, w)`` or inverse (``inverse=True``)."""
    src = src.contiguous()
    if inverse:
        b, c8, d, h, w = src.shape
        c = c8 // 8
        out = torch.empty((b, c, 2 * d, 2 * h, 2 * w), dtype=src.dtype, device=src.device)
    else:
        b, c, d2, h2, w2 = src.shape
        c, d, h, w = c, d2 // 2, h2 // 2, w2 // 2
        out = torch.empty((b, 8 * c, d, h, w), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    cfg = _FUSED_CONFIG
    block_k = min(cfg["block_k_max"], 1 << max(0, (w - 1).bit_length()))
    block_r = max(1, cfg["block_elems"] // block_k)
    n_rows = b * c * d * h
    grid = ((n_rows + block_r - 1) // block_r, (w + block_k - 1) // block_k)
    kernel = kernel or _triton_kernel()
    # Triton launches on the current CUDA device: make it the tensor's (multi-GPU, e.g. cuda:1 while cuda:0 is current)
    with torch.cuda.device(src.device) if src.is_cuda else contextlib.nullcontext():
        kernel[grid](src, out, n_rows, c, d, h, w, _INV_2SQRT2, INVERSE=inverse, SPLIT=cfg["split"],
                     BLOCK_R=block_r, BLOCK_K=block_k, num_warps=cfg["num_warps"])
    return out


def _haar(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The Haar transform of ``x`` by the fused kernel where it applies, else by the torch path."""
    # the kernel indexes in int32: tensors of 2^31 elements or more (e.g. (1, 3, 1024, 1024, 1024)) take the torch path
    if fused_haar_available(x) and x.numel() < 2**31:
        try:
            return _fused_haar_launch(x, inverse)
        except Exception as err:  # a Triton build/launch failure: fall back for good, say so once
            _fused_haar["failed"] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"The fused Triton Haar kernel failed ({_fused_haar['failed'][:300]}); falling back to the torch "
                "implementation for the rest of this process (same results, more memory passes). "
                "Set WDM3D_FUSED_HAAR=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _haar_inverse_kernel(x) if inverse else _haar_forward_kernel(x)


class _HaarDWT(torch.autograd.Function):
    # The transform is orthonormal, so the gradient of the DWT is the IDWT of the incoming gradient and vice versa.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _haar(x, inverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _HaarIDWT.apply(grad)


class _HaarIDWT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _haar(y, inverse=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _HaarDWT.apply(grad)


# --------------------------------------------------------------------------------------------------------------------
# other wavelets: pytorch_wavelets' 1D transforms along each axis (it has 1D and 2D transforms, no 3D one)
# --------------------------------------------------------------------------------------------------------------------


def _import_pytorch_wavelets():
    try:
        with warnings.catch_warnings():  # its pkg_resources import warns on every setuptools < 81
            warnings.simplefilter("ignore", UserWarning)
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
    # (built in float32 and converted, a float64 transform was only float32-accurate: db2 round trip 2e-7)
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


# --------------------------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------------------------


def dwt3d(
    x: torch.Tensor,
    wavelet: str = "haar",
    mode: str = "periodization",
    pad_mode: str | None = None,
) -> torch.Tensor:
    """One level of the 3D discrete wavelet transform.

    Args:
        x: volume batch, shape ``(B, C, D, H, W)``, any floating dtype and device.
        wavelet: ``"haar"`` (fast path) or any PyWavelets name (``"db2"``, ``"sym4"``, ``"coif1"``...).
        mode: boundary mode for non-Haar wavelets, one of :data:`WAVELET_MODES` (ignored for Haar).
        pad_mode: what to do with odd spatial sizes: None raises, otherwise pad one voxel at the end of each odd
            axis with this ``torch.nn.functional.pad`` mode.

    Returns:
        ``(B, 8C, D/2, H/2, W/2)`` (sizes rounded up after padding; larger for non-periodic modes), subband-major.

    Example:
        >>> y = dwt3d(torch.randn(2, 1, 16, 16, 16))
        >>> y.shape, SUBBANDS[0]
        (torch.Size([2, 8, 8, 8, 8]), 'LLL')
    """
    _check_volume(x)
    _check_pad_mode(pad_mode)
    x = _pad_to_even(x, pad_mode)
    if _is_haar(wavelet):
        return _HaarDWT.apply(x)
    if mode not in WAVELET_MODES:
        raise ValueError(f"mode must be one of {WAVELET_MODES} for wavelet {wavelet!r}, got {mode!r}.")
    return _generic_forward(x, wavelet, mode)


def idwt3d(
    y: torch.Tensor,
    wavelet: str = "haar",
    mode: str = "periodization",
    output_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Inverse of :func:`dwt3d`: ``(B, 8C, d, h, w) -> (B, C, 2d, 2h, 2w)``, cropped to ``output_shape``.

    Args:
        y: subband-major coefficients as returned by :func:`dwt3d`.
        wavelet: the wavelet used for the forward transform.
        mode: the boundary mode used for the forward transform (non-Haar only).
        output_shape: spatial shape ``(D, H, W)`` of the original volume (needed after padding or with
            non-periodic modes); None keeps the full reconstruction.
    """
    _check_volume(y, "y")
    if y.shape[1] % 8 != 0:
        raise ValueError(
            f"y must have 8*C channels (8 subbands per input channel), got shape {tuple(y.shape)} with "
            f"{y.shape[1]} channels."
        )
    if _is_haar(wavelet):
        x = _HaarIDWT.apply(y)
    else:
        if mode not in WAVELET_MODES:
            raise ValueError(f"mode must be one of {WAVELET_MODES} for wavelet {wavelet!r}, got {mode!r}.")
        x = _generic_inverse(y, wavelet, mode)
    return _crop(x, output_shape)


def subband(y: torch.Tensor, name: str | int) -> torch.Tensor:
    """The channels of one subband of ``y`` (B, 8C, ...), by name (``"LLH"``) or index: ``(B, C, ...)``."""
    k = SUBBANDS.index(name.upper()) if isinstance(name, str) else int(name)
    if not 0 <= k < 8:
        raise ValueError(f"subband must be one of {SUBBANDS} or 0..7, got {name!r}.")
    c = y.shape[1] // 8
    return y[:, k * c : (k + 1) * c]


class WaveletPyramid(NamedTuple):
    """A multi-level decomposition.

    Attributes:
        low: the coarsest low band (LLL of the last level), ``(B, C, D/2^L, H/2^L, W/2^L)``.
        details: the 7 detail subbands of each level, finest first, each ``(B, 7C, ...)`` in :data:`SUBBANDS`
            order without LLL.
        shapes: the spatial shape of the input of each level, finest first (used to crop after padding).
    """

    low: torch.Tensor
    details: list[torch.Tensor]
    shapes: list[tuple[int, int, int]]


def wavedec3d(
    x: torch.Tensor,
    levels: int,
    wavelet: str = "haar",
    mode: str = "periodization",
    pad_mode: str | None = None,
) -> WaveletPyramid:
    """Multi-level 3D DWT: the LLL band is transformed again ``levels`` times.

    Args:
        x: ``(B, C, D, H, W)``.
        levels: number of levels (>= 1). Without ``pad_mode`` every level's size must be even.
        wavelet, mode, pad_mode: as in :func:`dwt3d`.
    """
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}.")
    _check_volume(x)
    c = x.shape[1]
    low, details, shapes = x, [], []
    for _ in range(levels):
        shapes.append(tuple(low.shape[-3:]))
        y = dwt3d(low, wavelet, mode, pad_mode)
        low, detail = y[:, :c], y[:, c:]
        details.append(detail)
    return WaveletPyramid(low, details, shapes)


def waverec3d(pyramid: WaveletPyramid, wavelet: str = "haar", mode: str = "periodization") -> torch.Tensor:
    """Inverse of :func:`wavedec3d`; returns a volume of the shape that was decomposed."""
    low = pyramid.low
    for detail, shape in zip(reversed(pyramid.details), reversed(pyramid.shapes)):
        if detail.shape[-3:] != low.shape[-3:]:
            raise ValueError(
                f"detail bands of shape {tuple(detail.shape)} do not match the low band {tuple(low.shape)}."
            )
        low = idwt3d(torch.cat((low, detail), dim=1), wavelet, mode, output_shape=shape)
    return low


# --------------------------------------------------------------------------------------------------------------------
# WDM's LLL scaling and the wavelet space diffusion runs in
# --------------------------------------------------------------------------------------------------------------------


def _check_lll_scale(lll_scale: float) -> float:
    if not (isinstance(lll_scale, (int, float)) and lll_scale > 0 and math.isfinite(lll_scale)):
        raise ValueError(f"lll_scale must be a positive finite number (3.0 as WDM, 1.0 for none), got {lll_scale!r}.")
    return float(lll_scale)


def scale_lll(y: torch.Tensor, lll_scale: float = 3.0) -> torch.Tensor:
    """Divide the LLL channels of ``y`` (B, 8C, ...) by ``lll_scale`` (out of place)."""
    lll_scale = _check_lll_scale(lll_scale)
    if lll_scale == 1.0:
        return y
    c = y.shape[1] // 8
    return torch.cat((y[:, :c] / lll_scale, y[:, c:]), dim=1)


def unscale_lll(y: torch.Tensor, lll_scale: float = 3.0) -> torch.Tensor:
    """Multiply the LLL channels of ``y`` (B, 8C, ...) by ``lll_scale`` (out of place); inverse of :func:`scale_lll`."""
    lll_scale = _check_lll_scale(lll_scale)
    if lll_scale == 1.0:
        return y
    c = y.shape[1] // 8
    return torch.cat((y[:, :c] * lll_scale, y[:, c:]), dim=1)


def to_wavelet_space(x: torch.Tensor, lll_scale: float = 3.0, wavelet: str = "haar", **kwargs) -> torch.Tensor:
    """Image ``(B, C, D, H, W)`` -> diffusion space ``(B, 8C, D/2, H/2, W/2)``: DWT, then LLL / ``lll_scale``."""
    return scale_lll(dwt3d(x, wavelet, **kwargs), lll_scale)


def from_wavelet_space(
    y: torch.Tensor, lll_scale: float = 3.0, wavelet: str = "haar", output_shape: Sequence[int] | None = None, **kwargs
) -> torch.Tensor:
    """Diffusion space -> image: LLL * ``lll_scale``, then IDWT (cropped to ``output_shape`` if given)."""
    return idwt3d(unscale_lll(y, lll_scale), wavelet, output_shape=output_shape, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# nn.Module wrappers (for networks and MONAI bundle configs)
# --------------------------------------------------------------------------------------------------------------------


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
