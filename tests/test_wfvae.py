"""WFVAE3D and its depth-causal blocks: chunked == whole, causality, gradients, energy flow, shapes, errors."""

from __future__ import annotations

import math

import pytest
import torch

from wdm3d.networks.causal import CausalConv3d, ChannelRMSNorm, causal_cache
from wdm3d.networks.vae_base import LatentDistribution, VAEOutput
from wdm3d.networks.wfvae import WFVAE3D
from wdm3d.wavelets import idwt3d, wavedec3d

TOL = 1e-5


def tiny(levels: int = 2, **kwargs) -> WFVAE3D:
    """A narrow model with random weights everywhere (norm gains and biases too), so no check passes trivially."""
    cfg = dict(latent_channels=4, levels=levels, base_channels=8, num_res_blocks=1, num_mid_blocks=1)
    cfg.update(kwargs)
    model = WFVAE3D(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains around 1, biases around 0
                p.copy_((1.0 if torch.all(p == 1) else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# chunked == whole
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels, depth, chunks",
    [
        (2, 20, (4, 8, 12, 32)),  # 20 is not a multiple of 8 or 12; 32 > depth is one slab
        (3, 40, (8, 16, 24)),  # 40 is not a multiple of 16 or 24
    ],
)
def test_encode_chunked_equals_encode(levels: int, depth: int, chunks: tuple[int, ...]) -> None:
    model = tiny(levels, in_channels=2)
    x = torch.randn(2, 2, depth, 8, 8)
    with torch.no_grad():
        whole = model.encode(x)
    assert whole.mean.std() > 0.05 and whole.logvar.std() > 0.05  # non-degenerate latents
    for chunk in chunks:
        got = model.encode_chunked(x, chunk)
        assert isinstance(got, LatentDistribution)
        assert got.mean.shape == whole.mean.shape
        assert max_diff(got.mean, whole.mean) <= TOL, chunk
        assert max_diff(got.logvar, whole.logvar) <= TOL, chunk


@pytest.mark.parametrize("levels", [2, 3])
def test_decode_chunked_equals_decode(levels: int) -> None:
    model = tiny(levels)
    z = torch.randn(1, 4, 7, 2, 2)  # 7 latent slices: no chunk below divides it except 1 and 7
    with torch.no_grad():
        whole = model.decode(z)
    assert whole.shape == (1, 1, 7 * 2**levels, 2 * 2**levels, 2 * 2**levels)
    assert whole.std() > 0.05
    for chunk in (1, 2, 3, 5, 7, 10):
        assert max_diff(model.decode_chunked(z, chunk), whole) <= TOL, chunk


def test_cache_does_not_leak_between_calls() -> None:
    model = tiny(2)
    x1, x2 = torch.randn(1, 1, 16, 8, 8), torch.randn(1, 1, 16, 8, 8)
    with torch.no_grad():
        before = model.encode(x2).mean
        model.encode_chunked(x1, 4)  # leaves nothing behind ...
        assert torch.equal(model.encode(x2).mean, before)  # ... for whole-volume calls
        assert max_diff(model.encode_chunked(x2, 4).mean, before) <= TOL  # ... nor for the next chunked call
        z1, z2 = torch.randn(1, 4, 4, 2, 2), torch.randn(1, 4, 4, 2, 2)
        dec_before = model.decode(z2)
        model.decode_chunked(z1, 1)
        assert torch.equal(model.decode(z2), dec_before)
        assert max_diff(model.decode_chunked(z2, 3), dec_before) <= TOL
    assert all(not m._streaming and m._cache is None for m in model.modules() if isinstance(m, CausalConv3d))


def test_causal_cache_is_cleared_after_an_error_and_not_nested() -> None:
    conv = CausalConv3d(1, 1, 3)
    with pytest.raises(RuntimeError, match="boom"):
        with causal_cache(conv):
            conv(torch.randn(1, 1, 4, 4, 4))
            raise RuntimeError("boom")
    assert conv._cache is None and not conv._streaming
    with causal_cache(conv):
        with pytest.raises(RuntimeError, match="already active"):
            with causal_cache(conv):
                pass


# ----------------------------------------------------------------------------------------------------------------------
# causality: what makes the cache possible
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels, k", [(2, 8), (3, 16)])
def test_encoder_is_causal_along_depth(levels: int, k: int) -> None:
    model = tiny(levels)
    f = model.downsample_factor
    x = torch.randn(1, 1, 32, 8, 8)
    x2 = x.clone()
    x2[:, :, k:] = torch.randn_like(x2[:, :, k:])
    with torch.no_grad():
        a, b = model.encode(x).mean, model.encode(x2).mean
    assert max_diff(a[:, :, : k // f], b[:, :, : k // f]) <= 1e-6  # latent slices before k/f: untouched
    assert max_diff(a[:, :, k // f], b[:, :, k // f]) > 1e-3  # the slice that sees the change does change


@pytest.mark.parametrize("levels", [2, 3])
def test_decoder_is_causal_along_depth(levels: int) -> None:
    model = tiny(levels)
    f, j = model.downsample_factor, 3
    z = torch.randn(1, 4, 6, 2, 2)
    z2 = z.clone()
    z2[:, :, j:] += 1.0
    with torch.no_grad():
        a, b = model.decode(z), model.decode(z2)
    assert max_diff(a[:, :, : j * f], b[:, :, : j * f]) <= 1e-6
    assert max_diff(a[:, :, j * f :], b[:, :, j * f :]) > 1e-3


def test_channel_norm_is_per_voxel() -> None:
    norm = ChannelRMSNorm(4)
    x = torch.randn(2, 4, 6, 3, 3)
    y = norm(x)
    x[:, :, 3:] *= 100.0  # later slices rescaled: earlier slices unaffected (GroupNorm would change them)
    assert torch.equal(norm(x)[:, :, :3], y[:, :, :3])
    assert torch.allclose(y.square().mean(1), torch.ones(2, 6, 3, 3), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# training forward
# ----------------------------------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter() -> None:
    model = tiny(2).train()
    x = torch.randn(2, 1, 16, 8, 8)
    out = model(x)
    assert isinstance(out, VAEOutput)
    loss = (out.reconstruction - x).abs().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"
    assert model.last_layer_weight() is model.decoder.heads[0][-1].weight
    assert model.last_layer_weight().grad is not None


def test_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(1, 1, 16, 8, 8)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)
        model = tiny(2, use_checkpoint=use_checkpoint).train()
        out = model(x, sample=False)
        ((out.reconstruction - x).abs().mean() + out.posterior.kl().mean() * 1e-6).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_slab_by_slab_gradients_equal_whole_volume_ones_with_checkpointing() -> None:
    # training slab by slab under the causal cache: checkpointing must not recompute a block with a later slab's cache
    torch.manual_seed(0)
    vae = WFVAE3D(latent_channels=4, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1).double()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 1, 16, 8, 8, dtype=torch.float64)

    def grads(checkpointing: bool, slabs: bool) -> list[torch.Tensor]:
        vae.encoder.use_checkpoint = checkpointing
        vae.zero_grad()
        if slabs:
            with causal_cache(vae.encoder):
                sum(vae.encoder(x[:, :, s : s + 8])[0].square().sum() for s in (0, 8)).backward()
        else:
            vae.encoder(x)[0].square().sum().backward()
        return [p.grad.clone() for p in vae.encoder.parameters() if p.grad is not None]

    whole = grads(False, slabs=False)
    for checkpointing in (False, True):
        for a, b in zip(grads(checkpointing, slabs=True), whole):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_channel_norm_keeps_float64() -> None:
    norm = ChannelRMSNorm(3).double()
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    expected = x / torch.sqrt(x.square().mean(dim=1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), expected, rtol=1e-14, atol=1e-14)


def test_energy_flow_path_matters() -> None:
    model = tiny(2)
    x = torch.randn(1, 1, 16, 8, 8)
    z = torch.randn(1, 4, 4, 2, 2)
    with torch.no_grad():
        lat_on, rec_on = model.encode(x).mean, model.decode(z)
        model.energy_flow = False  # switch the path off: zeros injected, no low band added upward
        lat_off, rec_off = model.encode(x).mean, model.decode(z)
        model.energy_flow = True
        assert max_diff(lat_on, lat_off) > 1e-3
        assert max_diff(rec_on, rec_off) > 1e-3
        for conv in model.encoder.inject:  # zeroing the injection weights has the same effect on the encoder
            conv.weight.zero_()
            conv.bias.zero_()
        assert max_diff(model.encode(x).mean, lat_off) <= 1e-6
        # chunked stays exact with the path off
        model.energy_flow = False
        assert max_diff(model.encode_chunked(x, 4).mean, lat_off) <= TOL
        assert max_diff(model.decode_chunked(z, 1), rec_off) <= TOL


def test_model_built_without_energy_flow() -> None:
    full, ablated = tiny(3), tiny(3, energy_flow=False)
    assert sum(p.numel() for p in ablated.parameters()) < sum(p.numel() for p in full.parameters())
    out = ablated(torch.randn(1, 1, 16, 16, 16))
    assert len(out.enc_coeffs) == len(out.dec_coeffs) == 1
    assert out.reconstruction.shape == (1, 1, 16, 16, 16)
    ablated.energy_flow = True
    with pytest.raises(RuntimeError, match="built with energy_flow=False"):
        ablated.encode(torch.randn(1, 1, 16, 16, 16))


# ----------------------------------------------------------------------------------------------------------------------
# shapes and the pyramid
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shapes_and_downsample_factor(levels: int) -> None:
    model = tiny(levels, in_channels=2, out_channels=2)
    f = 2**levels
    assert model.downsample_factor == f and model.latent_channels == 4
    x = torch.randn(2, 2, 16, 8, 24)
    with torch.no_grad():
        post = model.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 16 // f, 8 // f, 24 // f)
        assert model.decode(post.mean).shape == x.shape


@pytest.mark.parametrize("levels", [2, 3])
def test_pyramids_line_up(levels: int) -> None:
    model = tiny(levels, in_channels=2)
    x = torch.randn(1, 2, 16, 16, 8)
    out = model(x, sample=False)
    assert len(out.enc_coeffs) == len(out.dec_coeffs) == levels
    ref = wavedec3d(x, levels)
    for i, (enc, dec) in enumerate(zip(out.enc_coeffs, out.dec_coeffs)):
        assert enc.shape == dec.shape == (1, 16, 16 >> (i + 1), 16 >> (i + 1), 8 >> (i + 1))
        assert torch.allclose(enc[:, 2:], ref.details[i], atol=1e-6)  # the input's wavelet pyramid, finest first
    assert torch.allclose(out.enc_coeffs[-1][:, :2], ref.low, atol=1e-6)
    assert torch.equal(out.latent, out.posterior.mean)
    assert out.reconstruction.shape == x.shape
    assert torch.allclose(out.reconstruction, idwt3d(out.dec_coeffs[0]), atol=1e-6)  # output = IDWT(finest)


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny(2)
    with pytest.raises(ValueError, match=r"multiples of the downsample factor 4.*D=10"):
        model.encode(torch.randn(1, 1, 10, 8, 8))
    with pytest.raises(ValueError, match=r"D=9"):
        model.encode_chunked(torch.randn(1, 1, 9, 8, 8), 4)
    with pytest.raises(ValueError, match=r"W=6"):
        model(torch.randn(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match=r"chunk must be a multiple of the downsample factor 2\*\*levels = 4.*chunk=6"):
        model.encode_chunked(torch.randn(1, 1, 16, 8, 8), 6)
    with pytest.raises(ValueError, match="positive integer"):
        model.encode_chunked(torch.randn(1, 1, 16, 8, 8), 0)
    with pytest.raises(ValueError, match="positive integer"):
        model.decode_chunked(torch.randn(1, 4, 4, 2, 2), 0)
    with pytest.raises(ValueError, match=r"3 channels but the model was built with in_channels=1"):
        model.encode(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"2 channels but the model has latent_channels=4"):
        model.decode_chunked(torch.randn(1, 2, 4, 2, 2), 2)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        model.encode(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="levels must be one of"):
        WFVAE3D(levels=4)
    with pytest.raises(ValueError, match="one positive integer per level"):
        WFVAE3D(levels=3, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="depth stride must be 1"):
        CausalConv3d(1, 1, 3, stride=2)


def test_losses_finite_and_decreasing_under_adam() -> None:
    from wdm3d.demo import phantom_volumes
    from wdm3d.losses import VAELoss

    torch.manual_seed(0)
    model = WFVAE3D(latent_channels=4, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1).train()
    x = phantom_volumes(2, 16, seed=1)
    loss_fn = VAELoss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        total, terms = loss_fn(model(x, sample=False), x, model=model)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: float(v) for k, v in terms.items()})
    assert all(all(torch.isfinite(torch.tensor(list(h.values())))) for h in history)
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"]
    assert last["recon"] < first["recon"] and last["wavelet"] < first["wavelet"]
    assert first["kl"] > 0  # the KL term is live


def test_kl_of_a_tiny_std_keeps_growing_and_pulls_the_std_up():
    # a floor on var (1e-12) froze the KL below std 1e-6 and turned its gradient positive
    for value in (2e-6, 5e-7, 1e-9):
        std = torch.full((1, 1, 1, 1, 1), value, dtype=torch.float64, requires_grad=True)
        kl = LatentDistribution(mean=torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64), std=std).kl().sum()
        exact = 0.5 * (value**2 - 1 - 2 * math.log(value))
        assert kl.item() == pytest.approx(exact, rel=1e-9)
        kl.backward()
        assert std.grad.item() == pytest.approx(value - 1 / value, rel=1e-9) and std.grad.item() < 0


def test_use_checkpoint_set_at_run_time_reaches_the_encoder_and_decoder():
    model = WFVAE3D(base_channels=8, latent_channels=4, num_res_blocks=1, num_mid_blocks=1)
    assert not model.encoder.use_checkpoint and not model.decoder.use_checkpoint
    model.use_checkpoint = True
    assert model.use_checkpoint and model.encoder.use_checkpoint and model.decoder.use_checkpoint


def test_channel_rms_norm_rounds_a_bf16_result_once():
    norm = ChannelRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.3, 3.0, 16))
    x = torch.randn(2, 16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = norm(x.double())
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16
    # the normalised value times the weight, rounded once to bf16 (not rounded, then multiplied in bf16)
    rel = ((half.double() - exact).abs() / exact.abs().clamp_min(1e-6)).mean().item()
    assert rel < 2.2e-3  # one rounding: ~1.7e-3 (two: ~2.8e-3)
