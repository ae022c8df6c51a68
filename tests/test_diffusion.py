import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from wdm3d.diffusion import (
    WaveletDiffusion,
    WaveletDiffusionInferer,
    WaveletDiffusionPrepareBatch,
    WaveletMSELoss,
    maths,
    subband_mse,
)
from wdm3d.wavelets import SUBBANDS


def wdm_alphas_cumprod(T=1000):
    # independent of the code under test: WDM's linear schedule written out
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class Oracle(torch.nn.Module):
    """A network that knows the clean coefficients y0 and answers in the diffusion's prediction type."""

    def __init__(self, diffusion, y0):
        super().__init__()
        self.d, self.y0 = diffusion, y0
        self.calls = []

    def forward(self, x, t, context=None):
        self.calls.append((tuple(x.shape), t.clone(), context))
        y0 = self.y0
        if self.d.process == "ddpm":
            ab = maths.expand_to(self.d.alphas_cumprod[t.long()], x)
            eps = maths.ddpm_eps_from_x0(y0, x, ab)
            return maths.ddpm_target(y0, eps, ab, self.d.prediction_type)
        s = maths.expand_to(t.double() / self.d.num_train_timesteps, x)
        eps = (x - (1 - s) * y0) / s
        return maths.rflow_target(y0, eps, self.d.prediction_type)


class GaussianDenoiser(torch.nn.Module):
    """The exact E[x0 | x_t] when every coefficient of x0 is N(mu, sigma^2), for either process."""

    def __init__(self, diffusion, mu, sigma):
        super().__init__()
        self.d, self.mu, self.var = diffusion, mu, sigma**2

    def forward(self, x, t, context=None):
        if self.d.process == "ddpm":
            ab = maths.expand_to(self.d.alphas_cumprod[t.long()], x)
            a, s2 = ab.sqrt(), 1 - ab
        else:
            s = maths.expand_to(t.double() / self.d.num_train_timesteps, x)
            a, s2 = 1 - s, s**2
        x0 = self.mu + a * self.var / (a**2 * self.var + s2) * (x - a * self.mu)
        if self.d.prediction_type == "sample":
            return x0
        if self.d.process == "ddpm":
            ab = a**2
            return maths.ddpm_target(x0, maths.ddpm_eps_from_x0(x0, x, ab), ab, self.d.prediction_type)
        return (x0 - x) / (t.double() / self.d.num_train_timesteps).reshape(-1, 1, 1, 1, 1)


def test_defaults_are_wdm():
    d = WaveletDiffusion()
    assert d.process == "ddpm" and d.num_train_timesteps == 1000 and d.prediction_type == "sample"
    assert d.lll_scale == 3.0 and d.ddpm_variance == "fixed_large" and d.clip_range == (-1.0, 1.0)
    assert torch.allclose(d.alphas_cumprod, wdm_alphas_cumprod(), rtol=1e-6)


def test_ddpm_noising_matches_closed_form_and_monai():
    d = WaveletDiffusion()
    x0, noise = torch.randn(4, 8, 4, 4, 4), torch.randn(4, 8, 4, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    ab = wdm_alphas_cumprod()[t].reshape(-1, 1, 1, 1, 1)
    # in float64: in float32, 1 - ab at small t keeps few digits (an error of ~2e-6 here)
    expected = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
    assert torch.allclose(d.add_noise(x0, noise, t), expected, atol=1e-6)
    assert torch.allclose(d.scheduler.add_noise(x0, noise, t), expected, atol=1e-5)  # MONAI's float32 cumprod


def test_rflow_noising_matches_closed_form_and_monai():
    d = WaveletDiffusion(process="rflow", prediction_type="v_prediction")
    x0, noise = torch.randn(3, 8, 2, 2, 2), torch.randn(3, 8, 2, 2, 2)
    t = torch.tensor([0.0, 250.0, 1000.0])
    s = (t / 1000).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(d.add_noise(x0, noise, t), (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(d.scheduler.add_noise(x0, noise, t), (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(d.target(x0, noise, t), x0 - noise)


@pytest.mark.parametrize(
    "process,prediction",
    [("ddpm", "sample"), ("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("rflow", "v_prediction"), ("rflow", "sample")],
)
def test_target_and_x0_recovery_are_inverse(process, prediction):
    d = WaveletDiffusion(process=process, prediction_type=prediction)
    x0, noise = torch.randn(3, 8, 2, 2, 2, dtype=torch.float64), torch.randn(3, 8, 2, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 400, 999]) if process == "ddpm" else torch.tensor([1.0, 400.0, 999.0])
    x_t = d.add_noise(x0, noise, t)
    assert torch.allclose(d.predict_x0(d.target(x0, noise, t), x_t, t), x0, atol=1e-8)


def test_v_target_matches_monai_velocity():
    d = WaveletDiffusion(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 8, 2, 2, 2), torch.randn(2, 8, 2, 2, 2), torch.tensor([3, 800])
    assert torch.allclose(d.target(x0, noise, t), d.scheduler.get_velocity(x0, noise, t), atol=1e-6)


def test_posterior_matches_ddpm_closed_form():
    ab = wdm_alphas_cumprod()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    x0, xt = torch.randn(2, 8, 2, 2, 2, dtype=torch.float64), torch.randn(2, 8, 2, 2, 2, dtype=torch.float64)
    for t in (1, 37, 999):
        mean, small, large = maths.ddpm_posterior(x0, xt, ab[t], ab[t - 1])
        # DDPM eq. 7 with the schedule's own beta_t
        mu = (
            math.sqrt(ab[t - 1]) * betas[t] / (1 - ab[t]) * x0
            + math.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t]) * xt
        )
        assert torch.allclose(mean, mu, atol=1e-10)
        assert torch.allclose(small, (1 - ab[t - 1]) / (1 - ab[t]) * betas[t], rtol=1e-8)
        assert torch.allclose(large, betas[t], rtol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_monai_scheduler(variance):
    d = WaveletDiffusion(ddpm_variance=variance)
    ref = DDPMScheduler(1000, variance_type=variance, clip_sample=False, prediction_type="sample")
    # run MONAI's step in float64 on the same float64 schedule, so that only the formulas are compared
    ref.betas, ref.alphas, ref.one = ref.betas.double(), 1 - ref.betas.double(), ref.one.double()
    ref.alphas_cumprod = d.alphas_cumprod
    x0, xt = torch.randn(2, 8, 2, 2, 2, dtype=torch.float64), torch.randn(2, 8, 2, 2, 2, dtype=torch.float64)
    ab = d.alphas_cumprod
    for t in (999, 500, 1):
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        expected, _ = ref.step(x0, t, xt, generator=torch.Generator().manual_seed(t))
        got = maths.ddpm_step(xt, x0, ab[t], ab[t - 1], noise, variance)
        assert torch.allclose(got, expected, atol=1e-12)


def test_sampling_keeps_the_data_dtype():
    d = WaveletDiffusion()
    model = lambda x, t, context=None: torch.zeros_like(x)  # noqa: E731
    out = d.sample(model, (1, 4, 4, 4), sampler="ddpm", num_steps=3, progress=False, return_coeffs=True)
    assert out.dtype == torch.float32


def test_ddim_with_eta_one_is_the_ancestral_step_with_posterior_variance():
    ab = wdm_alphas_cumprod()
    x0, xt, z = (torch.randn(1, 8, 2, 2, 2, dtype=torch.float64) for _ in range(3))
    for t, s in ((999, 979), (500, 499), (40, 0)):
        a = maths.ddim_step(xt, x0, ab[t], ab[s], eta=1.0, noise=z)
        b = maths.ddpm_step(xt, x0, ab[t], ab[s], z, "fixed_small")
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize(
    "process,prediction,sampler,steps",
    [
        ("ddpm", "sample", "ddpm", None),
        ("ddpm", "epsilon", "ddpm", 100),
        ("ddpm", "v_prediction", "ddim", 20),
        ("ddpm", "sample", "ddim", 7),
        ("rflow", "v_prediction", "rflow", 10),
        ("rflow", "sample", "rflow", 3),
    ],
)
@pytest.mark.parametrize("lll_scale", [3.0, 1.0])
def test_sampler_returns_the_x0_an_oracle_predicts(process, prediction, sampler, steps, lll_scale):
    d = WaveletDiffusion(process=process, prediction_type=prediction, lll_scale=lll_scale)
    image = torch.rand(2, 1, 8, 8, 8) * 1.6 - 0.8
    oracle = Oracle(d, d.encode(image))
    out = d.sample(oracle, (1, 8, 8, 8), num_samples=2, sampler=sampler, num_steps=steps, seed=1, progress=False)
    assert out.shape == image.shape
    assert (out - image).abs().max().item() <= 1e-4
    expected_calls = {"ddpm": steps or 1000, "ddim": steps, "rflow": steps}[sampler]
    assert len(oracle.calls) == expected_calls
    assert oracle.calls[0][0] == (2, 8, 4, 4, 4)


@pytest.mark.parametrize(
    "process,prediction,sampler,steps,tol",
    [
        ("ddpm", "sample", "ddpm", 1000, 0.03),
        ("ddpm", "epsilon", "ddpm", 1000, 0.03),
        ("ddpm", "epsilon", "ddim", 1000, 0.03),
        ("rflow", "v_prediction", "rflow", 200, 0.03),
    ],
)
def test_exact_denoiser_samples_the_data_distribution(process, prediction, sampler, steps, tol):
    # with the Bayes-optimal denoiser for Gaussian data, the sampler must reproduce mean and spread of the data:
    # wrong noise scales, wrong coefficients or a wrong step order all show up as a biased std
    mu, sigma = 0.3, 0.5
    d = WaveletDiffusion(process=process, prediction_type=prediction, ddpm_variance="fixed_small", clip_range=None)
    y = d.sample(
        GaussianDenoiser(d, mu, sigma),
        (1, 16, 16, 16),
        num_samples=8,
        sampler=sampler,
        num_steps=steps,
        clip_projection=False,
        seed=0,
        progress=False,
        return_coeffs=True,
    ).double()
    assert abs(y.mean().item() - mu) < tol
    assert abs(y.std().item() / sigma - 1) < tol


@pytest.mark.parametrize("process,sampler", [("ddpm", "ddim"), ("rflow", "rflow")])
def test_deterministic_samplers_converge_as_steps_grow(process, sampler):
    # Euler-type ODE steps are first order: the error in the spread shrinks steadily with the step count
    mu, sigma = 0.0, 0.5
    d = WaveletDiffusion(process=process, prediction_type="sample", clip_range=None)
    errors = []
    for steps in (10, 40, 160):
        y = d.sample(
            GaussianDenoiser(d, mu, sigma),
            (1, 8, 8, 8),
            num_samples=8,
            sampler=sampler,
            num_steps=steps,
            clip_projection=False,
            seed=0,
            progress=False,
            return_coeffs=True,
        )
        errors.append(abs(y.std().item() / sigma - 1))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.03


def test_clip_projection_keeps_samples_in_range():
    d = WaveletDiffusion()
    image = torch.rand(1, 1, 8, 8, 8) * 6 - 3  # far outside [-1, 1]
    oracle = Oracle(d, d.encode(image))
    kw = dict(num_samples=1, sampler="ddim", num_steps=5, seed=0, progress=False)
    clipped = d.sample(oracle, (1, 8, 8, 8), clip_projection=True, **kw)
    assert (clipped - image.clamp(-1, 1)).abs().max().item() <= 1e-5
    raw = d.sample(oracle, (1, 8, 8, 8), clip_projection=False, **kw)
    assert (raw - image).abs().max().item() <= 1e-4


def test_seed_makes_sampling_reproducible():
    d = WaveletDiffusion()
    net = torch.nn.Conv3d(8, 8, 1)
    model = lambda x, t, context=None: net(x)  # noqa: E731
    kw = dict(num_samples=1, sampler="ddpm", num_steps=20, progress=False, clip_projection=False)
    a = d.sample(model, (1, 4, 4, 4), seed=7, **kw)
    b = d.sample(model, (1, 4, 4, 4), seed=7, **kw)
    c = d.sample(model, (1, 4, 4, 4), seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_respaced_ddpm_visits_the_requested_timesteps():
    d = WaveletDiffusion()
    assert d.sampling_timesteps("ddpm")[:3] == [999, 998, 997] and d.sampling_timesteps("ddpm")[-2:] == [0, -1]
    ts = d.sampling_timesteps("ddim", 10)
    assert len(ts) == 11 and ts[0] == 999 and ts[-2:] == [0, -1] and ts == sorted(ts, reverse=True)
    rf = WaveletDiffusion(process="rflow", prediction_type="v_prediction").sampling_timesteps("rflow", 4)
    assert rf[0] == 1000 and rf[-1] == 0.0 and len(rf) == 5


def test_conditioning_reaches_the_model():
    d = WaveletDiffusion()
    cond_image = torch.rand(2, 3, 8, 8, 8)
    context = torch.randn(2, 4, 16)
    seen = {}

    def model(x, t, context=None):
        seen["shape"], seen["context"], seen["cond"] = x.shape, context, x[:, 8:].clone()
        return torch.zeros(x.shape[0], 8, *x.shape[2:])

    d.sample(
        model,
        (1, 8, 8, 8),
        num_samples=2,
        sampler="ddim",
        num_steps=2,
        concat=cond_image,
        context=context,
        progress=False,
    )
    assert seen["shape"] == (2, 32, 4, 4, 4)
    assert seen["context"] is context
    assert torch.allclose(seen["cond"], d.encode(cond_image))


def test_invalid_settings_are_rejected_with_reasons():
    with pytest.raises(ValueError, match="process"):
        WaveletDiffusion(process="score")
    with pytest.raises(ValueError, match="prediction_type"):
        WaveletDiffusion(prediction_type="noise")
    with pytest.raises(ValueError, match="prediction_type"):
        WaveletDiffusion(process="rflow", prediction_type="epsilon")
    d = WaveletDiffusion()
    model = lambda x, t, context=None: x  # noqa: E731
    with pytest.raises(ValueError, match="does not fit"):
        d.sample(model, (1, 4, 4, 4), sampler="rflow", progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        d.sample(model, (1, 4, 4, 4), sampler="ddim", num_steps=2000, progress=False)
    with pytest.raises(ValueError, match="even"):
        d.sample(model, (1, 5, 4, 4), sampler="ddim", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="clip_range"):
        WaveletDiffusion(clip_range=None).project(torch.zeros(1, 8, 2, 2, 2))


def test_prepare_batch_with_the_training_inferer():
    torch.manual_seed(0)
    d = WaveletDiffusion()
    images = torch.rand(3, 1, 8, 8, 8) * 2 - 1
    inputs, target, args, kwargs = WaveletDiffusionPrepareBatch(d)({"image": images}, device="cpu")
    assert torch.allclose(inputs, d.encode(images))
    assert torch.equal(target, inputs)  # x0 prediction: the target is the clean coefficients
    assert args == () and set(kwargs) == {"noise", "timesteps"}
    assert kwargs["timesteps"].dtype == torch.long and kwargs["timesteps"].shape == (3,)

    net = torch.nn.Conv3d(8, 8, 3, padding=1)
    seen = {}

    def model(x, timesteps, context=None):
        seen["x"], seen["t"] = x, timesteps
        return net(x)

    pred = WaveletDiffusionInferer(d)(inputs, model, *args, **kwargs)
    assert torch.allclose(seen["x"], d.add_noise(inputs, kwargs["noise"], kwargs["timesteps"]), atol=1e-6)
    assert pred.shape == inputs.shape


@pytest.mark.parametrize("process", ["ddpm", "rflow"])
def test_the_training_forward_noises_in_float64_and_casts_at_the_edge(process):
    # what a bundle's SupervisedTrainer runs: prepare_batch, then inferer(inputs, network, *args, **kwargs)
    torch.manual_seed(0)
    d = WaveletDiffusion(process=process)
    images = torch.rand(6, 1, 8, 8, 8) * 2 - 1
    inputs, _, args, kwargs = WaveletDiffusionPrepareBatch(d)({"image": images})
    seen = {}

    def model(x, timesteps, context=None):
        seen["x"], seen["context"] = x, context
        return x

    WaveletDiffusionInferer(d)(inputs, model, *args, **kwargs)
    t, x0, noise = kwargs["timesteps"], inputs.double(), kwargs["noise"].double()
    if process == "ddpm":  # by hand, in float64, from the process's alphas_cumprod
        ab = d.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1, 1)
        assert ab.dtype == torch.float64
        expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    else:  # s = t / T in float64
        s = (t.double() / d.num_train_timesteps).reshape(-1, 1, 1, 1, 1)
        expected = (1 - s) * x0 + s * noise
    assert seen["x"].dtype == inputs.dtype == torch.float32 and seen["context"] is None
    assert torch.equal(seen["x"], expected.to(torch.float32))  # float64 maths, one cast at the edge
    assert torch.equal(seen["x"], d.add_noise(inputs, kwargs["noise"], t))
    # in float64 the same path stays float64 (no float32 rounding on the way)
    assert torch.equal(d.add_noise(x0, noise, t), expected)


def test_prepare_batch_concat_condition_and_errors():
    d = WaveletDiffusion(prediction_type="epsilon")
    batch = {"image": torch.rand(2, 1, 8, 8, 8), "cond": torch.rand(2, 2, 8, 8, 8)}
    inputs, target, _, kwargs = WaveletDiffusionPrepareBatch(d, condition_key="cond")(batch)
    assert torch.equal(target, kwargs["noise"])
    assert set(kwargs) == {"noise", "timesteps", "concat"} and torch.allclose(kwargs["concat"], d.encode(batch["cond"]))
    seen = {}

    def model(x, timesteps, context=None):
        seen["x"], seen["context"] = x, context
        return x[:, :8]

    WaveletDiffusionInferer(d)(inputs, model, **kwargs)  # the coefficients go to the network input's channels
    assert seen["x"].shape == (2, 24, 4, 4, 4) and seen["context"] is None
    assert torch.equal(seen["x"][:, :8], d.add_noise(inputs, kwargs["noise"], kwargs["timesteps"]))
    assert torch.equal(seen["x"][:, 8:], kwargs["concat"])
    tokens = {"image": batch["image"], "cond": torch.randn(2, 3, 16)}
    _, _, _, kwargs = WaveletDiffusionPrepareBatch(d, condition_key="cond", condition_mode="crossattn")(tokens)
    assert set(kwargs) == {"noise", "timesteps", "context"} and torch.equal(kwargs["context"], tokens["cond"])
    WaveletDiffusionInferer(d)(inputs, model, **kwargs)
    assert seen["x"].shape == (2, 8, 4, 4, 4) and torch.equal(seen["context"], tokens["cond"])
    with pytest.raises(ValueError, match="concat .* must match the noisy input"):
        WaveletDiffusionInferer(d)(
            inputs, model, noise=kwargs["noise"], timesteps=kwargs["timesteps"], concat=torch.zeros(2, 16, 2, 2, 2)
        )
    with pytest.raises(TypeError, match="WaveletDiffusion"):
        WaveletDiffusionInferer(d.scheduler)
    with pytest.raises(KeyError, match="'img'"):
        WaveletDiffusionPrepareBatch(d, image_key="img")(batch)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        WaveletDiffusionPrepareBatch(d)({"image": torch.rand(2, 8, 8, 8)})


def test_wavelet_mse_loss_and_subband_weights():
    pred, target = torch.randn(2, 16, 2, 2, 2), torch.randn(2, 16, 2, 2, 2)
    assert torch.allclose(WaveletMSELoss()(pred, target), F.mse_loss(pred, target))
    only_lll = WaveletMSELoss([1, 0, 0, 0, 0, 0, 0, 0])(pred, target)
    assert torch.allclose(only_lll, F.mse_loss(pred[:, :2], target[:, :2]))
    per = subband_mse(pred, target)
    assert list(per) == list(SUBBANDS)
    assert math.isclose(per["HHL"], F.mse_loss(pred[:, 12:14], target[:, 12:14]).item(), rel_tol=1e-6)
    assert math.isclose(sum(per.values()) / 8, F.mse_loss(pred, target).item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"8 \(one level\) or 64"):
        WaveletMSELoss([1, 2, 3])


def test_config_records_the_noise_schedule_and_resuming_warns_on_a_change(caplog):
    from wdm3d.engine.checkpoint import RunConfig

    linear, cosine, steep = (WaveletDiffusion(**kw) for kw in ({}, {"schedule": "cosine"}, {"beta_end": 0.035}))
    assert len({str(d.config()) for d in (linear, cosine, steep)}) == 3  # three processes, three configs
    assert linear.config()["schedule"] == "linear_beta" and steep.config()["beta_end"] == 0.035
    assert WaveletDiffusion(process="rflow").config()["rflow_sample_method"] == "uniform"
    saved = RunConfig(diffusion=linear).state_dict()
    with caplog.at_level("WARNING", logger="wdm3d.engine.checkpoint"):
        RunConfig(diffusion=steep).load_state_dict(saved)
    assert "Resuming with different diffusion settings" in caplog.text and "beta_end" in caplog.text
    caplog.clear()
    older = {
        **saved,
        "diffusion": {k: v for k, v in saved["diffusion"].items() if k not in ("schedule", "beta_start", "beta_end")},
    }
    with caplog.at_level("WARNING", logger="wdm3d.engine.checkpoint"):
        RunConfig(diffusion=linear).load_state_dict(older)  # a checkpoint from before these were recorded
    assert "Resuming with different" not in caplog.text
