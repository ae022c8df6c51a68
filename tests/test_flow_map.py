"""Flow maps (MeanFlow, shortcut models) against closed forms: the identity and the self-consistency on a flow whose
average velocity is known exactly, the composition of jumps, and one-step maps learnt on a 1D Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp
from test_bundle import dataset  # noqa: F401 (the tiny prepared dataset, a fixture)
from torch import nn

from wdm3d.diffusion.flow_map import (
    flow_map_step,
    meanflow_loss,
    meanflow_sample,
    meanflow_target,
    sample_time_pairs,
    shortcut_sample,
    shortcut_target,
    shortcut_time_pairs,
)

A = 0.7  # the linear flow's rate: v(z, t) = A z


def exact_u(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The average velocity of the linear flow ``dz/dt = -A z`` (so ``v = A z`` in the project's sign).

    Going back from ``t`` to ``r``: ``z_r = z_t exp(A (t - r))``, so ``u = z_t (exp(A (t - r)) - 1) / (t - r)``,
    with the limit ``A z`` at ``r = t`` (written with expm1 to stay exact there).
    """
    h = (t - r).reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    ratio = torch.where(h > 0, torch.expm1(A * h) / h.clamp_min(1e-300), torch.full_like(h, A))
    return z * ratio


def test_meanflow_identity_holds_for_the_exact_average_velocity_of_a_linear_flow():
    torch.manual_seed(0)
    z = torch.randn(64, 3, dtype=torch.float64)
    r, t = sample_time_pairs(64, equal_fraction=0.2, generator=torch.Generator().manual_seed(1))
    r, t = r.double(), t.double()
    u, target = meanflow_target(exact_u, z, r, t, A * z)  # v at z_t is the flow's own velocity
    assert (r < t).sum() > 40
    torch.testing.assert_close(target, u, rtol=1e-12, atol=1e-12)
    # the identity is not vacuous: the instantaneous velocity, used as if it were the average one, violates it
    u_bad, target_bad = meanflow_target(lambda z, r, t: A * z * (1 + 0.3 * (t - r)[:, None]), z, r, t, A * z)
    assert (target_bad - u_bad).abs().max() > 1e-2


def test_a_few_step_sample_is_the_composition_of_one_step_maps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).double()

    def u(z, r, t):
        return net(torch.cat([z, r[:, None], t[:, None]], 1))

    noise = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        two = meanflow_sample(u, noise, 2)
        composed = flow_map_step(u, flow_map_step(u, noise, 0.5, 1.0), 0.0, 0.5)
        four = meanflow_sample(u, noise, 4)
        z = noise
        for t, r in ((1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)):
            z = flow_map_step(u, z, r, t)
    assert torch.equal(two, composed) and torch.equal(four, z)
    assert not torch.allclose(two, meanflow_sample(u, noise, 1))  # a learnt-free map: steps do differ


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_exact_flow_map_reaches_the_ode_solution_in_any_number_of_steps(steps):
    noise = torch.randn(32, 2, dtype=torch.float64)
    torch.testing.assert_close(meanflow_sample(exact_u, noise, steps), noise * math.exp(A), rtol=1e-12, atol=1e-12)


def test_time_pairs_and_loss_validate_and_weight():
    r, t = sample_time_pairs(10_000, equal_fraction=0.3, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and 0 < float(r.min()) and float(t.max()) < 1
    assert abs(float((r == t).float().mean()) - 0.3) < 0.03
    with pytest.raises(ValueError, match="equal_fraction"):
        sample_time_pairs(4, equal_fraction=1.5)
    with pytest.raises(ValueError, match="distribution"):
        sample_time_pairs(4, distribution="beta")
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at most its t"):
        meanflow_target(exact_u, z, torch.tensor([0.5, 0.2]), torch.tensor([0.4, 0.9]), z)
    u, target = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert float(meanflow_loss(u, target)) == pytest.approx(1.0)  # (2 + 0) / 2
    weighted = meanflow_loss(u, target, adaptive_power=1.0, eps=1e-3)
    assert float(weighted) == pytest.approx((2 / 2.001) / 2)  # the large error is damped to ~1


def _mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    # two modes, -2 and 2, of standard deviation 0.3
    sign = torch.randint(0, 2, (n, 1), generator=generator).float() * 2 - 1
    return 2.0 * sign + 0.3 * torch.randn(n, 1, generator=generator)


def _mixture_velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact marginal velocity ``E[x0 - noise | z_t]`` of :func:`_mixture` under ``z_t = (1 - t) x0 + t noise``.

    Given mode ``k`` (mean ``mu``, std 0.3), ``z_t`` is normal with mean ``(1 - t) mu`` and variance
    ``(1 - t)^2 0.09 + t^2``; the conditional means of ``x0`` and the noise are linear in ``z_t`` (Gaussian
    conditioning), and the modes are weighted by their posterior probabilities.
    """
    s, z = t[:, None].double(), z.double()
    var = (1 - s) ** 2 * 0.09 + s**2
    logits, velocity = [], []
    for mu in (-2.0, 2.0):
        dev = z - (1 - s) * mu
        logits.append(-0.5 * dev**2 / var)
        velocity.append(mu + (1 - s) * 0.09 / var * dev - s / var * dev)
    weights = torch.softmax(torch.cat(logits, 1), 1)
    return (weights * torch.cat(velocity, 1)).sum(1, keepdim=True).float()


def _learn_1d_flow_map(times, target_of, teacher=None):
    """A small MLP average velocity ``u(z, r, t)`` trained for 3000 steps on the 1D two-mode mixture, with the
    training times ``times(batch, generator)`` and the objective ``target_of(u, z, r, t, v)``; ``v`` is the
    conditional velocity ``x0 - noise``, or ``teacher(z, t)`` (distillation)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 1)
    )

    def u(z, r, t):
        return net(torch.cat([z, r[:, None], t[:, None]], 1))

    iters, gen = 3000, torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, 1e-4)
    for _ in range(iters):
        x, noise = _mixture(256, gen), torch.randn(256, 1, generator=gen)
        r, t = times(256, gen)
        z = (1 - t[:, None]) * x + t[:, None] * noise
        pred, target = target_of(u, z, r, t, x - noise if teacher is None else teacher(z, t))
        loss = meanflow_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return u


def test_a_learnt_one_step_map_matches_a_gaussian_mixture_where_one_euler_step_collapses():
    u = _learn_1d_flow_map(
        lambda n, g: sample_time_pairs(n, equal_fraction=0.25, distribution="uniform", generator=g), meanflow_target
    )
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5))
    truth = _mixture(20_000, torch.Generator().manual_seed(6))[:, 0].numpy()
    with torch.no_grad():
        one = meanflow_sample(u, noise, 1)[:, 0].numpy()
        ones = torch.ones(noise.shape[0])
        euler = (noise + u(noise, ones, ones))[:, 0].numpy()  # the instantaneous velocity, one step
    ks_one, ks_euler = ks_2samp(one, truth).statistic, ks_2samp(euler, truth).statistic
    # measured (CPU, seeds as here): KS 0.120 for the flow map against 0.500 for the Euler step, which lands every
    # sample near the mixture's mean
    assert ks_one < 0.15, ks_one
    assert ks_euler > 0.4, ks_euler


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_the_networks_take_the_interval_through_a_time_embedding_that_starts_at_zero(kind):
    from wdm3d.networks import DiT3D, WDMUNet

    def build(**kw):
        if kind == "unet":
            return WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, **kw)
        return DiT3D(in_channels=8, patch_size=2, hidden_size=24, depth=2, num_heads=2, **kw)

    torch.manual_seed(0)
    plain = build()
    for p in plain.parameters():  # a trained-looking network (a fresh one outputs zeros: its last layer starts at 0)
        nn.init.normal_(p, std=0.1)
    flow = build(interval_embedding=True)
    missing = flow.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("interval_embed.") for k in missing)
    x, t, gap = torch.randn(2, 8, 8, 8, 8), torch.tensor([300, 900]), torch.tensor([250, 0])
    with torch.no_grad():
        base = plain(x, t)
        assert torch.equal(flow(x, t, interval=gap), base)  # new: the interval adds nothing yet
        nn.init.normal_(flow.interval_embed[-1].weight, std=0.1)
        moved = flow(x, t, interval=gap)
        assert not torch.allclose(moved[0], base[0]) and torch.equal(flow(x, t, interval=torch.zeros(2)), flow(x, t))
        # one interval for the batch is that interval for every sample
        torch.testing.assert_close(
            flow(x, t, interval=torch.tensor(250)), flow(x, t, interval=torch.tensor([250, 250]))
        )
        scripted = torch.jit.script(flow)
        torch.testing.assert_close(scripted(x, t, None, gap), moved)
    with pytest.raises(ValueError, match="interval_embedding=True"):
        plain(x, t, interval=gap)
    with pytest.raises(ValueError, match=r"interval must be a scalar or have shape \(2,\)"):
        flow(x, t, interval=torch.zeros(3))


def test_the_bundle_trains_a_meanflow_model_and_samples_it_in_1_2_and_4_steps(dataset, tmp_path):  # noqa: F811
    # the wdm3d_brats bundle with its meanflow.json overlay, through MONAI's bundle machinery (CPU, tiny)
    import json

    import nibabel as nib
    import numpy as np
    from test_bundle import TINY, TINY_TRAIN, workflow

    from wdm3d.engine import latest_checkpoint, load_checkpoint

    data = dataset
    out = tmp_path / "out"
    train = workflow(
        ["train.json", "meanflow.json"],
        "training",
        dataset_dir=str(data),
        output_dir=str(out),
        max_epochs=2,
        **TINY_TRAIN,
    )
    diffusion = train.parser.get_parsed_content("diffusion")
    assert (diffusion.process, diffusion.flow_map) == ("rflow", "meanflow")
    assert train.parser.get_parsed_content("network").interval_embedding
    train.run()
    ckpt = load_checkpoint(latest_checkpoint(out / "models"))
    assert ckpt["run_config"]["diffusion"]["flow_map"] == "meanflow"
    assert any(k.startswith("interval_embed.") for k in ckpt["ema"])
    history = json.loads((out / "validation" / "history.json").read_text())
    assert len(history) == 2  # validation sampled with the one-step flow map after each epoch
    for steps in (1, 2, 4):
        samples = out / f"samples_{steps}"
        infer = workflow(
            ["inference.json", "meanflow.json"],
            "inference",
            dataset_dir=str(data),
            output_dir=str(out),
            samples_dir=str(samples),
            checkpoint=str(out / "models"),
            num_samples=2,
            num_steps=steps,
            **TINY,
        )
        infer.run()
        manifest = json.loads((samples / "manifest.json").read_text())
        assert (manifest["sampler"], manifest["network_evaluations"]) == ("meanflow", steps)
        vol = np.asarray(nib.load(samples / "sample_0000.nii.gz").dataobj)
        assert vol.shape == (16, 16, 16) and np.isfinite(vol).all()
    # the flow map at interval 0 is the instantaneous velocity: the same checkpoint samples with rflow's Euler steps
    infer = workflow(
        ["inference.json", "meanflow.json"],
        "inference",
        dataset_dir=str(data),
        output_dir=str(out),
        samples_dir=str(out / "samples_rflow"),
        checkpoint=str(out / "models"),
        num_samples=1,
        sampler="rflow",
        num_steps=3,
        **TINY,
    )
    infer.run()
    manifest = json.loads((out / "samples_rflow" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["network_evaluations"]) == ("rflow", 3)
    # while a plain rectified flow has no flow map to jump with
    from wdm3d.diffusion import WaveletDiffusion

    with pytest.raises(ValueError, match="needs a network trained as a flow map"):
        WaveletDiffusion(process="rflow", prediction_type="v_prediction").sampling_timesteps("meanflow", 1)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_process_samples_the_exact_flow_map_to_the_ode_solution(steps):
    # WaveletDiffusion's meanflow sampler, with timestep units and intervals as the networks see them
    from wdm3d.diffusion import WaveletDiffusion

    diffusion = WaveletDiffusion(process="rflow", prediction_type="v_prediction", flow_map="meanflow")
    T = diffusion.num_train_timesteps
    seen = []

    def model(x, timesteps, context=None, interval=None):
        seen.append((float(timesteps[0]), float(interval[0])))
        t = timesteps.double() / T
        return exact_u(x.double(), t - interval.double() / T, t).to(x.dtype)

    gen = torch.Generator().manual_seed(0)
    out = diffusion.sample(
        model,
        (1, 4, 4, 4),
        2,
        "meanflow",
        steps,
        clip_projection=False,
        generator=gen,
        progress=False,
        return_coeffs=True,
    )
    noise = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, noise * math.exp(A), rtol=1e-5, atol=1e-5)
    assert len(seen) == steps == diffusion.network_evaluations("meanflow", steps)
    assert seen[0] == (T, T / steps)


def test_the_training_target_is_flow_matching_at_equal_times_and_meanflow_otherwise():
    from wdm3d.diffusion import (
        FlowMapPrediction,
        WaveletDiffusion,
        WaveletDiffusionInferer,
        WaveletDiffusionPrepareBatch,
    )
    from wdm3d.networks import WDMUNet

    torch.manual_seed(0)
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, interval_embedding=True)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    images = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    for fraction in (1.0, 0.0):
        diffusion = WaveletDiffusion(
            process="rflow", prediction_type="v_prediction", flow_map="meanflow", flow_map_equal_fraction=fraction
        )
        torch.manual_seed(1)
        x0, _, _, kw = WaveletDiffusionPrepareBatch(diffusion)({"image": images})
        pred = WaveletDiffusionInferer(diffusion)(x0, net, **kw)
        assert isinstance(pred, FlowMapPrediction) and pred.u.requires_grad and not pred.target.requires_grad
        flow_matching = x0 - kw["noise"]
        if fraction == 1.0:  # r = t: no Jacobian term
            assert torch.equal(kw["interval"], torch.zeros(3))
            torch.testing.assert_close(pred.target, flow_matching)
        else:
            assert bool((kw["interval"] > 0).all())
            assert (pred.target - flow_matching).abs().max() > 1e-3
    with pytest.raises(ValueError, match="flow_map 'meanflow' learns a rectified flow"):
        WaveletDiffusion(flow_map="meanflow")  # the default ddpm process


def test_with_x_prediction_one_jump_lands_on_the_networks_clean_estimate():
    # JiT's parameterisation carried to flow maps: u = (x_hat - z_t) / t, so the one-step map returns x_hat itself
    from wdm3d.diffusion import WaveletDiffusion

    diffusion = WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="meanflow")
    x_hat = torch.randn(2, 8, 2, 2, 2)

    def model(x, timesteps, context=None, interval=None):
        return x_hat

    out = diffusion.sample(
        model, (1, 4, 4, 4), 2, "meanflow", 1, clip_projection=False, seed=0, progress=False, return_coeffs=True
    )
    torch.testing.assert_close(out, x_hat)
    z, t = torch.randn(2, 8, 2, 2, 2), torch.tensor([0.5, 0.01])
    u = diffusion.flow_map_velocity(model, z, torch.zeros(2), t)
    torch.testing.assert_close(u[0], (x_hat[0] - z[0]) / 0.5)
    torch.testing.assert_close(u[1], (x_hat[1] - z[1]) / 0.05)  # t clamped at 0.05 near the data


# --- shortcut models ------------------------------------------------------------------------------------------------


def test_shortcut_self_consistency_holds_for_the_exact_average_velocity_of_a_linear_flow():
    torch.manual_seed(0)
    z = torch.randn(256, 3, dtype=torch.float64)
    r, t = shortcut_time_pairs(256, equal_fraction=0.25, generator=torch.Generator().manual_seed(1))
    r, t = r.double(), t.double()
    u, target = shortcut_target(exact_u, z, r, t, A * z)  # two exact half jumps are one exact jump
    assert (r < t).sum() > 150
    torch.testing.assert_close(target, u, rtol=1e-12, atol=1e-12)
    # not vacuous: an average velocity that is not a flow map's breaks it (and at r = t the target is v itself)
    u_bad, target_bad = shortcut_target(lambda z, r, t: A * z * (1 + 0.3 * (t - r)[:, None]), z, r, t, 2 * A * z)
    jumped = r < t
    assert (target_bad - u_bad)[jumped].abs().max() > 1e-2
    torch.testing.assert_close(target_bad[~jumped], 2 * A * z[~jumped])


def test_shortcut_time_pairs_are_flow_matching_or_power_of_two_jumps():
    r, t = shortcut_time_pairs(20_000, equal_fraction=0.75, levels=7, generator=torch.Generator().manual_seed(0))
    assert bool((r <= t).all()) and float(r.min()) >= 0 and float(t.max()) <= 1
    assert abs(float((r == t).float().mean()) - 0.75) < 0.02
    jumps = (t - r)[r < t].double()
    sizes = torch.tensor([2.0**-k for k in range(7)], dtype=torch.float64)
    nearest = (jumps[:, None] - sizes).abs().min(dim=1).values
    assert float(nearest.max()) < 1e-6  # every jump is 1, 1/2, ..., 1/64
    counts = torch.bincount((jumps[:, None] - sizes).abs().argmin(dim=1), minlength=7)
    assert int(counts.min()) > 0.6 * len(jumps) / 7  # and each size is drawn
    with pytest.raises(ValueError, match="levels"):
        shortcut_time_pairs(4, levels=0)


def test_a_learnt_shortcut_model_matches_a_gaussian_mixture_in_few_steps():
    u = _learn_1d_flow_map(
        lambda n, g: shortcut_time_pairs(n, equal_fraction=0.75, distribution="uniform", generator=g), shortcut_target
    )
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5))
    truth = _mixture(20_000, torch.Generator().manual_seed(6))[:, 0].numpy()
    with torch.no_grad():
        ks = {k: ks_2samp(shortcut_sample(u, noise, k)[:, 0].numpy(), truth).statistic for k in (1, 4)}
        ones = torch.ones(noise.shape[0])
        euler = ks_2samp((noise + u(noise, ones, ones))[:, 0].numpy(), truth).statistic
    # measured (CPU, seeds as here): KS 0.191 at one step, 0.056 at four, the Euler step of its own velocity 0.5
    # (every sample near the mean); MeanFlow's one step on the same data: 0.120
    assert ks[1] < 0.25 and ks[4] < 0.1, ks
    assert euler > 0.4, euler


def test_the_mixtures_exact_velocity_solves_to_the_mixture():
    # the closed form the distillation test teaches with: its ODE (400 Euler steps) carries noise to the mixture
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5))
    for k in range(400):
        z = z + _mixture_velocity(z, torch.full((z.shape[0],), 1 - k / 400)) / 400
    truth = _mixture(20_000, torch.Generator().manual_seed(6))[:, 0].numpy()
    assert ks_2samp(z[:, 0].numpy(), truth).statistic < 0.03  # measured 0.010


def test_distilling_a_shortcut_model_from_the_exact_velocity_sharpens_its_one_step_map():
    u = _learn_1d_flow_map(
        lambda n, g: shortcut_time_pairs(n, equal_fraction=0.75, distribution="uniform", generator=g),
        shortcut_target,
        teacher=_mixture_velocity,
    )
    noise = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5))
    truth = _mixture(20_000, torch.Generator().manual_seed(6))[:, 0].numpy()
    with torch.no_grad():
        ks = {k: ks_2samp(shortcut_sample(u, noise, k)[:, 0].numpy(), truth).statistic for k in (1, 4)}
    # measured (CPU, seeds as here): KS 0.078 at one step, 0.034 at four; the same model trained on x0 - noise:
    # 0.191 and 0.056 (test_a_learnt_shortcut_model_matches_a_gaussian_mixture_in_few_steps); MeanFlow distilled
    # the same way: 0.087 at one step against 0.120
    assert ks[1] < 0.12 and ks[4] < 0.05, ks


def _tiny_flow_map_unet():
    from wdm3d.networks import WDMUNet

    torch.manual_seed(0)
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, interval_embedding=True)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    return net


@pytest.mark.parametrize("flow", ["meanflow", "shortcut"])
def test_a_teachers_velocity_replaces_x0_minus_noise_in_the_flow_map_target(flow):
    from wdm3d.diffusion import WaveletDiffusion, WaveletDiffusionInferer, WaveletDiffusionPrepareBatch

    class Teacher(nn.Module):  # an x-prediction "network": half its input, and a parameter that must stay frozen
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(0.5))

        def forward(self, x, timesteps, context=None):
            self.seen = timesteps.clone()
            return self.gain * x

    net, teacher = _tiny_flow_map_unet(), Teacher()
    student = WaveletDiffusion(process="rflow", prediction_type="v_prediction", flow_map=flow)
    teacher_diffusion = WaveletDiffusion(process="rflow", prediction_type="sample")
    inferer = WaveletDiffusionInferer(student, teacher=teacher, teacher_diffusion=teacher_diffusion)
    assert not teacher.training and not teacher.gain.requires_grad
    images = torch.rand(4, 1, 16, 16, 16) * 2 - 1
    for fraction in (1.0, 0.0):
        student.flow_map_equal_fraction = fraction
        torch.manual_seed(1)
        x0, _, _, kw = WaveletDiffusionPrepareBatch(student)({"image": images})
        pred = inferer(x0, net, **kw)
        z = student.add_noise(x0, kw["noise"], kw["timesteps"])
        s = (kw["timesteps"] / 1000).clamp_min(0.05).reshape(-1, 1, 1, 1, 1)
        v = (0.5 * z - z) / s  # x prediction -> the velocity toward the teacher's clean estimate
        torch.testing.assert_close(teacher.seen, kw["timesteps"])
        if fraction == 1.0:  # r = t: the teacher's velocity is the target
            torch.testing.assert_close(pred.target, v)
        else:  # the same objective as the functional form, given the teacher's v
            from wdm3d.diffusion.flow_map import meanflow_target

            t = kw["timesteps"].double() / 1000
            r = (kw["timesteps"] - kw["interval"]).double() / 1000

            def u_fn(zz, rr, tt):
                return student.flow_map_velocity(net, zz, rr, tt)

            target_of = shortcut_target if flow == "shortcut" else meanflow_target
            _, expected = target_of(u_fn, z, r.float(), t.float(), v)
            torch.testing.assert_close(pred.target, expected, rtol=1e-4, atol=1e-5)
            assert (pred.target - (x0 - kw["noise"])).abs().max() > 1e-2


def test_a_teacher_must_be_a_rectified_flow_in_the_students_wavelet_space():
    from wdm3d.diffusion import WaveletDiffusion, WaveletDiffusionInferer

    teacher = nn.Identity()
    student = WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="shortcut")
    rflow = WaveletDiffusion(process="rflow", prediction_type="sample")
    with pytest.raises(ValueError, match="distils into a flow map"):
        WaveletDiffusionInferer(rflow, teacher=teacher, teacher_diffusion=rflow)
    with pytest.raises(ValueError, match="must be a rectified flow"):
        WaveletDiffusionInferer(student, teacher=teacher, teacher_diffusion=WaveletDiffusion())  # ddpm
    # a trained flow map (the bundles' default) teaches with its velocity at interval 0: flow_map_velocity at r = t
    WaveletDiffusionInferer(student, teacher=teacher, teacher_diffusion=student)
    z, out, ts = torch.randn(2, 8, 2, 2, 2), torch.randn(2, 8, 2, 2, 2), torch.tensor([30.0, 700.0])
    seen = []

    def at_interval(x, timesteps, context=None, interval=None):
        seen.append(interval)
        return out

    s = ts / 1000
    torch.testing.assert_close(student.velocity(out, z, ts), student.flow_map_velocity(at_interval, z, s, s))
    assert torch.equal(seen[0], torch.zeros(2)) and not torch.equal(student.velocity(out, z, ts), out)
    two_levels = WaveletDiffusion(process="rflow", prediction_type="sample", levels=2)
    with pytest.raises(ValueError, match=r"'levels': \(2, 1\).*--diffusion#levels 2"):
        WaveletDiffusionInferer(student, teacher=teacher, teacher_diffusion=two_levels)
    other_t = WaveletDiffusion(process="rflow", prediction_type="sample", num_train_timesteps=500)
    with pytest.raises(ValueError, match=r"'num_train_timesteps': \(500, 1000\)"):
        WaveletDiffusionInferer(student, teacher=teacher, teacher_diffusion=other_t)
    with pytest.raises(TypeError, match="teacher_diffusion"):
        WaveletDiffusionInferer(student, teacher=teacher)
    with pytest.raises(ValueError, match="without a teacher"):
        WaveletDiffusionInferer(student, teacher_diffusion=rflow)
    with pytest.raises(ValueError, match="reads a rectified flow"):
        WaveletDiffusion().velocity(torch.zeros(1, 8, 2, 2, 2), torch.zeros(1, 8, 2, 2, 2), torch.ones(1))


def test_the_process_trains_and_samples_a_shortcut_model():
    from wdm3d.diffusion import (
        FlowMapPrediction,
        WaveletDiffusion,
        WaveletDiffusionInferer,
        WaveletDiffusionPrepareBatch,
    )
    from wdm3d.networks import WDMUNet

    torch.manual_seed(0)
    net = WDMUNet(base_channels=8, channel_mult=(1, 2), norm_num_groups=4, interval_embedding=True)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    images = torch.rand(4, 1, 16, 16, 16) * 2 - 1
    diffusion = WaveletDiffusion(
        process="rflow", prediction_type="sample", flow_map="shortcut", flow_map_equal_fraction=0.5
    )
    torch.manual_seed(3)
    x0, _, _, kw = WaveletDiffusionPrepareBatch(diffusion)({"image": images})
    pred = WaveletDiffusionInferer(diffusion)(x0, net, **kw)
    assert isinstance(pred, FlowMapPrediction) and pred.u.requires_grad and not pred.target.requires_grad
    T = diffusion.num_train_timesteps
    jumps = kw["interval"] / T
    equal = jumps == 0
    assert equal.any() and (~equal).any()
    torch.testing.assert_close(pred.target[equal], (x0 - kw["noise"])[equal])  # flow matching at r = t
    k = -torch.log2(jumps[~equal].double())
    torch.testing.assert_close(k, k.round())  # the other pairs jump a power of two

    def model(x, timesteps, context=None, interval=None):
        seen.append((float(timesteps[0]), float(interval[0])))
        t = timesteps.double() / T
        return exact_u(x.double(), t - interval.double() / T, t).to(x.dtype)

    vdiffusion = WaveletDiffusion(process="rflow", prediction_type="v_prediction", flow_map="shortcut")
    for steps in (1, 2, 4):
        seen = []
        out = vdiffusion.sample(
            model, (1, 4, 4, 4), 2, "shortcut", steps, clip_projection=False, seed=0, progress=False, return_coeffs=True
        )
        noise = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, noise * math.exp(A), rtol=1e-5, atol=1e-5)
        assert len(seen) == steps == vdiffusion.network_evaluations("shortcut", steps)
    with pytest.raises(ValueError, match="flow_map='shortcut'"):  # a MeanFlow network is not a shortcut model
        WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="meanflow").sampling_timesteps("shortcut")


def _assert_samples_in_2_shortcut_jumps(data_dir, out):
    """The bundle's inference with shortcut.json samples the model trained in ``out`` in 2 network evaluations."""
    import json

    from test_bundle import TINY, workflow

    workflow(
        ["inference.json", "shortcut.json"],
        "inference",
        dataset_dir=str(data_dir),
        output_dir=str(out),
        samples_dir=str(out / "samples"),
        checkpoint=str(out / "models"),
        num_samples=1,
        num_steps=2,
        **TINY,
    ).run()
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["network_evaluations"]) == ("shortcut", 2)


def test_the_bundle_trains_a_shortcut_model_and_samples_it_in_2_steps(dataset, tmp_path):  # noqa: F811

    from test_bundle import TINY_TRAIN, workflow

    from wdm3d.engine import latest_checkpoint, load_checkpoint

    out = tmp_path / "out"
    train = workflow(
        ["train.json", "shortcut.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(out),
        max_epochs=1,
        **TINY_TRAIN,
    )
    assert train.parser.get_parsed_content("diffusion").flow_map == "shortcut"
    train.run()
    assert load_checkpoint(latest_checkpoint(out / "models"))["run_config"]["diffusion"]["flow_map"] == "shortcut"
    _assert_samples_in_2_shortcut_jumps(dataset, out)


def test_the_bundle_distils_a_shortcut_model_from_a_trained_multi_step_model(dataset, tmp_path):  # noqa: F811

    from test_bundle import TINY_TRAIN, root_cause, workflow

    from wdm3d.diffusion import load_teacher
    from wdm3d.engine import latest_checkpoint, load_checkpoint

    teacher_dir = tmp_path / "teacher"
    recipe = {  # the quality benchmark's winner: two-level rectified flow, x prediction, velocity loss
        "diffusion#process": "rflow",
        "diffusion#prediction_type": "sample",
        "diffusion#loss_weighting": "velocity",
        "diffusion#rflow_sample_method": "logit-normal",
        "diffusion#levels": 2,
    }
    workflow(
        ["train.json"],
        "training",
        dataset_dir=str(dataset),
        output_dir=str(teacher_dir),
        max_epochs=1,
        **{**TINY_TRAIN, **recipe},
    ).run()
    network, diffusion = load_teacher(teacher_dir / "models")
    assert (diffusion.process, diffusion.levels, diffusion.flow_map) == ("rflow", 2, None)
    assert not network.training and not any(p.requires_grad for p in network.parameters())
    with pytest.raises(ValueError, match="set teacher_checkpoint"):
        load_teacher(None)
    with pytest.raises(FileNotFoundError, match="teacher"):
        load_teacher(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="another --output_dir"):  # the student would resume from the teacher
        load_teacher(teacher_dir / "models", student_dir=teacher_dir / "models")

    out = tmp_path / "student"
    files = ["train.json", "shortcut.json", "distill.json"]
    common = dict(
        dataset_dir=str(dataset), output_dir=str(out), max_epochs=1, teacher_checkpoint=str(teacher_dir / "models")
    )
    with pytest.raises(Exception) as err:  # a one-level student of a two-level teacher
        workflow(files, "training", **common, **{**TINY_TRAIN, "diffusion#levels": 1}).run()
    assert "--diffusion#levels 2" in str(root_cause(err.value))
    train = workflow(files, "training", **common, **TINY_TRAIN)  # shortcut.json: the default's two levels
    inferer = train.parser.get_parsed_content("train#inferer")
    assert inferer.teacher is not None and inferer.teacher_diffusion.levels == 2
    train.run()
    ckpt = load_checkpoint(latest_checkpoint(out / "models"))
    assert ckpt["run_config"]["diffusion"]["flow_map"] == "shortcut"
    assert ckpt["run_config"]["settings"]["teacher_checkpoint"] == str(teacher_dir / "models")
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # the teacher is not saved with the student
    _assert_samples_in_2_shortcut_jumps(dataset, out)


def test_the_default_sampler_and_its_steps_follow_the_process():
    from wdm3d.diffusion import WaveletDiffusion

    ddpm, rflow = WaveletDiffusion(), WaveletDiffusion(process="rflow", prediction_type="sample")
    shortcut = WaveletDiffusion(process="rflow", prediction_type="sample", flow_map="shortcut")
    assert (ddpm.default_sampler(), ddpm.default_sampler(fast=True)) == ("ddpm", "ddim")
    assert (rflow.default_sampler(), shortcut.default_sampler(), shortcut.default_sampler(fast=True)) == (
        "rflow",
        "shortcut",
        "shortcut",
    )
    steps = {s: shortcut.default_num_steps(s) for s in ("shortcut", "rflow")}
    assert steps == {"shortcut": 4, "rflow": 50} and ddpm.default_num_steps("ddpm") == ddpm.num_train_timesteps
    assert ddpm.default_num_steps("ddim") == 50 and shortcut.network_evaluations("shortcut", steps["shortcut"]) == 4
    with pytest.raises(ValueError, match="does not fit process 'ddpm'"):
        ddpm.default_num_steps("rflow")


@pytest.mark.parametrize("flow_map", ["shortcut", "meanflow"])
def test_the_flow_matching_times_follow_the_logit_normal_law_with_the_chosen_mean(flow_map):
    from scipy.stats import kstest, norm

    from wdm3d.diffusion import WaveletDiffusion

    torch.manual_seed(0)
    for mean in (-0.4, 0.0):
        d = WaveletDiffusion(
            process="rflow",
            prediction_type="sample",
            flow_map=flow_map,
            flow_map_equal_fraction=1.0,
            flow_map_time_mean=mean,
        )
        r, t = d.sample_flow_map_times(4000)
        assert torch.equal(r, t)  # every pair is a flow-matching pair
        s = (t / d.num_train_timesteps).double()
        if flow_map == "meanflow":  # MeanFlow's t is the larger of two draws: P(T <= x) = F(x)^2
            stat = kstest(torch.logit(s).numpy(), lambda x, m=mean: norm.cdf(x, loc=m) ** 2)
        else:
            stat = kstest(torch.logit(s).numpy(), "norm", args=(mean, 1.0))
        assert stat.statistic < 0.03, (mean, stat)
        # the default is left out of config() so earlier checkpoints' records stay equal; sampling may differ
        assert ("flow_map_time_mean" in d.config()) == (mean != -0.4)
    with pytest.raises(ValueError, match="flow_map_time_mean must be a finite number"):
        WaveletDiffusion(process="rflow", prediction_type="sample", flow_map=flow_map, flow_map_time_mean=float("nan"))
