"""The fused GPU Haar path: one Triton kernel, one read and one write of every voxel, and the switch that selects it.

On a GPU the torch path (:mod:`wdm3d.wavelets.haar`: gather + 3 butterflies, each reading and writing the whole
tensor) costs ~11 tensor passes, while the transform itself needs one. PyTorch has no fused 3D Haar; the Triton kernel
here loads the 8 voxels of each 2x2x2 block (or the 8 subband values of one position), runs the same butterflies in
registers (in float32 for half types) and stores 8 values. It is used for CUDA tensors of dtype float32/bfloat16/
float16 whenever Triton imports; everything else (CPU, float64, no Triton) takes the torch path. If the kernel fails
to build or launch, :func:`wdm3d.wavelets.dwt.dwt3d` warns once and uses the torch path from then on.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .haar import _INV_2SQRT2

__all__ = ["FUSED_HAAR_DTYPES", "fused_haar_available", "set_fused_haar"]

#: dtypes the fused kernel handles (float64 and CPU tensors use the torch path).
FUSED_HAAR_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

_fused_haar = {
    "enabled": os.environ.get("WDM3D_FUSED_HAAR", "1").lower() not in ("0", "false", "no", "off"),
    "failed": None,
}


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
        # Triton is optional (GPU installs only) and slow to import: only asked when a CUDA tensor could use it
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
    import triton  # optional (GPU installs) and slow to import: only on the first fused launch
    import triton.language as tl

    @triton.jit
    def haar3d_kernel(
        src,
        dst,
        n_rows,
        C,
        d,
        h,
        w,
        scale,
        INVERSE: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
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
            tl.store(dst + vox + HW2 + W2, tl.reshape(tl.join(v6, v7), (BLOCK_R, 2 * BLOCK_K)).to(out_t), mask=vmask)
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
        kernel[grid](
            src,
            out,
            n_rows,
            c,
            d,
            h,
            w,
            _INV_2SQRT2,
            INVERSE=inverse,
            SPLIT=cfg["split"],
            BLOCK_R=block_r,
            BLOCK_K=block_k,
            num_warps=cfg["num_warps"],
        )
    return out
