"""Paired metrics (PSNR, SSIM, MAE in HU) and the latent geometry helpers."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from wdm3d.autoencoder import latent_affine
from wdm3d.io import save_nifti
from wdm3d.metrics import mae, psnr, reconstruction_metrics, ssim3d, summarize_cases


def test_psnr_matches_its_definition():
    x = torch.zeros(1, 1, 4, 4, 4)
    y = x.clone()
    y[0, 0, 0, 0, 0] = 1.0  # MSE = 1/64
    assert psnr(y, x, 2.0).item() == pytest.approx(10 * math.log10(4 * 64), rel=1e-6)
    assert math.isinf(psnr(x, x, 2.0).item())


def test_ssim_is_one_for_identical_and_lower_for_noisy_volumes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1
    assert torch.allclose(ssim3d(x, x, 2.0), torch.ones(2))
    noisy = x + 0.3 * torch.randn(x.shape, generator=g)
    s = ssim3d(noisy, x, 2.0)
    assert (s < 0.9).all() and (s > 0).all()


def test_mae_in_hu_scales_by_the_window_over_the_value_range():
    x = torch.zeros(1, 1, 8, 8, 8)
    y = torch.full_like(x, 0.1)
    row = reconstruction_metrics(y, x, (-1.0, 1.0), physical_range=(-1000.0, 1000.0))[0]
    assert row["mae"] == pytest.approx(0.1, rel=1e-5)
    assert row["mae_hu"] == pytest.approx(100.0, rel=1e-4)  # 0.1 of a width-2 range over a 2000 HU window
    assert mae(y, x, scale=3.0).item() == pytest.approx(0.3, rel=1e-5)


def test_metrics_clip_to_the_value_range_and_check_shapes():
    x = torch.zeros(1, 1, 8, 8, 8)
    assert reconstruction_metrics(x + 5, x + 1)[0]["mae"] == 0.0  # both clipped to 1
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, torch.zeros(1, 1, 8, 8, 4), 2.0)


def test_summary_gives_mean_and_std_per_metric():
    s = summarize_cases([{"psnr": 30.0, "ssim": 0.9}, {"psnr": 32.0, "ssim": 0.8}])
    assert s["psnr_mean"] == 31.0 and s["psnr_std"] == pytest.approx(math.sqrt(2))
    assert s["ssim_mean"] == pytest.approx(0.85) and s["num_cases"] == 2
    with pytest.raises(ValueError):
        summarize_cases([])


def test_latent_affine_puts_each_latent_voxel_at_the_centre_of_its_block():
    affine = np.array([[-2.0, 0, 0, 90.0], [0, 2.0, 0, -120.0], [0, 0, 2.5, -70.0], [0, 0, 0, 1]])
    lat = latent_affine(affine, 4)
    for i, j, k in [(0, 0, 0), (1, 2, 3)]:
        centre = np.mean(
            [affine @ [4 * i + a, 4 * j + b, 4 * k + c, 1] for a in range(4) for b in range(4) for c in range(4)],
            axis=0,
        )
        np.testing.assert_allclose(lat @ [i, j, k, 1], centre)


def test_multichannel_nifti_round_trips_through_monai_channel_first(tmp_path):
    z = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    affine = np.diag([4.0, 4.0, 5.0, 1.0])
    path = save_nifti(z, affine, tmp_path / "latent.nii.gz")
    assert nib.load(str(path)).shape == (4, 5, 6, 3)
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    np.testing.assert_array_equal(np.asarray(loaded), z)
    np.testing.assert_allclose(loaded.affine.numpy(), affine)
