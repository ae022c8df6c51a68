import math

import pytest
import torch
from torch import nn

from wdm3d import wavelets as wv
from wdm3d.wavelets import (
    SUBBANDS,
    DWT3d,
    IDWT3d,
    WaveletSpace,
    dwt3d,
    from_wavelet_space,
    idwt3d,
    subband,
    to_wavelet_space,
    wavedec3d,
    waverec3d,
)
from wdm3d.wavelets import dwt as wv_dwt
from wdm3d.wavelets import fused as wv_fused

S = 1 / (2 * math.sqrt(2))


def test_subband_order_hand_computed_linear_ramp():
    # x[d, h, w] = 4d + 2h + w: sums by hand with taps low (+1, +1), high (+1, -1), times 1/(2 sqrt 2)
    x = torch.arange(8, dtype=torch.float64).reshape(1, 1, 2, 2, 2)
    expected = torch.tensor([28, -4, -8, 0, -16, 0, 0, 0], dtype=torch.float64) * S
    assert torch.allclose(dwt3d(x).flatten(), expected)


def test_subband_order_hand_computed_corner_impulse():
    # an impulse at (1, 1, 1) picks the sign (-1) of every high-pass filter it passes through
    x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    x[0, 0, 1, 1, 1] = 1
    signs = {"L": 1, "H": -1}
    expected = torch.tensor([signs[n[0]] * signs[n[1]] * signs[n[2]] for n in SUBBANDS], dtype=torch.float64) * S
    assert torch.allclose(dwt3d(x).flatten(), expected)
    # an impulse at (0, 0, 1) (W odd): only bands with H in W (last letter) flip
    x = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0, 1] = 1
    expected = torch.tensor([-1 if n[2] == "H" else 1 for n in SUBBANDS], dtype=torch.float64) * S
    assert torch.allclose(dwt3d(x).flatten(), expected)


def test_lll_is_scaled_block_mean_and_layout_is_subband_major():
    x = torch.rand(2, 3, 8, 6, 4, dtype=torch.float64)
    y = dwt3d(x)
    assert y.shape == (2, 24, 4, 3, 2)
    block_mean = torch.nn.functional.avg_pool3d(x, 2)
    assert torch.allclose(y[:, :3], 2 * math.sqrt(2) * block_mean)
    # channel c of subband k lives at k*C + c: scaling input channel 1 scales exactly those channels
    x2 = x.clone()
    x2[:, 1] *= 5
    y2 = dwt3d(x2)
    for k in range(8):
        assert torch.allclose(y2[:, 3 * k + 1], 5 * y[:, 3 * k + 1])
        assert torch.allclose(y2[:, 3 * k], y[:, 3 * k])
    assert torch.equal(subband(y, "LHL"), y[:, 6:9])
    assert torch.equal(subband(y, 7), y[:, 21:24])


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 3, 8, 12, 20), (3, 2, 2, 2, 2)])
def test_exact_inverse_fp32(shape):
    x = torch.randn(shape)
    err = (idwt3d(dwt3d(x)) - x).abs().max().item()
    assert err <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_dtypes_are_kept_and_inverse_holds(dtype, tol):
    x = torch.randn(2, 2, 8, 8, 8).to(dtype)
    y = dwt3d(x)
    assert y.dtype == dtype
    r = idwt3d(y)
    assert r.dtype == dtype
    assert ((r.double() - x.double()).abs().max() / x.double().abs().max()).item() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_are_computed_in_float32_and_rounded_once(dtype):
    # smooth data: a ~ b in every butterfly, where a - b computed in the half type lost most of its digits
    g = torch.linspace(0, 1, 32)
    x = (torch.sin(3 * g)[:, None, None] + torch.cos(2 * g)[None, :, None] + g[None, None, :] ** 2)[None, None]
    xh = x.to(dtype)
    exact = dwt3d(xh.double())
    y = dwt3d(xh)
    assert y.dtype == dtype
    hhh = subband(exact, "HHH")
    assert (subband(y, "HHH").double() - hhh).abs().max() <= 2**-8 * hhh.abs().max() + 1e-6  # one rounding
    detail = exact[:, 1:]
    rel = ((y[:, 1:].double() - detail).square().mean() / detail.square().mean()).sqrt()
    assert rel < 0.01  # ~0.1 if the butterflies ran in the half type
    back = idwt3d(exact.to(dtype))
    assert ((back.double() - idwt3d(exact)).abs().max() / x.abs().max()).item() < 2**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_haar_in_place_and_differentiable_forms_give_the_same_bits(dtype):
    # one arithmetic, two ways to run it: in place (the eager torch path) and out of place (TorchScript exports)
    haar_forward, haar_inverse = wv.haar_forward, wv.haar_inverse
    x = torch.randn(2, 3, 8, 6, 4).to(dtype)
    y = haar_forward(x)
    assert torch.equal(haar_forward(x, in_place=True), y) and torch.equal(dwt3d(x), y)
    assert torch.equal(haar_inverse(y, in_place=True), haar_inverse(y)) and torch.equal(idwt3d(y), haar_inverse(y))
    noncontiguous = torch.randn(2, 8, 4, 6, 3).to(dtype).permute(0, 1, 4, 3, 2)  # (2, 8, 3, 6, 4) after the swap
    noncontiguous = noncontiguous[:, :, :2]
    assert torch.equal(haar_forward(noncontiguous, in_place=True), haar_forward(noncontiguous.contiguous()))


def test_fused_kernel_is_not_used_beyond_int32_indexing(monkeypatch):
    # the Triton kernel indexes in int32: a tensor of 2^31 elements must take the torch path (meta: no memory)
    monkeypatch.setattr(wv_fused, "fused_haar_available", lambda x=None: True)
    monkeypatch.setitem(wv_fused._fused_haar, "failed", None)  # restored after the test
    launched = []

    def launch(x, inverse, kernel=None):
        launched.append(tuple(x.shape))
        raise RuntimeError("no GPU here")  # _haar falls back to the torch path (and warns)

    monkeypatch.setattr(wv_fused, "_fused_haar_launch", launch)
    big = torch.empty((1, 2, 1024, 1024, 1024), device="meta")
    assert wv_dwt._haar(big, inverse=False).shape == (1, 16, 512, 512, 512)
    assert launched == []
    with pytest.warns(RuntimeWarning, match="fused Triton Haar kernel failed"):
        wv_dwt._haar(torch.empty((1, 1, 4, 4, 4), device="meta"), inverse=False)
    assert launched == [(1, 1, 4, 4, 4)]  # below the limit the kernel is tried


def test_parseval_energy_preserved():
    x = torch.randn(2, 3, 16, 8, 12, dtype=torch.float64)
    y = dwt3d(x)
    assert torch.allclose(y.pow(2).sum(), x.pow(2).sum(), rtol=1e-12)
    x32 = x.float()
    assert abs(dwt3d(x32).pow(2).sum().item() / x32.pow(2).sum().item() - 1) < 1e-5


def test_non_contiguous_input():
    x = torch.randn(1, 2, 8, 8, 8).to(memory_format=torch.channels_last_3d)
    assert not x.is_contiguous()
    assert torch.allclose(dwt3d(x), dwt3d(x.contiguous()))


def test_autograd_gradcheck_and_double_backward():
    x = torch.randn(2, 2, 4, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dwt3d, (x,))
    assert torch.autograd.gradgradcheck(dwt3d, (x,))
    y = torch.randn(1, 16, 2, 3, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(idwt3d, (y,))
    assert torch.autograd.gradgradcheck(idwt3d, (y,))


def test_gradient_of_dwt_is_idwt_of_upstream_gradient():
    x = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    g = torch.randn(1, 8, 2, 2, 2)
    (dwt3d(x) * g).sum().backward()
    assert torch.allclose(x.grad, idwt3d(g), atol=1e-6)


def test_odd_size_error_names_the_shape():
    x = torch.randn(1, 1, 8, 9, 8)
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 9, 8\).*'H'"):
        dwt3d(x)
    with pytest.raises(ValueError, match="odd"):
        DWT3d()(x)


@pytest.mark.parametrize("pad_mode", ["replicate", "reflect", "constant"])
def test_odd_size_padding_policy_crops_back(pad_mode):
    x = torch.randn(2, 1, 7, 10, 5)
    y = dwt3d(x, pad_mode=pad_mode)
    assert y.shape == (2, 8, 4, 5, 3)
    r = idwt3d(y, output_shape=x.shape)
    assert r.shape == x.shape
    assert (r - x).abs().max().item() <= 1e-5
    # without output_shape the padded volume comes back; the padded voxels follow the pad mode
    full = idwt3d(y)
    assert full.shape == (2, 1, 8, 10, 6)
    if pad_mode == "replicate":
        assert torch.allclose(full[:, :, 7, :, :5], x[:, :, 6], atol=1e-5)
    if pad_mode == "constant":
        assert full[:, :, 7].abs().max().item() <= 1e-5


def test_output_shape_larger_than_reconstruction_is_an_error():
    with pytest.raises(ValueError, match="larger than"):
        idwt3d(torch.randn(1, 8, 2, 2, 2), output_shape=(5, 4, 4))


def test_input_validation_messages():
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        dwt3d(torch.randn(8, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        dwt3d(torch.ones(1, 1, 2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="8\\*C channels"):
        idwt3d(torch.randn(1, 6, 2, 2, 2))
    with pytest.raises(ValueError, match="pad_mode"):
        dwt3d(torch.randn(1, 1, 2, 2, 2), pad_mode="wrap")
    with pytest.raises(ValueError, match="Unknown wavelet"):
        dwt3d(torch.randn(1, 1, 8, 8, 8), wavelet="nope7")


@pytest.mark.parametrize("wavelet", ["db2", "sym4", "coif1"])
def test_non_haar_periodization_is_orthonormal(wavelet):
    x = torch.randn(2, 2, 16, 16, 24)
    y = dwt3d(x, wavelet)
    assert y.shape == (2, 16, 8, 8, 12)
    assert (idwt3d(y, wavelet) - x).abs().max().item() <= 1e-5
    assert abs(y.double().pow(2).sum().item() / x.double().pow(2).sum().item() - 1) < 1e-5


@pytest.mark.parametrize("mode", ["zero", "symmetric", "reflect"])
def test_non_haar_other_boundary_modes_reconstruct(mode):
    x = torch.randn(1, 2, 12, 10, 16)
    y = dwt3d(x, "db2", mode=mode)
    assert y.shape[-3:] == (7, 6, 9)  # floor((n + 4 - 1) / 2) with 4 taps
    r = idwt3d(y, "db2", mode=mode, output_shape=x.shape)
    assert (r - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("wavelet", ["db2", "sym4"])
def test_non_haar_float64_is_float64_accurate(wavelet):
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    y = dwt3d(x, wavelet=wavelet, mode="periodization")
    assert y.dtype == torch.float64 and torch.get_default_dtype() == torch.float32  # default dtype restored
    # PyWavelets' own taps are orthonormal to ~1e-12 (sym4); built in float32 the round trip would be off by ~2e-7
    assert (idwt3d(y, wavelet=wavelet, mode="periodization") - x).abs().max().item() < 1e-10


def test_generic_path_agrees_with_haar_fast_path():
    x = torch.randn(2, 3, 8, 4, 6, dtype=torch.float64)
    y = dwt3d(x)
    assert torch.allclose(wv._generic_forward(x, "haar", "periodization"), y, atol=1e-6)
    assert torch.allclose(wv._generic_inverse(y, "haar", "periodization"), x, atol=1e-6)


def test_non_haar_too_short_axis_is_an_error():
    with pytest.raises(ValueError, match="8 taps"):
        dwt3d(torch.randn(1, 1, 16, 16, 6), "sym4")


def test_non_haar_gradients():
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: dwt3d(v, "db2"), (x,), atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_multilevel_shapes_and_reconstruction(levels):
    x = torch.randn(2, 2, 16, 16, 32)
    pyr = wavedec3d(x, levels)
    assert pyr.low.shape == (2, 2, 16 >> levels, 16 >> levels, 32 >> levels)
    assert [d.shape[1] for d in pyr.details] == [14] * levels
    assert [d.shape[-1] for d in pyr.details] == [32 >> (j + 1) for j in range(levels)]
    assert (waverec3d(pyr) - x).abs().max().item() <= 1e-5
    # the coarse low band is the LLL of the LLL: (2 sqrt 2)^levels times the mean of each 2^levels block
    mean = torch.nn.functional.avg_pool3d(x, 2**levels)
    assert torch.allclose(pyr.low, (2 * math.sqrt(2)) ** levels * mean, atol=1e-4)


def test_multilevel_with_padding_and_non_haar():
    x = torch.randn(1, 1, 18, 14, 11)
    pyr = wavedec3d(x, 2, pad_mode="replicate")
    assert pyr.shapes == [(18, 14, 11), (9, 7, 6)]
    assert (waverec3d(pyr) - x).abs().max().item() <= 1e-5
    x = torch.randn(1, 1, 32, 32, 32)
    pyr = wavedec3d(x, 2, wavelet="db2")
    assert (waverec3d(pyr, wavelet="db2") - x).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="levels"):
        wavedec3d(x, 0)


def test_lll_scaling_only_touches_lll_and_inverts():
    x = torch.rand(2, 2, 8, 8, 8) * 2 - 1
    y = dwt3d(x)
    z = to_wavelet_space(x, lll_scale=3.0)
    assert torch.allclose(z[:, :2], y[:, :2] / 3)
    assert torch.equal(z[:, 2:], y[:, 2:])
    assert (from_wavelet_space(z, lll_scale=3.0) - x).abs().max().item() <= 1e-5
    assert torch.equal(to_wavelet_space(x, lll_scale=1.0), y)
    # the wavelet-domain MSE of an LLL-only error is the image MSE divided by lll_scale**2
    e = torch.zeros_like(y)
    e[:, :2] = torch.randn_like(y[:, :2])
    img_err = idwt3d(e).pow(2).sum()
    assert torch.allclose(wv.scale_lll(e, 3.0).pow(2).sum(), img_err / 9, rtol=1e-5)
    with pytest.raises(ValueError, match="lll_scale"):
        to_wavelet_space(x, lll_scale=0)


def test_modules_in_a_network():
    space = WaveletSpace(lll_scale=3.0)
    assert space.lll_scale == 3.0 and len(list(space.parameters())) == 0
    net = nn.Sequential(DWT3d(), nn.Conv3d(8, 8, 1), IDWT3d())
    x = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    v = torch.randn(1, 1, 6, 8, 10)
    assert (space.decode(space.encode(v)) - v).abs().max().item() <= 1e-5
    padded = WaveletSpace(pad_mode="replicate")
    w = torch.randn(1, 1, 5, 6, 7)
    assert (padded.decode(padded.encode(w), output_shape=w.shape) - w).abs().max().item() <= 1e-5
    assert "lll_scale=3.0" in repr(space)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    x = torch.randn(2, 2, 16, 16, 16)
    y = dwt3d(x.cuda())
    assert y.is_cuda
    assert torch.allclose(y.cpu(), dwt3d(x), atol=1e-6)
    assert (idwt3d(y).cpu() - x).abs().max().item() <= 1e-5
    yb = dwt3d(x.cuda().bfloat16())
    assert yb.dtype == torch.bfloat16
