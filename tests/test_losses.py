import math

import pytest
import torch
from torch import nn

from wdm3d.losses import (
    LOSS_NAMES,
    Perceptual25DLoss,
    SliceFeatureNet2D,
    VAELoss,
    adaptive_gan_weight,
    discriminator_adversarial_loss,
    gaussian_kl,
    generator_adversarial_loss,
    load_slice_feature_weights,
    patch_discriminator,
    perceptual_loss,
    wavelet_pyramid_loss,
)
from wdm3d.networks.vae_base import LatentDistribution, VAEOutput

TINY_LAYOUT = (4, "M", 8)


# --------------------------------------------------------------------------------------------------------------------
# wavelet pyramid loss
# --------------------------------------------------------------------------------------------------------------------


def test_wavelet_loss_hand_computed():
    e0 = torch.arange(16, dtype=torch.float32).reshape(1, 8, 1, 1, 2)  # |e0 - 0| = 0..15, mean 7.5
    e1 = torch.full((1, 8, 1, 1, 1), 2.0)  # |2 - (-1)| = 3 everywhere
    loss = wavelet_pyramid_loss([e0, e1], [torch.zeros_like(e0), -torch.ones_like(e1)])
    assert loss.item() == pytest.approx(7.5 + 3.0)


def test_wavelet_loss_zero_for_equal_pyramids_and_empty():
    pyr = [torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 2, 2, 2)]
    assert wavelet_pyramid_loss(pyr, [p.clone() for p in pyr]).item() == 0.0
    assert wavelet_pyramid_loss([], []).item() == 0.0


def test_wavelet_loss_mismatch_errors():
    a = [torch.zeros(1, 8, 4, 4, 4), torch.zeros(1, 8, 2, 2, 2)]
    with pytest.raises(ValueError, match="differ in length: 2 encoder level"):
        wavelet_pyramid_loss(a, a[:1])
    with pytest.raises(ValueError, match=r"level 1 .*\(1, 8, 2, 2, 2\).*\(1, 8, 2, 2, 4\)"):
        wavelet_pyramid_loss(a, [a[0], torch.zeros(1, 8, 2, 2, 4)])
    with pytest.raises(TypeError, match="lists of per-level tensors"):
        wavelet_pyramid_loss(a[0], a[0])


# --------------------------------------------------------------------------------------------------------------------
# VAELoss: recon, wavelet, KL, extras
# --------------------------------------------------------------------------------------------------------------------


def _output(x: torch.Tensor, extra: dict | None = None) -> VAEOutput:
    mean = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1, 1).expand(x.shape[0], 2, 2, 2, 2).clone()
    post = LatentDistribution(mean=mean, std=torch.full_like(mean, 0.5))
    rec = x + 0.25
    enc = [torch.ones(x.shape[0], 8, 2, 2, 2)]
    dec = [torch.ones(x.shape[0], 8, 2, 2, 2) * 1.5]
    return VAEOutput(
        reconstruction=rec, posterior=post, latent=mean, enc_coeffs=enc, dec_coeffs=dec, extra_losses=extra or {}
    )


def test_vae_loss_terms_and_weights_by_hand():
    x = torch.zeros(2, 1, 4, 4, 4)
    out = _output(x, {"sparsity": torch.tensor(3.0)})
    total, logs = VAELoss(kl_weight=0.0)(out, x)
    assert set(LOSS_NAMES) - {"adv_g", "adv_d", "adaptive_weight"} <= set(logs)  # the GAN terms are the engine's
    assert logs["recon"].item() == pytest.approx(0.25)
    assert logs["wavelet"].item() == pytest.approx(0.5)
    # per-element mean KL of N(m, 0.5^2): 0.5 (m^2 + 0.25 - 1 - log 0.25), m = 0.5 and -1 in equal numbers
    kl = [0.5 * (m * m + 0.25 - 1 - math.log(0.25)) for m in (0.5, -1.0)]
    assert logs["kl"].item() == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert total.item() == pytest.approx(0.25 + 0.1 * 0.5 + 1e-4 * 3.0, rel=1e-6)
    for w in (1e-6, 0.5, 2.0):
        total_w, _ = VAELoss(kl_weight=w)(out, x)
        assert (total_w - total).item() == pytest.approx(w * logs["kl"].item(), rel=1e-4, abs=1e-8)  # float32 sums
    assert logs["kl"].item() == pytest.approx(gaussian_kl(out.posterior).item())


def test_vae_loss_extra_weights_and_stable_names():
    x = torch.zeros(1, 1, 4, 4, 4)
    out = _output(x, {"sparsity": torch.tensor(2.0), "other": torch.tensor(5.0)})
    base = VAELoss(kl_weight=0.0, extra_weights={})(_output(x), x)[0]
    total, logs = VAELoss(kl_weight=0.0, extra_weights={"sparsity": 0.5})(out, x)
    assert total.item() == pytest.approx(base.item() + 0.5 * 2.0 + 1.0 * 5.0)  # unlisted names weigh 1
    assert logs["other"].item() == 5.0
    # a configured name the model does not return is still logged (0), and nothing is added
    total_g, logs_g = VAELoss(kl_weight=0.0)(_output(x), x)
    assert logs_g["sparsity"].item() == 0.0 and total_g.item() == pytest.approx(base.item())
    with pytest.raises(ValueError, match="clashes"):
        VAELoss()(_output(x, {"kl": torch.tensor(1.0)}), x)


def test_vae_loss_validation():
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        VAELoss(kl_weight=-1.0)
    x = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        VAELoss()(_output(x), torch.zeros(1, 1, 4, 4, 8))
    with pytest.raises(TypeError, match="must be a VAEOutput"):
        VAELoss()(x, _output(x))  # MONAI order: (output, target)
    with pytest.raises(TypeError, match="use_gaussian_kl"):
        VAELoss(use_gaussian_kl="no")


# --------------------------------------------------------------------------------------------------------------------
# adaptive weight
# --------------------------------------------------------------------------------------------------------------------


def test_adaptive_weight_equals_hand_gradient_ratio_on_linear_decoder():
    # decoder y = W z (no bias); rec = mean((y - t)^2), g = -mean(y)
    # d rec / dW = 2/n (y - t) z^T, d g / dW = -1/n 1 z^T; Frobenius norms of outer products: |a| |b|
    dec = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        dec.weight.copy_(torch.tensor([[1.0, 0, 2], [0, 1, 0], [-1, 1, 1], [0.5, 0, -2]]))
    z = torch.tensor([1.0, -2.0, 0.5])
    t = torch.tensor([0.0, 1.0, 2.0, -1.0])
    y = dec(z)
    rec, g = (y - t).square().mean(), -y.mean()
    n = 4
    with torch.no_grad():
        y_ = dec.weight @ z
        rec_norm = 2 / n * (y_ - t).norm() * z.norm()
        g_norm = 1 / n * math.sqrt(n) * z.norm()
    w = adaptive_gan_weight(rec, g, dec.weight)
    assert not w.requires_grad
    assert w.item() == pytest.approx((rec_norm / (g_norm + 1e-4)).item(), rel=1e-5)
    assert adaptive_gan_weight(rec, g, dec.weight, max_weight=0.1).item() == pytest.approx(0.1)
    (rec + g).backward()  # the graph survives for the caller's backward
    with torch.no_grad():
        assert adaptive_gan_weight((dec(z) - t).square().mean(), -dec(z).mean(), dec.weight).item() == 0.0


def test_adaptive_weight_needs_the_right_layer():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    y = a(torch.ones(2))
    with pytest.raises(ValueError, match="does not depend on last_layer_weight"):
        adaptive_gan_weight(y.sum(), y.mean(), b.weight)


# --------------------------------------------------------------------------------------------------------------------
# discriminator and GAN schedule
# --------------------------------------------------------------------------------------------------------------------


class _SignDisc(nn.Module):
    """Logit = 100 * mean intensity per voxel: positive volumes look real, negative ones fake. Counts its calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return [x.mean(1, keepdim=True) * self.scale]


def test_hinge_losses_have_the_right_sign():
    disc = _SignDisc()
    real, fake = torch.ones(2, 1, 4, 4, 4), -torch.ones(2, 1, 4, 4, 4)
    assert discriminator_adversarial_loss(disc(real), disc(fake)).item() == pytest.approx(0.0, abs=1e-6)  # told apart
    assert discriminator_adversarial_loss(disc(fake), disc(real)).item() == pytest.approx(2.0, abs=1e-6)  # fooled
    assert generator_adversarial_loss(disc(fake)).item() == pytest.approx(2.0, abs=1e-6)  # caught
    assert generator_adversarial_loss(disc(real)).item() == pytest.approx(0.0, abs=1e-6)  # passes as real
    # plain logit tensors work as well as PatchDiscriminator's lists; a module instead of its output is an error
    assert generator_adversarial_loss(torch.full((1, 1, 2, 2, 2), -50.0)).item() == pytest.approx(2.0)
    with pytest.raises(TypeError, match="call the discriminator first"):
        generator_adversarial_loss(disc)


def test_patch_discriminator_factory():
    disc = patch_discriminator(in_channels=1, channels=4, num_layers_d=2)
    x = torch.randn(2, 1, 16, 16, 16)
    logits = disc(x)[-1]
    assert logits.shape == (2, 1, 2, 2, 2)
    loss = discriminator_adversarial_loss(disc(x), disc(x + 1))
    assert 0 <= loss.item() <= 2
    loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="channels must be an integer"):
        patch_discriminator(channels=0)


class _ToyVAE(nn.Module):
    """x -> conv (the 'last layer') -> reconstruction; enough for the adaptive weight."""

    use_gaussian_kl = True

    def __init__(self):
        super().__init__()
        self.out = nn.Conv3d(1, 1, 3, padding=1)

    def last_layer_weight(self):
        return self.out.weight

    def forward(self, x):
        rec = self.out(x)
        mean = torch.zeros(x.shape[0], 2, 1, 1, 1)
        return VAEOutput(
            reconstruction=rec, posterior=LatentDistribution(mean=mean, logvar=torch.zeros_like(mean)), latent=mean
        )


def test_terms_stay_on_the_graph_for_an_engine_side_adaptive_weight():
    # what wdm3d.engine.vae_training does: loss(output, target), then the adaptive weight from terms["nll"]
    model, disc = _ToyVAE(), patch_discriminator(channels=4, num_layers_d=2)
    x = torch.randn(1, 1, 16, 16, 16)
    out = model(x)
    total, terms = VAELoss()(out, x)
    assert terms["recon"].requires_grad
    g_loss = generator_adversarial_loss(disc(out.reconstruction))
    w = adaptive_gan_weight(terms["nll"], g_loss, model.last_layer_weight())
    assert torch.isfinite(w) and w > 0
    (total + w * g_loss).backward()


def test_kl_left_out_when_the_model_says_so():
    model = _ToyVAE()
    x = torch.randn(1, 1, 4, 4, 4)
    mean = torch.ones(1, 2, 1, 1, 1)
    out = VAEOutput(
        reconstruction=x, posterior=LatentDistribution(mean=mean, logvar=torch.zeros_like(mean)), latent=mean
    )
    _, logs = VAELoss(kl_weight=1.0)(out, x, model=model)
    assert logs["kl"].item() == pytest.approx(0.5)
    model.use_gaussian_kl = False
    total, logs = VAELoss(kl_weight=1.0)(out, x, model=model)
    assert logs["kl"] == 0 and total.item() == 0.0
    # the constructor setting wins over the model (for engines that call loss(output, target) only)
    assert VAELoss(kl_weight=1.0, use_gaussian_kl=False)(out, x)[0].item() == 0.0
    assert VAELoss(kl_weight=1.0, use_gaussian_kl=True)(out, x, model=model)[0].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------------------------
# 2.5D perceptual loss
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny_features.pt"
    torch.save(SliceFeatureNet2D(TINY_LAYOUT).state_dict(), path)
    return path


def test_perceptual_zero_for_identical_positive_otherwise(tiny_weights):
    loss = Perceptual25DLoss(tiny_weights, layout=TINY_LAYOUT, slice_fraction=0.5)
    x = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    assert loss(x, x.clone()).item() == 0.0
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    value = loss(y, x)
    assert value.item() > 0
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


def test_perceptual_loads_the_file_weights(tiny_weights):
    loss = Perceptual25DLoss(tiny_weights, layout=TINY_LAYOUT)
    saved = torch.load(tiny_weights, weights_only=True)
    assert torch.equal(loss.net.features[0].weight, saved["features.0.weight"])
    loss.train()
    assert not loss.net.training


def test_perceptual_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.*vgg16.pth.*never downloads"):
        Perceptual25DLoss(missing, layout=TINY_LAYOUT)


def test_perceptual_key_mismatch_is_a_clear_error(tmp_path, tiny_weights):
    with pytest.raises(ValueError, match="does not fit the 2D feature network.*wrong shapes"):
        Perceptual25DLoss(tiny_weights, layout=(4, "M", 16))
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="missing .*unexpected"):
        Perceptual25DLoss(other, layout=TINY_LAYOUT)
    pickled = tmp_path / "pickled.pt"
    torch.save({"a": object()}, pickled)
    with pytest.raises(ValueError, match="Refusing to load"):
        Perceptual25DLoss(pickled, layout=TINY_LAYOUT)


def test_perceptual_accepts_torchvision_style_and_bare_keys(tmp_path):
    net = SliceFeatureNet2D(TINY_LAYOUT)
    full = tmp_path / "full.pt"  # a whole-model state dict: features.* plus a classifier that is ignored
    torch.save({**net.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}, full)
    bare = tmp_path / "bare.pt"  # a saved `features` Sequential
    torch.save(net.features.state_dict(), bare)
    for path in (full, bare):
        loaded = load_slice_feature_weights(SliceFeatureNet2D(TINY_LAYOUT), path)
        assert torch.equal(loaded.features[3].weight, net.features[3].weight)


def test_vgg16_layout_taps_are_lpips_layers():
    net = SliceFeatureNet2D()  # VGG16 trunk: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    assert net.taps == (3, 8, 15, 22, 29)
    assert sorted({k.split(".")[1] for k in net.state_dict()}, key=int) == [
        "0",
        "2",
        "5",
        "7",
        "10",
        "12",
        "14",
        "17",
        "19",
        "21",
        "24",
        "26",
        "28",
    ]


def test_perceptual_input_checks(tiny_weights):
    loss = Perceptual25DLoss(tiny_weights, layout=TINY_LAYOUT)
    with pytest.raises(ValueError, match="at least 2x2"):
        loss(torch.zeros(1, 1, 8, 8, 1), torch.zeros(1, 1, 8, 8, 1))
    with pytest.raises(ValueError, match="same shape"):
        loss(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="slice_fraction"):
        Perceptual25DLoss(tiny_weights, layout=TINY_LAYOUT, slice_fraction=0.0)


def test_vae_loss_with_perceptual_term(tiny_weights):
    perceptual = Perceptual25DLoss(tiny_weights, layout=TINY_LAYOUT, slice_fraction=1.0)
    x = torch.rand(1, 1, 8, 8, 8)
    out = _output(x)
    out = out._replace(reconstruction=x + 0.2 * torch.randn_like(x))
    base, _ = VAELoss()(out, x)
    total, logs = VAELoss(perceptual=perceptual, perceptual_weight=0.1)(out, x)
    assert logs["perceptual"] > 0
    assert total.item() == pytest.approx(base.item() + 0.1 * logs["perceptual"].item(), rel=1e-5)


def test_kl_of_a_bf16_posterior_is_computed_in_float32():
    # a posterior close to the prior: var - 1 - logvar ~ logvar^2 / 2 is far below bf16's resolution near 1
    g = torch.Generator().manual_seed(0)
    mean = (torch.randn(2, 4, 4, 4, 4, generator=g) * 1e-2).bfloat16()
    logvar = (torch.randn(2, 4, 4, 4, 4, generator=g) * 1e-2).bfloat16()
    m, lv = mean.double(), logvar.double()  # the exact KL of the posterior the bf16 values describe
    exact = (0.5 * (m.square() + lv.exp() - 1 - lv)).flatten(1).sum(1)
    kl = LatentDistribution(mean, logvar).kl()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), exact, rtol=1e-4, atol=1e-7)
    assert gaussian_kl(LatentDistribution(mean, logvar)).item() == pytest.approx(
        exact.sum().item() / mean.numel(), rel=1e-4
    )
    std = logvar.float().mul(0.5).exp().bfloat16()  # the explicit-std path too
    ref = 0.5 * (m.square() + std.double().square() - 1 - std.double().square().log())
    torch.testing.assert_close(
        LatentDistribution(mean, std=std).kl().double(), ref.flatten(1).sum(1), rtol=1e-4, atol=1e-7
    )


def test_perceptual_settings_that_would_silently_do_something_else_are_refused(tiny_weights):
    assert perceptual_loss(None, 0.0) is None
    with pytest.raises(ValueError, match=r"perceptual_weight=0.1 needs perceptual_weights"):
        perceptual_loss(None, 0.1)  # would train without the term while the run records 0.1
    with pytest.raises(ValueError, match=r"tiny_features.pt.*perceptual_weight=0.0.*not trained on"):
        perceptual_loss(tiny_weights, 0.0)  # would run VGG every step and multiply it by 0


@pytest.mark.parametrize("bundle", ["wfvae", "wavelet_vae"])
def test_vae_bundles_weigh_the_perceptual_term_when_a_weights_file_is_given(bundle):
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs" / "train.json"))
    assert parser.get_parsed_content("perceptual_weight") == 0.0
    parser["perceptual_weights"] = "/some/vgg16.pt"
    parser.parse()
    assert parser.get_parsed_content("perceptual_weight") == 0.1


def test_wavelet_term_of_a_bf16_pyramid_is_a_float32_scalar():
    g = torch.Generator().manual_seed(0)
    enc = [torch.randn(1, 8, 4, 4, 4, generator=g).bfloat16(), torch.randn(1, 8, 2, 2, 2, generator=g).bfloat16()]
    dec = [e + 0.01 * torch.randn(e.shape, generator=g).bfloat16() for e in enc]
    exact = sum((e.double() - d.double()).abs().mean() for e, d in zip(enc, dec))
    loss = wavelet_pyramid_loss(enc, dec)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exact.item(), rel=1e-3)  # (the bf16 differences themselves are rounded)


def test_a_non_scalar_extra_loss_is_refused_naming_it():
    x = torch.rand(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"extra loss 'sparsity' must be a scalar tensor.*\(2,\)"):
        VAELoss()(_output(x, {"sparsity": torch.ones(2)}), x)
