"""The quality issue's recipe switches, each checked against its formula: min-SNR-gamma, x prediction with a velocity
loss (JiT), per-subband weights (fixed and learned), two Haar levels, the DiT backbone with AdaLN-Zero, and the
known-truth dataset's measurements."""

import math

import numpy as np
import pytest
import torch

from data_prep.known_truth import PARAMETERS, make_volumes, measure, measure_many
from wdm3d.artifacts import check_diffusion_matches
from wdm3d.diffusion import (
    DiffusionTarget,
    WaveletDiffusion,
    WaveletDiffusionPrepareBatch,
    WaveletMSELoss,
    maths,
    subband_mse,
)
from wdm3d.networks import DiT3D, DiTBlock
from wdm3d.networks.dit import patchify3d, unpatchify3d
from wdm3d.wavelets import WaveletSpace, dwt3d


def linear_alphas_cumprod(T=1000):
    # WDM's schedule written out, independent of the code under test
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


# -- min-SNR-gamma ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_the_papers_equations(prediction):
    d = WaveletDiffusion(prediction_type=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    ab = linear_alphas_cumprod()[t]
    snr = ab / (1 - ab)
    expected = {  # Hang et al. 2023, sec. 3.4
        "epsilon": torch.minimum(snr, torch.tensor(5.0)) / snr,
        "v_prediction": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
        "sample": torch.minimum(snr, torch.tensor(5.0)),
    }[prediction]
    torch.testing.assert_close(d.loss_weight(t), expected.float(), rtol=1e-6, atol=0)
    if prediction == "epsilon":  # below gamma nothing changes; at small t the weight falls as gamma / SNR
        assert d.loss_weight(torch.tensor([999])).item() == 1.0
        assert d.loss_weight(torch.tensor([0])).item() < 1e-3


@pytest.mark.parametrize(
    "process,prediction",
    [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("ddpm", "sample"), ("rflow", "v_prediction"), ("rflow", "sample")],
)
def test_error_ratio_is_what_an_x0_error_does_to_the_target(process, prediction):
    """Perturb x0_hat at a fixed x_t; the target's error must be sqrt(ratio) times the x0 error."""
    d = WaveletDiffusion(process=process, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, 4, 4, 4, generator=g).double(), torch.randn(3, 8, 4, 4, 4, generator=g).double()
    t = torch.tensor([50, 400, 900]) if process == "ddpm" else torch.tensor([50.0, 400.0, 900.0])
    x_t = d.add_noise(x0, noise, t)
    delta = 1e-3 * torch.randn(x0.shape, generator=g).double()
    level = d.alphas_cumprod[t] if process == "ddpm" else t.double() / 1000

    def target_for(x0_hat):  # the target whose implied x0 (at this x_t) is x0_hat
        if process == "ddpm":
            ab = maths.expand_to(level, x0)
            return maths.ddpm_target(x0_hat, maths.ddpm_eps_from_x0(x0_hat, x_t, ab), ab, prediction)
        s = maths.expand_to(level, x0)
        return maths.rflow_target(x0_hat, (x_t - (1 - s) * x0_hat) / s, prediction)

    err_target = (target_for(x0 + delta) - target_for(x0)).pow(2).sum(dim=(1, 2, 3, 4))
    err_x0 = delta.pow(2).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(err_target / err_x0, maths.target_error_ratio(process, prediction, level))


def test_min_snr_for_rflow_uses_its_own_snr():
    d = WaveletDiffusion(process="rflow", prediction_type="v_prediction", loss_weighting="min_snr")
    t = torch.tensor([100.0, 500.0, 950.0])
    s = t.double() / 1000
    snr = ((1 - s) / s) ** 2
    torch.testing.assert_close(d.loss_weight(t), (snr.clamp(max=5.0) * s**2).float())


# -- JiT: x prediction, velocity loss ---------------------------------------------------------------------------------


def test_velocity_loss_equals_the_implied_velocity_error():
    d = WaveletDiffusion(process="rflow", prediction_type="sample", loss_weighting="velocity")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 1, 8, 8, 8, generator=g) * 2 - 1
    torch.manual_seed(0)
    x0, target, _, kw = WaveletDiffusionPrepareBatch(d)({"image": images})
    assert isinstance(target, DiffusionTarget)
    torch.testing.assert_close(target.target, x0)  # the network still predicts x0
    x_s = d.add_noise(x0, kw["noise"], kw["timesteps"])
    x0_hat = x0 + 0.05 * torch.randn(x0.shape, generator=g)
    s = maths.expand_to(kw["timesteps"].double() / 1000, x0)
    v_hat = (x0_hat.double() - x_s) / s  # the velocity implied by x0_hat (dx/d(-s))
    v = x0.double() - kw["noise"].double()
    per_sample = (v_hat - v).pow(2).mean(dim=(1, 2, 3, 4))
    expected = torch.where(s.flatten() >= 0.05, per_sample, per_sample * s.flatten() ** 2 / 0.05**2).mean()
    torch.testing.assert_close(WaveletMSELoss()(x0_hat, target).double(), expected, rtol=1e-4, atol=0)


def test_velocity_weighting_needs_rflow_with_x_prediction():
    with pytest.raises(ValueError, match="velocity"):
        WaveletDiffusion(process="ddpm", prediction_type="sample", loss_weighting="velocity")
    with pytest.raises(ValueError, match="velocity"):
        WaveletDiffusion(process="rflow", prediction_type="v_prediction", loss_weighting="velocity")
    with pytest.raises(ValueError, match="loss_weighting"):
        WaveletDiffusion(loss_weighting="snr")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        WaveletDiffusion(loss_weighting="min_snr", min_snr_gamma=0)


def test_unweighted_process_keeps_a_plain_target():
    _, target, _, _ = WaveletDiffusionPrepareBatch(WaveletDiffusion())({"image": torch.rand(2, 1, 8, 8, 8)})
    assert isinstance(target, torch.Tensor) and not isinstance(target, DiffusionTarget)


# -- SD3's time shift -------------------------------------------------------------------------------------------------


def test_time_shift_is_sd3s_map_and_divides_the_snr_by_its_square():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = maths.rflow_time_shift(s, 3.0)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all()) and bool((shifted >= s).all())
    inner = s[1:-1]
    torch.testing.assert_close(
        maths.rflow_snr(maths.rflow_time_shift(inner, 3.0)), maths.rflow_snr(inner) / 9, rtol=1e-10, atol=0
    )
    torch.testing.assert_close(maths.rflow_time_shift(s, 1.0), s)


def test_time_shift_moves_logit_normal_training_times_by_log_shift():
    # logit(shift s / (1 + (shift - 1) s)) = logit(s) + log(shift): SD3's logit-normal N(0, 1) becomes N(log 3, 1)
    from scipy.stats import kstest

    torch.manual_seed(0)
    d = WaveletDiffusion(process="rflow", prediction_type="sample", rflow_sample_method="logit-normal", time_shift=3.0)
    s = d.sample_timesteps(4000).double() / d.num_train_timesteps
    logits = torch.log(s / (1 - s)).numpy()
    assert kstest(logits, "norm", args=(math.log(3.0), 1.0)).pvalue > 0.01
    assert kstest(logits, "norm", args=(0.0, 1.0)).pvalue < 1e-6  # the unshifted law is rejected


def test_time_shift_sets_the_sampling_grid_and_is_recorded():
    d = WaveletDiffusion(process="rflow", prediction_type="sample", time_shift=3.0)
    grid = d.sampling_timesteps("rflow", 4)
    expected = [1000 * 3 * u / (1 + 2 * u) for u in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert grid == pytest.approx(expected, rel=1e-12)
    assert d.network_evaluations("rflow", 4) == 4
    assert d.config()["time_shift"] == 3.0 and WaveletDiffusion(**d.config()).time_shift == 3.0
    assert "time_shift" not in WaveletDiffusion(process="rflow").config()  # earlier checkpoints' records unchanged
    # the model sees the shifted times
    seen = []

    def model(x, t, context=None):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    d.sample(model, (1, 8, 8, 8), num_samples=1, num_steps=4, seed=0, progress=False)
    assert seen == pytest.approx(expected[:-1], rel=1e-6)
    # a sampler may choose another grid for the same network
    check_diffusion_matches(
        {"run_config": {"diffusion": d.config()}}, WaveletDiffusion(process="rflow", prediction_type="sample"), "c"
    )


def test_time_shift_refuses_what_it_cannot_shift():
    with pytest.raises(ValueError, match="time_shift"):
        WaveletDiffusion(process="ddpm", time_shift=2.0)
    with pytest.raises(ValueError, match="time_shift"):
        WaveletDiffusion(process="rflow", flow_map="meanflow", time_shift=2.0)
    for bad in (0, -1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="time_shift"):
            WaveletDiffusion(process="rflow", time_shift=bad)


# -- per-subband weights ----------------------------------------------------------------------------------------------


def test_per_sample_weights_multiply_each_samples_error():
    pred, target = torch.zeros(2, 8, 2, 2, 2), torch.ones(2, 8, 2, 2, 2)
    target[1] *= 2  # squared errors 1 and 4
    loss = WaveletMSELoss()(pred, DiffusionTarget(target, torch.tensor([3.0, 0.5])))
    assert loss.item() == pytest.approx((3 * 1 + 0.5 * 4) / 2)


def test_learned_subband_loss_is_the_heteroscedastic_formula_and_balances_at_its_optimum():
    loss_fn = WaveletMSELoss(learned=True)
    pred = torch.zeros(2, 16, 2, 2, 2)
    target = torch.ones(2, 16, 2, 2, 2) * torch.arange(1, 9).repeat_interleave(2).reshape(1, 16, 1, 1, 1)
    mse = torch.arange(1, 9, dtype=torch.float32) ** 2  # per subband
    with torch.no_grad():
        loss_fn.log_variance.copy_(torch.linspace(-1, 1, 8))
    s = loss_fn.log_variance.detach()
    assert loss_fn(pred, target).item() == pytest.approx(float((torch.exp(-s) * mse + s).mean()), rel=1e-6)
    with torch.no_grad():  # at s_k = log mse_k the gradient in s vanishes
        loss_fn.log_variance.copy_(mse.log())
    loss_fn(pred, target).backward()
    assert loss_fn.log_variance.grad.abs().max().item() < 1e-6
    assert len(list(loss_fn.parameters())) == 1 and len(list(WaveletMSELoss().parameters())) == 0


def test_fixed_subband_weights_keep_the_old_normalisation_and_accept_64():
    pred, target = torch.zeros(1, 8, 2, 2, 2), torch.ones(1, 8, 2, 2, 2)
    w = [2.0] + [1.0] * 7
    assert WaveletMSELoss(w)(pred, target).item() == pytest.approx(1.0)  # sum w mse / sum w
    target[:, 0] = 2.0
    assert WaveletMSELoss(w)(pred, target).item() == pytest.approx((2 * 4 + 7) / 9)
    assert WaveletMSELoss([1.0] * 64)(torch.zeros(1, 64, 1, 1, 1), torch.ones(1, 64, 1, 1, 1)).item() == 1.0
    with pytest.raises(ValueError, match="8 .* or 64"):
        WaveletMSELoss([1.0] * 7)


# -- two Haar levels --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lll_scale", [1.0, 3.0])
def test_two_level_transform_round_trips_exactly(lll_scale):
    space = WaveletSpace(lll_scale=lll_scale, levels=2)
    x = torch.randn(2, 3, 8, 12, 16, dtype=torch.float64)
    y = space.encode(x)
    assert y.shape == (2, 64 * 3, 2, 3, 4)
    torch.testing.assert_close(space.decode(y), x, rtol=0, atol=1e-12)
    if lll_scale == 1.0:  # orthonormal: Parseval
        torch.testing.assert_close(y.pow(2).sum(), x.pow(2).sum())


def test_two_level_layout_and_coarsest_band():
    x = torch.rand(1, 2, 8, 8, 8, dtype=torch.float64)
    y = WaveletSpace(lll_scale=3.0, levels=2).encode(x)
    block_mean = torch.nn.functional.avg_pool3d(x, 4)
    torch.testing.assert_close(y[:, :2], 8 * block_mean / 9)  # LLL of LLL: (2 sqrt 2)^2 mean, / 3 per level
    # channel j of level 2 is subband j // 16 of level-1 channel j % 16
    level1 = dwt3d(x)
    level1[:, :2] /= 3
    manual = dwt3d(level1)
    manual[:, :2] /= 3
    torch.testing.assert_close(y, manual)


def test_two_level_diffusion_samples_and_is_recorded():
    d = WaveletDiffusion(process="rflow", prediction_type="v_prediction", levels=2)
    assert d.channel_factor == 64 and d.config()["levels"] == 2
    calls = []

    def model(x, t, context=None):
        calls.append(tuple(x.shape))
        return torch.zeros_like(x)

    out = d.sample(model, (1, 16, 16, 16), num_samples=2, num_steps=3, seed=0, progress=False)
    assert out.shape == (2, 1, 16, 16, 16) and calls[0] == (2, 64, 4, 4, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        d.sample(model, (1, 18, 16, 16), num_steps=2, progress=False)
    trained = {"run_config": {"diffusion": d.config()}}
    with pytest.raises(ValueError, match="levels"):
        check_diffusion_matches(trained, WaveletDiffusion(process="rflow", prediction_type="v_prediction"), "ckpt.pt")
    # the loss weighting is a training choice: sampling with another one is allowed
    check_diffusion_matches(
        trained,
        WaveletDiffusion(process="rflow", prediction_type="v_prediction", levels=2, loss_weighting="min_snr"),
        "ckpt.pt",
    )


def test_subband_mse_of_two_levels_groups_by_level_one_band():
    pred = torch.zeros(1, 64, 2, 2, 2)
    target = torch.zeros(1, 64, 2, 2, 2)
    target[:, 8 * 5 + 3] = 1.0  # level-2 band 5 of level-1 band 3 (LHH)
    per = subband_mse(pred, target, levels=2)
    assert per["LHH"] == pytest.approx(1 / 8) and sum(per.values()) == pytest.approx(1 / 8)


# -- DiT with AdaLN-Zero ----------------------------------------------------------------------------------------------


def test_adaln_zero_blocks_start_as_the_identity():
    block = DiTBlock(dim=24, num_heads=4)
    x, cond = torch.randn(2, 10, 24), torch.randn(2, 24)
    torch.testing.assert_close(block(x, cond), x, rtol=0, atol=0)
    with torch.no_grad():  # a non-zero gate opens the residual path
        block.ada[1].bias.normal_()
    assert not torch.allclose(block(x, cond), x)


def test_dit_starts_at_zero_learns_and_keeps_the_grid():
    torch.manual_seed(0)
    net = DiT3D(in_channels=8, patch_size=2, hidden_size=48, depth=2, num_heads=4)
    x = torch.randn(2, 8, 4, 6, 8)
    assert net(x, torch.tensor([3, 700])).abs().max().item() == 0.0
    target = torch.randn(2, 8, 4, 6, 8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for _ in range(30):
        loss = (net(x, torch.tensor([3, 700])) - target).pow(2).mean()
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    with pytest.raises(ValueError, match="divisible by patch_size"):
        net(torch.randn(1, 8, 5, 6, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="context"):
        net(x, torch.tensor([1, 2]), context=torch.randn(2, 1, 4))


def test_dit_patchify_and_unpatchify_are_inverse_and_match_the_patch_embedding():
    x = torch.randn(2, 3, 4, 6, 2)
    tokens = patchify3d(x, 2)
    assert tokens.shape == (2, 2 * 3 * 1, 3 * 8)
    torch.testing.assert_close(unpatchify3d(tokens, (2, 3, 1), 2), x, rtol=0, atol=0)
    # the conv patch embedding reads the same token order and feature order: with identity weights it equals patchify
    net = DiT3D(in_channels=3, patch_size=2, hidden_size=24, depth=1, num_heads=2)
    with torch.no_grad():
        net.patch_embed.weight.copy_(torch.eye(24).reshape(24, 3, 2, 2, 2))
        net.patch_embed.bias.zero_()
    torch.testing.assert_close(net.patch_embed(x).flatten(2).transpose(1, 2), tokens)
    # a patch's values land back in that patch: token 1 is grid cell (0, 1, 0), voxels [0:2, 2:4, 0:2]
    torch.testing.assert_close(tokens[:, 1].reshape(2, 3, 2, 2, 2), x[:, :, 0:2, 2:4, 0:2])


# -- known-truth data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_known_truth_measurement_recovers_the_generating_parameters(size):
    vols, params = make_volumes(12 if size == 32 else 4, size=size, seed=7)
    assert vols.dtype == np.float32 and vols.min() >= 0 and vols.max() <= 1
    assert (vols[:, -2:, -2:, -2:] == 0).all()  # background is exactly 0
    got = measure_many(vols)
    assert got["valid"].all()
    s = size / 32
    # texture is the std of a smoothed noise field over the organ's core: a few hundred correlated voxels in a small
    # organ, so it is the least precise (the benchmark compares measured with measured, which cancels the bias)
    tol = {"radius": 0.1 * s, "intensity": 0.02, "center": 0.1 * s, "count": 0, "texture": 0.02, "rod_length": 1e-6}
    for p in PARAMETERS:
        np.testing.assert_allclose(got[p], params[p], atol=tol[p], err_msg=p)
    assert np.corrcoef(got["texture"], params["texture"])[0, 1] > 0.8


def test_known_truth_laws_and_broken_shapes():
    _, params = make_volumes(400, size=32, seed=3)
    intensity = params["intensity"]
    assert ((intensity > 0.55) & (intensity < 0.60)).mean() < 0.01  # bimodal: nothing 3 sd from both modes
    assert 0.4 < (intensity < 0.575).mean() < 0.6
    r = params["radius"]
    assert np.mean(r - np.median(r)) > 0  # right tail (log-normal)
    assert set(np.unique(params["count"])) == {0, 1, 2, 3}
    noise = np.random.default_rng(0).random((32, 32, 32))
    assert measure(noise)["valid"] == 0.0
    assert math.isnan(measure(np.zeros((32, 32, 32)))["radius"])
    with pytest.raises(ValueError, match="32 or 64"):
        make_volumes(1, size=48)


def _benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_counts_empty_samples_and_picks_the_winner_by_its_rule():
    q = _benchmark("quality")
    ref = measure_many(make_volumes(48, 32, seed=5)[0])
    fake = make_volumes(16, 32, seed=6)[0]
    emptied = fake.copy()
    emptied[:8] = 0  # half the samples without an organ
    good, half = q._w1_counting_empty(ref, measure_many(fake)), q._w1_counting_empty(ref, measure_many(emptied))
    assert half > good + 0.5  # an empty volume is an organ of radius 0, not a sample left out

    # winner rule: lowest mean among 3-seed candidates; overlapping intervals tie and the cheaper sampler wins
    def rec(name, seed, value, nfe):
        return {
            "dataset": "shapes32",
            "iterations": 10,
            "candidate": name,
            "seed": seed,
            "nfe": nfe,
            "parameters": 1,
            "train_seconds": 1.0,
            "sample_seconds": 1.0,
            "metrics": {q.PRIMARY["shapes32"]: value},
        }

    names = list(q.CANDIDATES)[:3]
    records = [rec(names[0], s, v, 1000) for s, v in enumerate([1.0, 1.1, 0.9])]
    records += [rec(names[1], s, v, 50) for s, v in enumerate([1.05, 1.2, 1.0])]  # tied, cheaper: wins
    records += [rec(names[2], s, v, 50) for s, v in enumerate([3.0, 3.1, 2.9])]  # clearly worse
    summary = q.summarize(records)["shapes32@10"]
    assert summary["best_mean"] == names[0] and summary["winner"] == names[1]
    assert names[2] not in summary["tied_with_best"]
    # the winner against the baseline, seed by seed: the interval of the paired differences, not of the means
    pairs = [(1.0, 1.5), (2.0, 2.4), (3.0, 3.6)]  # means 2.0 vs 2.5 vary widely; the differences barely
    rows = [rec("w", s, a, 50) for s, (a, _) in enumerate(pairs)] + [
        rec("b", s, b, 50) for s, (_, b) in enumerate(pairs)
    ]
    vs = q.paired_difference(rows, "w", "b", q.PRIMARY["shapes32"])
    diffs = np.array([a - b for a, b in pairs])
    half = 4.302653 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert vs["difference"]["mean"] == pytest.approx(-0.5) and vs["seeds"] == [0, 1, 2]
    assert vs["difference"]["ci_high"] == pytest.approx(-0.5 + half, rel=1e-5)
    assert vs["difference"]["ci_high"] < 0  # apart from 0 ...
    assert (
        q.t_interval([a for a, _ in pairs])[2] > q.t_interval([b for _, b in pairs])[1]
    )  # ... though the means overlap
    assert vs["ratio_of_means"] == pytest.approx(2.0 / 2.5)
    assert q.paired_difference(rows[:4], "w", "b", q.PRIMARY["shapes32"]) is None  # one common seed

    # the bundles' default: the only kind of candidate no dataset tells from its best; a dataset it was not run on
    # rules it out
    def rows(dataset, name, values, nfe=50):
        return [{**rec(name, s, v, nfe), "dataset": dataset} for s, v in enumerate(values)]

    a, b, c = names
    records = (
        rows("shapes32", a, [1.0, 1.1, 0.9])
        + rows("shapes32", b, [1.1, 1.3, 1.0])
        + rows("shapes32", c, [0.7, 1.1, 0.9])
    )
    records += rows("shapes64", a, [2.0, 2.4, 1.6]) + rows("shapes64", b, [1.0, 1.1, 0.9])  # a ties b's best here
    records += rows("demo32", a, [5.0, 5.1, 4.9]) + rows("demo32", b, [9.0, 9.1, 8.9])  # b loses the demo
    records = [{**r, "metrics": {q.PRIMARY[r["dataset"]]: r["metrics"][q.PRIMARY["shapes32"]]}} for r in records]
    best = q.overall(q.summarize(records))["10"]
    assert best["winner"] == a and set(best["contenders"]) == {a} and best["not_run_everywhere"] == [c]
    assert best["contenders"][a]["relative_to_best"]["shapes64@10"] == pytest.approx(2.0 / 1.0)
    assert best["contenders"][a]["relative_to_best"]["shapes32@10"] == pytest.approx(1.0 / 0.9)  # c is best there
    # two contenders: the cheaper sampler wins although its ratios are no better
    d = list(q.CANDIDATES)[3]
    twin = [{**r, "candidate": d, "nfe": 1000} for r in records if r["candidate"] == a]
    best = q.overall(q.summarize(records + twin))["10"]
    assert set(best["contenders"]) == {a, d} and best["winner"] == a and best["contenders"][d]["nfe"] == 1000
    # nobody ties everywhere: the smallest worst-case ratio to a dataset's best wins (minimax)
    records = rows("shapes32", a, [1.0, 1.1, 0.9]) + rows("shapes32", b, [3.0, 3.1, 2.9])  # b 3x worse
    records += rows("shapes64", a, [2.0, 2.1, 1.9]) + rows("shapes64", b, [1.0, 1.1, 0.9])  # a 2x worse
    records = [{**r, "metrics": {q.PRIMARY[r["dataset"]]: r["metrics"][q.PRIMARY["shapes32"]]}} for r in records]
    best = q.overall(q.summarize(records))["10"]
    assert best["rule"].startswith("minimax") and best["winner"] == a and set(best["contenders"]) == {a, b}
    assert max(best["contenders"][b]["relative_to_best"].values()) == pytest.approx(3.0)
    # the bundles' default: the rule among the candidates allowed (those that passed the demo-scale check)
    best = q.overall(q.summarize(records), allowed={b})["10"]
    assert best["winner"] == b and set(best["contenders"]) == {b}
    assert best["contenders"][b]["relative_to_best"]["shapes32@10"] == pytest.approx(3.0)  # a's best still counts


def test_the_demo_scale_check_passes_a_training_whose_samples_have_a_brains_layout(tmp_path):
    import json

    q = _benchmark("quality")
    path = tmp_path / "demo_compare.json"
    assert q.demo_scale_check(path) == {}  # not run: nothing passed
    likeness = {"real": [0.96, 0.98], "jit_2level": [0.97, 0.95], "shortcut_2level": [0.9, 0.99], "other": [1.0]}
    path.write_text(json.dumps({"brain_likeness": likeness}))
    check = q.demo_scale_check(path)
    assert set(check) == {"rflow_x_vloss_2level", "shortcut_x_2level"}  # by training; unknown recipes left out
    assert check["rflow_x_vloss_2level"]["passed"] and check["rflow_x_vloss_2level"]["brain_likeness"] == 0.96
    assert not check["shortcut_x_2level"]["passed"] and check["shortcut_x_2level"]["real_min"] == 0.96  # mean 0.945
    # every sampler of a training shares its check
    assert q._training_of("shortcut_x_2level_4") == q._training_of("shortcut_x_2level_rflow50") == "shortcut_x_2level"
    assert q._training_of("wdm") == "wdm_ddim50"


def test_demo_compare_scores_brain_likeness_as_correlation_with_the_mean_training_volume():
    dc = _benchmark("demo_compare")
    reals = list(make_volumes(8, 32, seed=3)[0])
    mean = np.mean(reals, axis=0)
    noise = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    scores = dc.brain_likeness([mean, 2 * mean + 1, noise, reals[0]], reals)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(1.0)  # blind to brightness and contrast
    assert abs(scores[2]) < 0.05 and 0.05 < scores[3] < 1.0
