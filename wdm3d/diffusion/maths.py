"""Closed forms of the diffusion processes, as small pure functions.

Two forward processes are supported:

- ``"ddpm"`` (variance preserving, Ho et al. 2020): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` with
  ``ab_t = prod_{i<=t} (1 - beta_i)`` (eq. 4).
- ``"rflow"`` (rectified flow, Liu et al. 2022, MONAI's convention): ``x_t = (1 - s) x0 + s eps`` with
  ``s = t / T``; the velocity is ``v = x0 - eps`` (pointing from noise to data).

A network predicts one of (names as MONAI's schedulers): ``"sample"`` (x0; WDM's choice), ``"epsilon"`` or
``"v_prediction"`` (for ddpm: ``v = sqrt(ab) eps - sqrt(1 - ab) x0``, Salimans & Ho 2022; for rflow: the flow
velocity ``x0 - eps``). Samplers work on the predicted x0, whatever the network predicts.

Every ``a``/``ab``/``s`` argument is a tensor broadcastable to the data (use :func:`expand_to`).
"""

from __future__ import annotations

import torch

__all__ = [
    "PREDICTION_TYPES",
    "PROCESSES",
    "expand_to",
    "ddpm_q_sample",
    "ddpm_target",
    "ddpm_x0_from_output",
    "ddpm_eps_from_x0",
    "ddpm_posterior",
    "ddpm_step",
    "ddim_step",
    "rflow_q_sample",
    "rflow_target",
    "rflow_x0_from_output",
    "rflow_step",
    "LOSS_WEIGHTINGS",
    "ddpm_snr",
    "rflow_snr",
    "target_error_ratio",
    "min_snr_weight",
    "velocity_loss_weight",
]

PREDICTION_TYPES: tuple[str, ...] = ("sample", "epsilon", "v_prediction")
PROCESSES: tuple[str, ...] = ("ddpm", "rflow")
#: Per-sample loss weightings: ``"none"`` (WDM), ``"min_snr"`` (Hang et al. 2023), ``"velocity"`` (JiT).
LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "velocity")


def expand_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values ``(B,)`` (or a scalar) -> ``(B, 1, 1, ...)`` in the dtype/device of ``like``."""
    values = torch.as_tensor(values, device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _check_prediction(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")


# --- DDPM (variance preserving) ---------------------------------------------------------------------------------


def ddpm_q_sample(x0: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """``q(x_t | x0)`` reparameterised: ``sqrt(ab) x0 + sqrt(1 - ab) noise`` (DDPM eq. 4)."""
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def ddpm_target(x0: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network is trained to output at noise level ``ab``."""
    _check_prediction(prediction_type)
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return noise
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def ddpm_x0_from_output(
    output: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The x0 implied by a network output (inverse of :func:`ddpm_target` given ``x_t``)."""
    _check_prediction(prediction_type)
    if prediction_type == "sample":
        return output
    if prediction_type == "epsilon":
        return (x_t - (1 - ab).sqrt() * output) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * output


def ddpm_eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """The noise implied by ``x0`` and ``x_t``: ``(x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def ddpm_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q(x_s | x_t, x0)`` for ``s < t`` (DDPM eq. 6-7, with the step's own ``beta = 1 - ab_t / ab_s``, which
    also covers respaced chains, Nichol & Dhariwal 2021).

    Returns:
        (mean, small variance ``(1 - ab_s) / (1 - ab_t) * beta``, large variance ``beta``).
    """
    alpha = ab_t / ab_s
    beta = 1 - alpha
    mean = (ab_s.sqrt() * beta / (1 - ab_t)) * x0 + (alpha.sqrt() * (1 - ab_s) / (1 - ab_t)) * x_t
    return mean, (1 - ab_s) / (1 - ab_t) * beta, beta


def ddpm_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    ab_t: torch.Tensor,
    ab_s: torch.Tensor,
    noise: torch.Tensor | None,
    variance: str = "fixed_large",
) -> torch.Tensor:
    """One ancestral step ``x_t -> x_s`` (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 2)
    given the predicted ``x0``.

    Args:
        variance: ``"fixed_small"`` (posterior variance) or ``"fixed_large"`` (``beta``, WDM's choice).
        noise: standard normal noise like ``x_t``; None for the last step (no noise is added).
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}.")
    mean, small, large = ddpm_posterior(x0, x_t, ab_t, ab_s)
    if noise is None:
        return mean
    return mean + (small if variance == "fixed_small" else large).sqrt() * noise


def ddim_step(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    ab_t: torch.Tensor,
    ab_s: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step ``x_t -> x_s`` (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16) given
    the predicted ``x0``.

    ``eta = 0`` is deterministic; ``eta = 1`` equals the ancestral step with the posterior ("fixed_small") variance.
    """
    eps = ddpm_eps_from_x0(x0, x_t, ab_t)
    sigma2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    x_s = ab_s.sqrt() * x0 + (1 - ab_s - sigma2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        x_s = x_s + sigma2.sqrt() * noise
    return x_s


# --- rectified flow -----------------------------------------------------------------------------------------------


def rflow_q_sample(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s noise`` with ``s = t / T`` in [0, 1]."""
    return (1 - s) * x0 + s * noise


def rflow_target(x0: torch.Tensor, noise: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Training target for rectified flow: the velocity ``x0 - noise`` ("v_prediction") or ``x0`` ("sample")."""
    if prediction_type == "v_prediction":
        return x0 - noise
    if prediction_type == "sample":
        return x0
    raise ValueError(f"rectified flow supports prediction_type 'v_prediction' or 'sample', got {prediction_type!r}.")


def rflow_x0_from_output(
    output: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The x0 implied by a network output: ``x_s + s v`` for velocity, the output itself for "sample"."""
    if prediction_type == "v_prediction":
        return x_s + s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"rectified flow supports prediction_type 'v_prediction' or 'sample', got {prediction_type!r}.")


def rflow_step(x_s: torch.Tensor, x0: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the rectified flow (Liu et al. 2022, "Flow Straight and Fast: Learning to Generate and
    Transfer Data with Rectified Flow") from ``s`` to ``s_next < s`` given the predicted ``x0``.

    The velocity implied by ``x0`` is ``(x0 - x_s) / s``; the step lands on ``x0`` exactly when ``s_next = 0``.
    """
    return x_s + (x0 - x_s) * ((s - s_next) / s)


def rflow_time_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift (Esser et al. 2024, eq. 23): ``shift s / (1 + (shift - 1) s)``.

    A monotone map of [0, 1] onto itself that keeps 0 and 1; ``shift > 1`` moves times towards noise (``s = 1``).
    SD3 motivates it by resolution: a larger volume keeps more signal at the same noise level (averaging over more
    voxels), so its coarse structure is decided closer to ``s = 1``; it uses ``shift = sqrt(m / n)`` for ``m`` over
    ``n`` pixels, and 3.0 at 1024^2. The map has the same shape as a change of SNR by ``shift^2``:
    ``SNR(shifted s) = SNR(s) / shift^2``.
    """
    return shift * s / (1 + (shift - 1) * s)


# --- loss weighting -------------------------------------------------------------------------------------------------
#
# Every weighting below is stated as a weight on the squared error of the network's own target, per sample. The
# common currency is the x0 error: for a fixed x_t, each target's error is a multiple of the x0 error,
# ``|target_hat - target|^2 = r(t) |x0_hat - x0|^2`` (:func:`target_error_ratio`), so a weighting defined on the x0
# error (min-SNR-gamma's ``min(SNR, gamma)``) becomes ``min(SNR, gamma) / r(t)`` on the target.


def ddpm_snr(ab: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of the variance-preserving process: ``SNR = ab / (1 - ab)`` (Kingma et al. 2021)."""
    return ab / (1 - ab)


def rflow_snr(s: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of ``x_s = (1 - s) x0 + s eps``: ``((1 - s) / s)^2`` (infinite at ``s = 0``)."""
    return ((1 - s) / s) ** 2


def target_error_ratio(process: str, prediction_type: str, ab_or_s: torch.Tensor) -> torch.Tensor:
    """``r(t) = |target_hat - target|^2 / |x0_hat - x0|^2`` at a fixed ``x_t``.

    ddpm (``ab``): sample 1, epsilon ``SNR``, v_prediction ``SNR + 1`` (since ``v = (sqrt(ab) x_t - x0) /
    sqrt(1 - ab)``). rflow (``s``): sample 1, v_prediction ``1 / s^2`` (since ``x0 = x_s + s v``).
    """
    if prediction_type == "sample":
        return torch.ones_like(ab_or_s)
    if process == "ddpm":
        snr = ddpm_snr(ab_or_s)
        if prediction_type == "epsilon":
            return snr
        if prediction_type == "v_prediction":
            return snr + 1
    elif process == "rflow" and prediction_type == "v_prediction":
        return 1 / ab_or_s**2
    raise ValueError(f"no error ratio for process {process!r} with prediction_type {prediction_type!r}.")


def min_snr_weight(snr: torch.Tensor, ratio: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight on the target's squared error (Hang et al. 2023, arXiv 2303.09556, eq. 11).

    The x0 error is weighted by ``min(SNR, gamma)``; on the target that is ``min(SNR, gamma) / ratio`` with
    ``ratio`` from :func:`target_error_ratio`: ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) /
    (SNR + 1)`` for v, ``min(SNR, gamma)`` for x0 prediction. An infinite SNR (rflow at ``s = 0``) gives ``gamma``.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}.")
    return snr.clamp(max=gamma) / ratio


def velocity_loss_weight(s: torch.Tensor, s_min: float = 0.05) -> torch.Tensor:
    """Weight that turns an x0 squared error into the velocity's: ``1 / max(s, s_min)^2``.

    JiT (Li & He 2025, arXiv 2511.13720): the network predicts x0 but the loss is taken on the velocity it
    implies, ``v_hat = (x0_hat - x_s) / s`` against ``v = x0 - eps``, so ``|v_hat - v|^2 = |x0_hat - x0|^2 / s^2``.
    ``s`` is floored at ``s_min`` (the weight would be unbounded near clean data).
    """
    if not 0 < s_min <= 1:
        raise ValueError(f"s_min must be in (0, 1], got {s_min}.")
    return 1 / s.clamp(min=s_min) ** 2
