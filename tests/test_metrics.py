"""wdm3d.metrics and the MedicalNet network: closed forms, limits, refusals (CPU, tiny volumes)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from wdm3d.demo import phantom_volumes
from wdm3d.metrics import (
    bootstrap_ci,
    extract_features,
    fid_from_features,
    frechet_distance,
    intensity_wasserstein,
    memorization_audit,
    mmd_rbf,
    ms_ssim_diversity,
    ms_ssim_min_size,
    ms_ssim_settings,
    normalize_volumes,
    pair_bootstrap_ci,
    sample_pairs,
)
from wdm3d.metrics.diversity import pairwise_ms_ssim
from wdm3d.networks import (
    MEDICALNET_WEIGHTS_FILE,
    MedicalNetResNet50,
    RandomConv3dFeatures,
    load_medicalnet_weights,
    medicalnet_resnet50,
)


def phantoms(n, size=16, seed=0):
    return np.stack([((v[0].numpy() + 1) / 2).astype(np.float32) for v in phantom_volumes(n, size, seed=seed)])


def random_spd(rng, f):
    a = rng.normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


# --- Fréchet distance / FID -------------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    f = 6
    u, _ = np.linalg.qr(rng.normal(size=(f, f)))  # shared eigenbasis, not axis-aligned
    a, b = rng.uniform(0.1, 3, f), rng.uniform(0.1, 3, f)
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = (u * a) @ u.T, (u * b) @ u.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # 1D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_general_case_is_real_symmetric_and_agrees_with_sqrtm():
    rng = np.random.default_rng(1)
    f = 8
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = random_spd(rng, f), random_spd(rng, f)
    ref = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(ref).real
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert isinstance(d12, float) and d12 == pytest.approx(expected, rel=1e-8)
    assert d12 == pytest.approx(d21, rel=1e-10)


def test_fid_with_fewer_volumes_than_features_is_finite_and_reports_n():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(5, 64)), rng.normal(size=(7, 64)) + 0.5  # rank-deficient covariances
    out = fid_from_features(real, fake)
    assert (out["n_real"], out["n_fake"], out["feature_dim"]) == (5, 7, 64)
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    assert fid_from_features(fake, real)["fid"] == pytest.approx(out["fid"], rel=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(real[:1], fake)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    vols = phantoms(6, 16, seed=1)
    net = RandomConv3dFeatures(seed=0)
    feats = lambda v: extract_features(net, v, (0.0, 1.0), batch_size=4, device="cpu")  # noqa: E731
    base = feats(vols)
    assert fid_from_features(base, base)["fid"] < 1e-8
    fids = [fid_from_features(base, feats(vols + s))["fid"] for s in (0.05, 0.1, 0.2)]
    assert 0 < fids[0] < fids[1] < fids[2]


def test_normalisation_presets():
    v = np.array([[[[-1000.0, 0.0, 1000.0, 3000.0]]]], dtype=np.float32)  # (1, 1, 1, 4), HU
    wdm = normalize_volumes(v, (-1000, 1000), "wdm")
    hagan = normalize_volumes(v, (-1000, 1000), "hagan")
    assert wdm.shape == (1, 1, 1, 1, 4)
    assert wdm.flatten().tolist() == [0.0, 0.5, 1.0, 1.0] and hagan.flatten().tolist() == [-1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="preset"):
        normalize_volumes(v, (0, 1), "inception")


# --- MedicalNet --------------------------------------------------------------------------------------------------------


def test_medicalnet_architecture_strides_dilations_and_feature_size():
    net = MedicalNetResNet50().eval()
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert net.conv1.kernel_size == (7, 7, 7) and net.conv1.stride == (2, 2, 2)
    assert net.layer2[0].conv2.stride == (2, 2, 2) and net.layer2[0].conv2.dilation == (1, 1, 1)
    for block in net.layer3:
        assert (
            block.conv2.stride == (1, 1, 1) and block.conv2.dilation == (2, 2, 2) and block.conv2.padding == (2, 2, 2)
        )
    for block in net.layer4:
        assert block.conv2.stride == (1, 1, 1) and block.conv2.dilation == (4, 4, 4)
    # shortcut B: 1^3 conv + BN where the shape changes, identity elsewhere
    assert isinstance(net.layer1[0].downsample[0], torch.nn.Conv3d) and net.layer1[0].downsample[0].kernel_size == (
        1,
        1,
        1,
    )
    assert net.layer3[0].downsample[0].stride == (1, 1, 1) and net.layer3[1].downsample is None
    with torch.no_grad():
        maps = net.feature_maps(torch.rand(1, 1, 32, 24, 16))
        feats = net(torch.rand(2, 1, 16, 16, 16))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        "conv1": (64, 16, 12, 8),
        "maxpool": (64, 8, 6, 4),
        "layer1": (256, 8, 6, 4),
        "layer2": (512, 4, 3, 2),
        "layer3": (1024, 4, 3, 2),
        "layer4": (2048, 4, 3, 2),
    }
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(net(maps["conv1"].new_ones(1, 1, 8, 8, 8)).shape, torch.Size([1, 2048]))


def _mark_executed():
    _mark_executed.ran = True
    return {}


class _PickledCode:
    def __reduce__(self):
        return (_mark_executed, ())


def test_medicalnet_weights_load_from_the_release_layout_and_refuse_the_rest(tmp_path):
    src = MedicalNetResNet50().eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a wrong load would show
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    # MedicalNet's release: {"state_dict": {"module.<key>": ...}} with a segmentation head
    release = {"module." + k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    release["module.conv_seg.0.weight"] = torch.zeros(32, 2048, 3, 3, 3)
    path = tmp_path / MEDICALNET_WEIGHTS_FILE
    torch.save({"state_dict": release}, path)
    net = medicalnet_resnet50(path)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), src(x))
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    load_medicalnet_weights(MedicalNetResNet50(), plain)

    with pytest.raises(FileNotFoundError) as err:
        medicalnet_resnet50(tmp_path / "nowhere.pth")
    assert MEDICALNET_WEIGHTS_FILE in str(err.value) and "--weights" in str(err.value) and "MIT" in str(err.value)
    with pytest.raises(FileNotFoundError, match=MEDICALNET_WEIGHTS_FILE):
        medicalnet_resnet50(None)

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _PickledCode()}, evil)
    _mark_executed.ran = False
    with pytest.raises(ValueError, match="Refusing"):
        medicalnet_resnet50(evil)
    assert not _mark_executed.ran  # weights_only: the pickled call never ran

    partial = tmp_path / "resnet_10.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("layer4")}, partial)
    with pytest.raises(ValueError, match="does not fit"):
        medicalnet_resnet50(partial)


def test_medicalnet_features_are_batched_identically():
    net = MedicalNetResNet50().eval()
    vols = phantoms(3, 16)
    together = extract_features(net, vols, (0, 1), batch_size=3, device="cpu")
    one_by_one = extract_features(net, vols, (0, 1), batch_size=1, device="cpu")
    assert together.shape == (3, 2048) and together.dtype == np.float64
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)


# --- MS-SSIM diversity ------------------------------------------------------------------------------------------------


def test_ms_ssim_of_identical_volumes_is_one():
    vol = phantoms(1, 16)[0]
    out = ms_ssim_diversity(np.stack([vol] * 4), pairs="all", device="cpu")
    assert out["n_pairs"] == 6 and out["pairs"] == "all"
    assert out["mean"] == pytest.approx(1.0, abs=1e-5) and out["ci_low"] == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_size_limit_is_an_error_or_stated_adaptation():
    from monai.metrics.regression import compute_ms_ssim

    assert ms_ssim_min_size(7, 5) == 112 and ms_ssim_min_size(11, 5) == 176
    # MONAI's own check has the same boundary (its message says "larger than 96", which is not the limit)
    with pytest.raises(ValueError, match="must be larger"):
        compute_ms_ssim(torch.zeros(1, 1, 111, 111, 111), torch.zeros(1, 1, 111, 111, 111), 3, kernel_size=7)
    x = torch.rand(1, 1, 112, 112, 112)
    assert compute_ms_ssim(x, x, 3, kernel_size=7).item() == pytest.approx(1.0, abs=1e-5)
    assert not ms_ssim_settings((112, 128, 128))["adapted"]
    with pytest.raises(ValueError, match=r">= 112 voxels"):
        ms_ssim_diversity(phantoms(3, 16), adapt=False, device="cpu")
    s = ms_ssim_settings((16, 16, 16))
    assert s["adapted"] and s["num_scales"] == 2 and s["kernel_size"] == 7 and "not comparable" in s["note"]
    assert sum(s["weights"]) == pytest.approx(1.0, abs=1e-5)
    tiny = ms_ssim_settings((5, 6, 8))
    assert tiny["num_scales"] == 1 and tiny["kernel_size"] == 5


def test_ms_ssim_random_pairs_ci_contains_the_all_pairs_value_and_threads_agree():
    vols = normalize_volumes(phantoms(10, 16, seed=4), (0, 1))
    full = ms_ssim_diversity(vols, pairs="all", device="cpu")
    part = ms_ssim_diversity(vols, pairs=20, seed=1, device="cpu")
    assert full["n_pairs"] == 45 and part["n_pairs"] == 20 and part["pairs"] == "random"
    assert part["ci_low"] <= full["mean"] <= part["ci_high"]
    pairs = sample_pairs(10, 20, seed=1)
    assert len(set(pairs)) == 20 and all(0 <= i < j < 10 for i, j in pairs)
    settings = ms_ssim_settings(vols.shape[2:])
    one = pairwise_ms_ssim(vols, pairs, settings, batch_size=3, num_threads=1, device="cpu")
    many = pairwise_ms_ssim(vols, pairs, settings, batch_size=3, num_threads=3, device="cpu")
    np.testing.assert_allclose(one, many, rtol=1e-6)
    lo, hi = bootstrap_ci(np.array([0.5] * 10))
    assert lo == hi == 0.5


# --- distribution checks ---------------------------------------------------------------------------------------------


def test_wasserstein_and_mmd_are_zero_for_identical_sets_and_grow_with_a_shift():
    vols = phantoms(5, 16, seed=2)
    same = intensity_wasserstein(vols, vols.copy(), (-1, 2))
    assert same["wasserstein"] == pytest.approx(0.0, abs=1e-12)
    shifted = intensity_wasserstein(vols, vols + 0.25, (-1, 2), bins=300)
    assert shifted["wasserstein"] == pytest.approx(0.25, abs=0.011)  # a pure shift moves every voxel by 0.25
    flat = vols.reshape(5, -1)
    twin = mmd_rbf(flat, flat.copy())
    assert twin["mmd"] == 0.0 and twin["mmd2"] <= 0 and twin["mmd2_biased"] == pytest.approx(0.0, abs=1e-10)
    sigma = mmd_rbf(flat, flat + 0.05)["bandwidth"]
    m0, m1, m2 = (mmd_rbf(flat, flat + d, bandwidth=sigma)["mmd2"] for d in (0.0, 0.05, 0.2))
    assert m0 < m1 < m2 and m2 > 0


def test_pairwise_ci_resamples_volumes_and_covers_the_mean():
    # pair values that share a volume are correlated (v_ij = a_i + a_j + noise): the CI must account for it
    rng = np.random.default_rng(0)
    n, hits, reps = 10, 0, 300
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    for _ in range(reps):
        a = rng.normal(0, 1, n)
        values = a[pairs[:, 0]] + a[pairs[:, 1]] + rng.normal(0, 0.2, len(pairs))
        lo, hi = pair_bootstrap_ci(values, pairs, n, n_boot=500, seed=int(rng.integers(1 << 30)))
        hits += lo <= 0.0 <= hi  # the true mean of the pair statistic is 0
    assert hits / reps >= 0.85  # 0.88 measured (nominal 0.95; small n); resampling pairs covered 0.44 here
    assert pair_bootstrap_ci(np.array([0.5] * 45), pairs, n) == (0.5, 0.5)
    with pytest.raises(ValueError, match="one pair per value"):
        pair_bootstrap_ci(np.ones(3), pairs, n)


def test_mmd_is_unbiased_whatever_the_sample_sizes_and_tests_sameness():
    rng = np.random.default_rng(1)
    for n in (5, 10, 50):  # the biased estimate averages ~1.26 / n here: it measured n, not a difference
        same = [mmd_rbf(rng.normal(size=(n, 64)), rng.normal(size=(n, 64)), permutations=0)["mmd2"] for _ in range(40)]
        assert abs(np.mean(same)) < 0.02
    x, y = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    same = mmd_rbf(x, y, permutations=200)
    shifted = mmd_rbf(x, y + 0.5, permutations=200)
    assert same["p_value"] > 0.05 and shifted["p_value"] < 0.01 and shifted["mmd"] > same["mmd"]
    assert shifted["mmd2_biased"] >= shifted["mmd2"]
    with pytest.raises(ValueError, match="N, M >= 2"):
        mmd_rbf(x[:1], y)


def test_wasserstein_sees_a_shift_smaller_than_a_coarse_bin():
    vols = np.zeros((2, 8, 8, 8), np.float32)
    vols[:, 2:6, 2:6, 2:6] = 0.8
    moved = vols.copy()
    moved[vols == 0] = 0.003  # the background lifted by less than 1/256 of [0, 1]
    exact = 0.003 * (vols == 0).mean()
    assert intensity_wasserstein(vols, moved, (0, 1))["wasserstein"] == pytest.approx(exact, rel=0.1)


# --- memorization -----------------------------------------------------------------------------------------------------


def test_planted_copies_are_caught_and_independent_samples_are_not():
    train = phantoms(8, 16, seed=5)
    independent = phantoms(4, 16, seed=99)
    rng = np.random.default_rng(0)
    noisy = train[3] + rng.normal(0, 0.02, train[3].shape).astype(np.float32)
    rescaled = 2.0 * train[6] + 0.1  # NCC ignores a global intensity change
    fake = np.concatenate([independent, train[1:2], noisy[None], rescaled[None]])
    names = [f"ind{i}" for i in range(4)] + ["exact", "noisy", "rescaled"]
    out = memorization_audit(
        fake,
        train,
        names,
        [f"train{i}" for i in range(8)],
        fake_embeddings=fake.reshape(7, -1),
        train_embeddings=train.reshape(8, -1),
    )
    flagged = {c["fake"]: c["train"] for c in out["suspected_copies"]}
    assert flagged == {"exact": "train1", "noisy": "train3", "rescaled": "train6"}
    assert out["copy_fraction"] == pytest.approx(3 / 7)
    assert out["per_sample"][4]["ncc"] == pytest.approx(1.0, abs=1e-6)
    assert out["per_sample"][4]["nearest_train_embedding"] == "train1"
    assert out["threshold"] > out["real_nn_ncc"]["max"] and len(out["real_nn_values"]) == 8
    clean = memorization_audit(independent, train)
    assert clean["suspected_copies"] == [] and clean["copy_fraction"] == 0.0
