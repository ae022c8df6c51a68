"""3D discrete wavelet transforms for volumes, in the layout WDM diffuses in.

One level of the transform maps ``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``. The eight subbands are stacked
*subband-major*: channels ``[k*C:(k+1)*C]`` hold subband ``k`` of every input channel, so ``y[:, :C]`` is LLL.
Subband ``k`` has the bits ``k = 4*d + 2*h + w`` where a bit is 0 for the low-pass and 1 for the high-pass filter
along that axis; the names in :data:`SUBBANDS` spell the same thing with letters for the axes (D, H, W) in order.

Haar (the WDM transform) has a fast path built from one strided gather and three in-place butterflies
(no matrices, no Python loops over voxels; :mod:`~wdm3d.wavelets.haar`, the one home of its arithmetic, which
TorchScript exports compile too: :func:`haar_dwt3d`). Its low-pass taps are ``(1, 1)/sqrt(2)`` and its high-pass taps
``(1, -1)/sqrt(2)`` (``H = (x[2i] - x[2i+1]) / sqrt(2)``, the sign PyWavelets and pytorch_wavelets use), so the
transform is orthonormal: the inverse is the transpose, energy is preserved (Parseval) and
``LLL = 2*sqrt(2) * mean`` of each 2x2x2 block. On CUDA tensors (float32/bfloat16/float16) the same transform runs
as one fused Triton kernel (one read and one write of each voxel) when Triton imports
(:mod:`~wdm3d.wavelets.fused`); see :func:`set_fused_haar` and :func:`fused_haar_available`. Both paths give the
same coefficients (float32: to the last bit or two; half types: both compute in float32 and round once).

Other wavelets (``db2``, ``sym4``, ``coif1``, ... anything PyWavelets knows) are applied separably with
pytorch_wavelets' 1D transforms (:mod:`~wdm3d.wavelets.generic`). Their boundary handling is the ``mode``
argument: the default ``"periodization"`` keeps subbands at exactly half size and the transform orthonormal;
``"zero"``, ``"symmetric"`` and ``"reflect"`` give slightly larger subbands (pass ``output_shape`` to the inverse to
crop back).

Odd sizes: by default an odd spatial size raises a ``ValueError`` naming the shape. With ``pad_mode`` set
(``"replicate"``, ``"reflect"`` or ``"constant"``) each odd axis is padded by one voxel at its end; the inverse
crops back when given ``output_shape`` (the multi-level functions record the shapes for you).

LLL scaling (WDM, :mod:`~wdm3d.wavelets.space`): WDM divides the LLL band by 3 before diffusion and multiplies it
back before the inverse. :func:`to_wavelet_space` / :func:`from_wavelet_space` and :class:`WaveletSpace` do the DWT
together with that scaling (``lll_scale=3.0`` by default, ``1.0`` turns it off). The effect: a wavelet-domain MSE
weights the LLL error by ``1 / lll_scale**2`` relative to image space, and the low band sees a lower signal-to-noise
ratio at every t.
"""

# the underscored names are the paths one by one, for benchmarks/wavelets.py and the tests that compare them; a test
# that replaces one patches the submodule that calls it (wdm3d.wavelets.fused, wdm3d.wavelets.dwt), not this package
from .dwt import WaveletPyramid, dwt3d, haar_dwt3d, haar_idwt3d, idwt3d, wavedec3d, waverec3d
from .dwt import _haar as _haar
from .fused import _FUSED_CONFIG as _FUSED_CONFIG
from .fused import FUSED_HAAR_DTYPES, fused_haar_available, set_fused_haar
from .fused import _build_triton_kernel as _build_triton_kernel
from .fused import _fused_haar as _fused_haar
from .fused import _fused_haar_launch as _fused_haar_launch
from .generic import _generic_forward as _generic_forward
from .generic import _generic_inverse as _generic_inverse
from .haar import _haar_forward_kernel as _haar_forward_kernel
from .haar import _haar_inverse_kernel as _haar_inverse_kernel
from .haar import haar_forward, haar_inverse
from .layout import PAD_MODES, SUBBANDS, WAVELET_MODES, subband
from .space import DWT3d, IDWT3d, WaveletSpace, from_wavelet_space, scale_lll, to_wavelet_space, unscale_lll

__all__ = [
    "SUBBANDS",
    "PAD_MODES",
    "WAVELET_MODES",
    "dwt3d",
    "idwt3d",
    "haar_dwt3d",
    "haar_idwt3d",
    "haar_forward",
    "haar_inverse",
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
