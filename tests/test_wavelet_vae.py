import math

import pytest
import torch
import torch.nn.functional as F

from wdm3d.losses import VAELoss, wavelet_pyramid_loss
from wdm3d.networks.vae_base import LatentDistribution, VAEOutput
from wdm3d.networks.wavelet_vae import WaveletVAE3D, haar_gain
from wdm3d.wavelets import dwt3d

TINY = dict(base_channels=8, num_res_blocks=1, norm_num_groups=4, refine_channels=4)


def _volume(b: int = 2, c: int = 1, n: int = 16) -> torch.Tensor:
    # smooth blobs plus noise: something with both low-band content and details
    g = torch.linspace(-1, 1, n)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    base = torch.exp(-4 * (zz**2 + yy**2 + (xx - 0.2) ** 2))
    return (base + 0.1 * torch.randn(b, c, n, n, n)).clamp(-1, 1)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shapes_per_level(levels):
    vae = WaveletVAE3D(levels=levels, latent_channels=6, **TINY)
    x = _volume(n=16)
    out = vae(x)
    f = 2**levels
    assert vae.downsample_factor == f and vae.latent_channels == 6
    assert out.latent.shape == (2, 6, 16 // f, 16 // f, 16 // f)
    assert out.posterior.mean.shape == out.posterior.stddev.shape == out.latent.shape
    assert out.reconstruction.shape == x.shape
    assert vae.decode(out.latent).shape == x.shape
    assert len(out.enc_coeffs) == len(out.dec_coeffs) == levels
    for lvl, (e, d) in enumerate(zip(out.enc_coeffs, out.dec_coeffs)):
        assert e.shape == d.shape == (2, 8, 16 // 2 ** (lvl + 1), 16 // 2 ** (lvl + 1), 16 // 2 ** (lvl + 1))
    assert torch.isfinite(wavelet_pyramid_loss(out.enc_coeffs, out.dec_coeffs))


def test_multichannel_shapes():
    vae = WaveletVAE3D(in_channels=2, levels=2, latent_channels=8, **TINY)
    out = vae(_volume(c=2, n=8))
    assert out.latent.shape == (2, 8, 2, 2, 2) and out.reconstruction.shape == (2, 2, 8, 8, 8)
    assert out.enc_coeffs[0].shape == (2, 16, 4, 4, 4)


def test_gradients_reach_every_parameter():
    vae = WaveletVAE3D(levels=2, latent_channels=8, zero_init_residual=False, **TINY)
    x = _volume()
    out = vae(x, sample=True)
    total, _ = VAELoss(kl_weight=1e-2, extra_weights={"sparsity": 1e-2})(out, x, model=vae)
    total.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_noise_std_is_softplus_per_channel_and_positive():
    vae = WaveletVAE3D(levels=2, latent_channels=8, noise_init=0.2, **TINY)
    with torch.no_grad():
        vae.noise_rho.copy_(torch.linspace(-3, 2, 8))
    post = vae.encode(_volume())
    expected = F.softplus(torch.linspace(-3, 2, 8))
    assert torch.allclose(vae.noise_std, expected)
    assert (vae.noise_std > 0).all()
    assert torch.allclose(post.stddev, expected.view(1, 8, 1, 1, 1).expand_as(post.mean))
    # the reparameterised sample moves exactly with the scale of its channel
    z1 = post.sample(torch.Generator().manual_seed(1))
    with torch.no_grad():
        vae.noise_rho.add_(1.0)
    post2 = vae.encode(_volume())
    z2 = post2.sample(torch.Generator().manual_seed(1))
    ratio = (z2 - post2.mean) / (z1 - post.mean)
    assert torch.allclose(ratio, (vae.noise_std / expected).view(1, 8, 1, 1, 1).expand_as(ratio), rtol=1e-4)


def test_noise_init_and_floor():
    vae = WaveletVAE3D(levels=1, latent_channels=4, noise_init=0.3, min_std=0.05, **TINY)
    assert torch.allclose(vae.noise_std, torch.full((4,), 0.3))
    assert torch.allclose(vae.noise_std, 0.05 + F.softplus(vae.noise_rho))


def test_noise_samples_differ_and_noise_scale_trains():
    vae = WaveletVAE3D(levels=2, latent_channels=8, **TINY)
    x = _volume()
    a, b = vae(x).latent, vae(x).latent
    assert not torch.allclose(a, b)
    assert torch.equal(vae(x, sample=False).latent, vae.encode(x).mean)
    rho0 = vae.noise_rho.detach().clone()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    loss_fn = VAELoss()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(vae(x), x, model=vae)[0].backward()
        opt.step()
    assert not torch.allclose(vae.noise_rho.detach(), rho0)


def test_sparsity_term_is_l1_of_detail_code_and_follows_prior():
    x = _volume()
    # lossless-at-init L=1: the detail code is P applied to the normalised Haar detail bands
    vae = WaveletVAE3D(levels=1, latent_channels=8, prior="laplace", **TINY)
    details = dwt3d(x)[:, 1:] / (2 * math.sqrt(2))
    proj = vae.detail_proj.weight[:, :, 0, 0, 0]  # (7, 7)
    code = torch.einsum("zk,bkdhw->bzdhw", proj, details)
    out = vae(x)
    assert torch.allclose(out.extra_losses["sparsity"], code.abs().mean(), atol=1e-6)
    # with random residual heads it is still the L1 of the latent mean's detail channels
    vae = WaveletVAE3D(levels=2, latent_channels=5, prior="both", zero_init_residual=False, **TINY)
    out = vae(x)
    assert torch.allclose(out.extra_losses["sparsity"], vae.encode(x).mean[:, 1:].abs().mean())
    assert vae.use_gaussian_kl
    gauss = WaveletVAE3D(levels=2, latent_channels=5, prior="gaussian", **TINY)
    assert "sparsity" not in gauss(x).extra_losses and gauss.use_gaussian_kl
    assert not WaveletVAE3D(levels=2, latent_channels=5, prior="laplace", **TINY).use_gaussian_kl


def test_laplace_prior_leaves_the_gaussian_kl_out_of_the_loss():
    x = _volume()
    vae = WaveletVAE3D(levels=2, latent_channels=5, prior="laplace", **TINY)
    out = vae(x)
    on = VAELoss(kl_weight=1.0)
    total, logs = on(out, x, model=vae)
    without = VAELoss(kl_weight=0.0)(out, x, model=vae)[0]
    assert logs["kl"] == 0 and torch.allclose(total, without)
    vae.use_gaussian_kl = True  # same output, KL switched back on: the term appears
    total_kl, logs_kl = on(out, x, model=vae)
    assert logs_kl["kl"] > 0 and torch.allclose(total_kl, total + logs_kl["kl"])


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_lossless_latent_reconstructs_exactly_at_init(levels):
    # latent_channels = C * 8**L: the pure-Haar code (residual heads and refinement start at zero) is invertible,
    # up to float32 rounding (P is orthogonal to float32 precision)
    x = _volume(n=16)
    vae = WaveletVAE3D(levels=levels, latent_channels=8**levels, **TINY)
    post = vae.encode(x)
    f = 2**levels
    assert torch.allclose(post.mean[:, :1], F.avg_pool3d(x, f), atol=1e-6)  # approximation = local mean
    out = vae(x, sample=False)
    assert (out.reconstruction - x).abs().max() < 1e-5
    assert (vae.decode(post.mean) - x).abs().max() < 1e-5
    assert wavelet_pyramid_loss(out.enc_coeffs, out.dec_coeffs) < 1e-5
    # a compressive latent is not exact at init: the check above is a property, not a tautology
    small = WaveletVAE3D(levels=levels, latent_channels=4, **TINY)
    assert (small(x, sample=False).reconstruction - x).abs().max() > 1e-2


def test_synthesize_exact_coefficients_with_zero_refinement():
    x = _volume(n=16).double()
    vae = WaveletVAE3D(levels=3, latent_channels=8, zero_init_residual=False, **TINY).double()
    coeffs = vae.wavelet_coefficients(x)
    low, details = coeffs[-1][:, :1], [c[:, 1:] for c in coeffs]
    assert not torch.allclose(vae.synthesize(low, details), x)  # random refinement changes the image
    torch.nn.init.zeros_(vae.refine[-1].weight)
    torch.nn.init.zeros_(vae.refine[-1].bias)
    assert torch.allclose(vae.synthesize(low, details), x, atol=1e-10)
    assert torch.allclose(coeffs[-1][:, :1], F.avg_pool3d(x, 8) * haar_gain(3))


def test_losses_finite_and_decreasing_under_adam():
    # trained with sampled latents (the real use); judged on the deterministic loss (the mean decoded), which the
    # sampling noise does not blur
    x = _volume(b=1, n=16)
    vae = WaveletVAE3D(levels=2, latent_channels=8, **TINY)
    loss_fn = VAELoss()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-4)

    def deterministic():
        with torch.no_grad():
            total, logs = loss_fn(vae(x, sample=False), x, model=vae)
        return total.item(), logs["recon"].item()

    total0, rec0 = deterministic()
    for _ in range(10):
        opt.zero_grad()
        total, logs = loss_fn(vae(x), x, model=vae)
        assert all(torch.isfinite(v) for v in logs.values())
        total.backward()
        opt.step()
    total1, rec1 = deterministic()
    assert total1 < 0.97 * total0
    assert rec1 < rec0


def test_last_layer_weight_is_the_output_layer():
    vae = WaveletVAE3D(levels=1, latent_channels=4, **TINY)
    assert vae.last_layer_weight() is vae.refine[-1].weight
    bare = WaveletVAE3D(levels=1, latent_channels=4, **{**TINY, "refine_channels": 0})
    assert bare.refine is None and bare.last_layer_weight() is bare.dec_detail[0][-1].weight


def test_interface_types():
    vae = WaveletVAE3D(levels=1, latent_channels=4, **TINY)
    out = vae(_volume(n=8))
    assert isinstance(out, VAEOutput) and isinstance(out.posterior, LatentDistribution)
    assert out.posterior.kl().shape == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(levels=4), "levels must be 1, 2 or 3"),
        (dict(levels=1, latent_channels=9), "latent_channels"),
        (dict(levels=1, latent_channels=1), "latent_channels"),
        (dict(prior="l1"), "prior must be one of"),
        (dict(base_channels=6, norm_num_groups=4), "must divide base_channels"),
        (dict(noise_init=0.0), "noise_init"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WaveletVAE3D(**{**TINY, **kwargs})


def test_input_validation():
    vae = WaveletVAE3D(levels=2, latent_channels=8, **TINY)
    with pytest.raises(ValueError, match="multiples of the downsample factor 4"):
        vae.encode(torch.zeros(1, 1, 16, 16, 10))
    with pytest.raises(ValueError, match="channels"):
        vae.encode(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 8"):
        vae.decode(torch.zeros(1, 4, 4, 4, 4))
