"""Evaluation metrics for synthetic volumes: 3D FID, MS-SSIM diversity, distribution checks, memorization audit, paired
reconstruction metrics (PSNR, SSIM, MAE)."""

from .distribution import downsample_volumes, intensity_histogram, intensity_wasserstein, mmd_rbf
from .diversity import (
    MS_SSIM_WEIGHTS,
    bootstrap_ci,
    ms_ssim_diversity,
    ms_ssim_min_size,
    ms_ssim_settings,
    pair_bootstrap_ci,
    sample_pairs,
)
from .fid import (
    NORMALIZATION_PRESETS,
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    normalize_volumes,
)
from .memorization import memorization_audit, ncc_matrix, standardize_flat
from .reconstruction import mae, psnr, reconstruction_metrics, ssim3d, summarize_cases

__all__ = [
    "NORMALIZATION_PRESETS",
    "normalize_volumes",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "MS_SSIM_WEIGHTS",
    "ms_ssim_min_size",
    "ms_ssim_settings",
    "sample_pairs",
    "bootstrap_ci",
    "pair_bootstrap_ci",
    "ms_ssim_diversity",
    "intensity_histogram",
    "intensity_wasserstein",
    "mmd_rbf",
    "downsample_volumes",
    "memorization_audit",
    "ncc_matrix",
    "standardize_flat",
    "psnr",
    "ssim3d",
    "mae",
    "reconstruction_metrics",
    "summarize_cases",
]
