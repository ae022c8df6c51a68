"""Wavelet-domain diffusion (WDM): training pieces and samplers around MONAI's schedulers.

Images ``(B, C, D, H, W)`` are mapped to the wavelet space ``(B, 8C, D/2, H/2, W/2)`` (Haar DWT, LLL divided by
``lll_scale``); noise is added there; a network (e.g. :class:`wdm3d.networks.WDMUNet`) predicts x0, epsilon or v;
the loss is an MSE in the wavelet space (optionally weighted per subband). Samplers start from N(0, I) in the
wavelet space, step with the predicted x0 (optionally projected to the valid image range by WDM's
IDWT -> clamp -> DWT), and return image-space volumes.

MONAI supplies the noise schedules (``DDPMScheduler`` for ``process="ddpm"``, ``RFlowScheduler`` for
``process="rflow"``, with its training time distribution). The noising (:meth:`WaveletDiffusion.add_noise`) is
computed in float64, because MONAI's ``add_noise`` computes in the input dtype and ``1 - ab_t`` at small t keeps
few float32 digits. The sampling updates are the pure functions in :mod:`wdm3d.diffusion.maths` because MONAI's
DDPM step only supports the full T-step chain and its DDIM step assumes an integer stride that its own rounded
timestep grid does not follow; the flow-map jumps are :mod:`wdm3d.diffusion.flow_map`'s.

One module because it is one process object: noising, targets, loss weights, training times and the sampling loop
share its schedule state; the mathematics each of them uses lives in those two modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.networks.schedulers import DDPMScheduler
from tqdm.auto import tqdm

from ..wavelets import WaveletSpace
from . import flow_map as flow_maps
from . import maths

__all__ = ["FLOW_MAPS", "SAMPLERS", "WaveletDiffusion"]

#: Samplers by process.
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddpm", "ddim"), "rflow": ("rflow", "meanflow", "shortcut")}
#: Flow-map objectives that train a rectified flow's average velocity (:mod:`wdm3d.diffusion.flow_map`).
FLOW_MAPS: tuple[str, ...] = ("meanflow", "shortcut")


class WaveletDiffusion:
    """Diffusion in the 3D wavelet domain.

    Args:
        process: ``"ddpm"`` (WDM) or ``"rflow"`` (rectified flow, for few-step sampling).
        num_train_timesteps: T (WDM: 1000).
        schedule: MONAI beta schedule name for ddpm (``"linear_beta"`` as WDM, ``"scaled_linear_beta"``,
            ``"sigmoid_beta"``, ``"cosine"``).
        beta_start: first beta (WDM: 1e-4).
        beta_end: last beta (WDM: 0.02).
        prediction_type: what the network predicts: ``"sample"`` (x0, WDM), ``"epsilon"`` or ``"v_prediction"``
            (ddpm); ``"v_prediction"`` (flow velocity) or ``"sample"`` (rflow).
        lll_scale: WDM's LLL divisor (3.0; 1.0 turns it off). See :mod:`wdm3d.wavelets`.
        wavelet: ``"haar"`` (WDM) or a PyWavelets name.
        clip_range: valid image intensity range, used by the clip projection (WDM: (-1, 1)).
        ddpm_variance: ``"fixed_large"`` (beta_t, WDM) or ``"fixed_small"`` (posterior variance).
        rflow_sample_method: training time distribution for rflow: ``"uniform"`` or ``"logit-normal"`` (SD3:
            ``s = sigmoid(n)``, ``n ~ N(0, 1)``).
        levels: wavelet levels: 1 (WDM: 8 subbands at half resolution) or 2 (a two-level Haar packet: 64 channels
            at a quarter of the resolution); see :class:`wdm3d.wavelets.WaveletSpace`.
        loss_weighting: per-sample weight on the target's squared error: ``"none"`` (WDM), ``"min_snr"``
            (min-SNR-gamma, Hang et al. 2023; any process and prediction type) or ``"velocity"`` (JiT: rflow with
            ``prediction_type="sample"``, the loss taken on the implied velocity). See :meth:`loss_weight`.
        min_snr_gamma: gamma of ``"min_snr"`` (5 in the paper).
        flow_map: ``"meanflow"`` trains the rectified flow's average velocity over an interval (MeanFlow, Geng et
            al. 2025; :mod:`wdm3d.diffusion.flow_map`), for 1-4 step sampling with ``sampler="meanflow"``;
            ``"shortcut"`` learns the same map from its composition rule (shortcut models, Frans et al. 2024; jumps
            of powers of two, two extra forward passes instead of a Jacobian-vector product), sampled with
            ``sampler="shortcut"``. The network takes the interval (``interval_embedding=True``). With
            ``prediction_type="sample"`` the network predicts a clean estimate (:meth:`flow_map_velocity`). None
            (default): an ordinary process.
        flow_map_equal_fraction: share of training pairs with ``r = t`` (MeanFlow: 0.75; shortcut models: 0.75,
            the other quarter self-consistency pairs).
        flow_map_time: how the flow map's training times are drawn: ``"logit_normal"`` (``sigmoid(N(m, 1))``
            with ``m = flow_map_time_mean``) or ``"uniform"``.
        flow_map_time_mean: ``m``, the logit-normal law's mean: MeanFlow's -0.4 (default), or 0, the law of the
            multi-step recipe (``rflow_sample_method="logit-normal"``). At the demo's 64^3 scale the time law decides
            whether 450 steps learn the brain's layout (BENCHMARKS.md, the demo-scale diagnostics).
        time_shift: rflow only: SD3's resolution shift of the times (:func:`maths.rflow_time_shift`), applied to
            the training times (after ``rflow_sample_method``) and to the sampling grid. 1.0 (default): none;
            above 1, more training and more sampling steps near noise, where a larger volume's coarse structure is
            decided. Not with ``flow_map``.

    Example:
        >>> diffusion = WaveletDiffusion()  # WDM: T=1000, linear betas, x0 prediction, LLL / 3
        >>> y0 = diffusion.encode(torch.rand(2, 1, 16, 16, 16) * 2 - 1)
        >>> y0.shape
        torch.Size([2, 8, 8, 8, 8])
    """

    def __init__(
        self,
        process: str = "ddpm",
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "sample",
        lll_scale: float = 3.0,
        wavelet: str = "haar",
        clip_range: Sequence[float] | None = (-1.0, 1.0),
        ddpm_variance: str = "fixed_large",
        rflow_sample_method: str = "uniform",
        levels: int = 1,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        flow_map: str | None = None,
        flow_map_equal_fraction: float = 0.75,
        flow_map_time: str = "logit_normal",
        flow_map_time_mean: float = flow_maps.MEANFLOW_TIME_MEAN,
        time_shift: float = 1.0,
    ) -> None:
        if process not in maths.PROCESSES:
            raise ValueError(f"process must be one of {maths.PROCESSES}, got {process!r}.")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
        allowed = maths.PREDICTION_TYPES if process == "ddpm" else ("v_prediction", "sample")
        if prediction_type not in allowed:
            raise ValueError(
                f"prediction_type for process {process!r} must be one of {allowed}, got {prediction_type!r}."
            )
        if ddpm_variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"ddpm_variance must be 'fixed_small' or 'fixed_large', got {ddpm_variance!r}.")
        if clip_range is not None:
            lo, hi = (float(v) for v in clip_range)
            if not lo < hi:
                raise ValueError(f"clip_range must be (low, high) with low < high, got {clip_range!r}.")
            clip_range = (lo, hi)
        if loss_weighting not in maths.LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {maths.LOSS_WEIGHTINGS}, got {loss_weighting!r}.")
        if loss_weighting == "velocity" and (process, prediction_type) != ("rflow", "sample"):
            raise ValueError(
                "loss_weighting 'velocity' (JiT: x prediction, velocity loss) needs process 'rflow' with "
                f"prediction_type 'sample', got {process!r} / {prediction_type!r}."
            )
        if not (isinstance(min_snr_gamma, (int, float)) and min_snr_gamma > 0):
            raise ValueError(f"min_snr_gamma must be a positive number, got {min_snr_gamma!r}.")
        if flow_map is not None:
            if flow_map not in FLOW_MAPS:
                raise ValueError(f"flow_map must be one of {FLOW_MAPS} or None, got {flow_map!r}.")
            if process != "rflow" or loss_weighting != "none":
                raise ValueError(
                    f"flow_map {flow_map!r} learns a rectified flow's average velocity: it needs process 'rflow' "
                    f"and loss_weighting 'none' (prediction_type 'v_prediction' or 'sample'), got {process!r} / "
                    f"{prediction_type!r} / {loss_weighting!r}."
                )
            if not 0.0 <= flow_map_equal_fraction <= 1.0:
                raise ValueError(f"flow_map_equal_fraction must be in [0, 1], got {flow_map_equal_fraction}.")
            if not math.isfinite(float(flow_map_time_mean)):
                raise ValueError(f"flow_map_time_mean must be a finite number, got {flow_map_time_mean!r}.")
            if flow_map_time not in flow_maps.TIME_DISTRIBUTIONS:
                raise ValueError(f"flow_map_time must be one of {flow_maps.TIME_DISTRIBUTIONS}, got {flow_map_time!r}.")
        if not (isinstance(time_shift, (int, float)) and math.isfinite(time_shift) and time_shift > 0):
            raise ValueError(f"time_shift must be a positive number, got {time_shift!r}.")
        if time_shift != 1.0 and (process != "rflow" or flow_map is not None):
            raise ValueError(
                f"time_shift shifts a rectified flow's times: it needs process 'rflow' without a flow_map, got "
                f"process {process!r} / flow_map {flow_map!r} with time_shift {time_shift}."
            )
        self.time_shift = float(time_shift)
        self.flow_map = flow_map
        self.flow_map_equal_fraction = float(flow_map_equal_fraction)
        self.flow_map_time = flow_map_time
        self.flow_map_time_mean = float(flow_map_time_mean)
        self.process = process
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.clip_range = clip_range
        self.ddpm_variance = ddpm_variance
        self.schedule = {"schedule": schedule, "beta_start": float(beta_start), "beta_end": float(beta_end)}
        if schedule == "cosine":
            self.schedule = {"schedule": schedule}  # the betas do not apply
        self.rflow_sample_method = rflow_sample_method
        self.space = WaveletSpace(lll_scale=lll_scale, wavelet=wavelet, levels=levels)
        if process == "ddpm":
            schedule_args = {} if schedule == "cosine" else {"beta_start": beta_start, "beta_end": beta_end}
            self.scheduler = DDPMScheduler(
                num_train_timesteps=num_train_timesteps,
                schedule=schedule,
                variance_type=ddpm_variance,
                clip_sample=False,
                prediction_type=prediction_type,
                **schedule_args,
            )
            # float64: MONAI's float32 cumprod loses ~3 digits of beta = 1 - ab_t / ab_s at small t
            self.alphas_cumprod = torch.cumprod(1 - self.scheduler.betas.double(), 0)
        else:
            try:  # here, not at the top: RFlowScheduler needs MONAI >= 1.5 and the ddpm process runs on 1.4
                from monai.networks.schedulers import RFlowScheduler
            except ImportError as err:  # pragma: no cover - old MONAI
                raise ImportError("process='rflow' needs MONAI >= 1.5 (RFlowScheduler); upgrade monai.") from err
            self.scheduler = RFlowScheduler(
                num_train_timesteps=num_train_timesteps,
                use_discrete_timesteps=False,
                sample_method=rflow_sample_method,
            )
            self.alphas_cumprod = None

    # -- wavelet space ---------------------------------------------------------------------------------------------

    @property
    def lll_scale(self) -> float:
        return self.space.lll_scale

    @property
    def levels(self) -> int:
        return self.space.levels

    @property
    def channel_factor(self) -> int:
        """Wavelet channels per image channel (8 for one level, 64 for two)."""
        return self.space.channel_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, D, H, W)`` -> wavelet space ``(B, 8C, D/2, H/2, W/2)`` (``8**L C`` at ``1/2**L``)."""
        return self.space.encode(images)

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Wavelet space ``(B, 8C, d, h, w)`` -> images ``(B, C, 2d, 2h, 2w)``."""
        return self.space.decode(coeffs)

    def project(self, x0: torch.Tensor) -> torch.Tensor:
        """WDM's clip projection of a predicted x0: IDWT -> clamp to ``clip_range`` -> DWT."""
        if self.clip_range is None:
            raise ValueError("clip projection needs clip_range; this WaveletDiffusion was built with clip_range=None.")
        return self.encode(self.decode(x0).clamp(*self.clip_range))

    # -- training --------------------------------------------------------------------------------------------------

    def sample_timesteps(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Training timesteps: uniform integers in [0, T) for ddpm, MONAI's RFlow distribution for rflow (shifted by
        ``time_shift``)."""
        if self.process == "ddpm":
            return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device)
        t = self.scheduler.sample_timesteps(torch.empty(batch_size, 1, device=device))
        if self.time_shift != 1.0:
            T = self.num_train_timesteps
            t = maths.rflow_time_shift(t / T, self.time_shift) * T
        return t

    def sample_flow_map_times(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training times ``(r, t)`` of a flow map, each ``(B,)`` in timestep units (``[0, T]``), ``r <= t``.

        Drawn by :func:`wdm3d.diffusion.flow_map.sample_time_pairs` with this process's ``flow_map_time`` and
        ``flow_map_equal_fraction``.
        """
        if self.flow_map is None:
            raise ValueError("this process has no flow_map; build it with flow_map='meanflow' or 'shortcut'.")
        if self.flow_map == "shortcut":
            r, t = flow_maps.shortcut_time_pairs(
                batch_size,
                self.flow_map_equal_fraction,
                self.flow_map_time,
                device=device,
                mean=self.flow_map_time_mean,
            )
        else:
            r, t = flow_maps.sample_time_pairs(
                batch_size, self.flow_map_equal_fraction, self.flow_map_time, self.flow_map_time_mean, device=device
            )
        return r * self.num_train_timesteps, t * self.num_train_timesteps

    def flow_map_velocity(
        self,
        model: Callable[..., torch.Tensor],
        z: torch.Tensor,
        r: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The flow map's average velocity ``u(z, r, t)`` from ``model`` (times ``(B,)`` in [0, 1], ``r <= t``).

        The model is called as ``model(x, t T, context=context, interval=(t - r) T)`` with ``x = cat(z, concat)``;
        with ``prediction_type="sample"`` its output is a clean estimate, turned into a velocity by
        :func:`~wdm3d.diffusion.flow_map.average_velocity_from_sample`. Training (through :func:`torch.func.jvp`)
        and sampling both go through here.
        """
        T = self.num_train_timesteps
        x = z if concat is None else torch.cat((z, concat.to(z.dtype)), dim=1)
        out = model(x, t * T, context=context, interval=(t - r) * T).to(z.dtype)
        if self.prediction_type == "sample":
            return flow_maps.average_velocity_from_sample(out, z, t)
        return out

    def velocity(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The rectified flow's instantaneous velocity (``x0 - noise``, toward the data) implied by a network
        ``output`` at ``x_t`` and ``timesteps`` (``[0, T]``): the output itself for ``"v_prediction"``, else
        ``(x_hat - x_t) / max(s, 0.05)`` (:func:`~wdm3d.diffusion.flow_map.average_velocity_from_sample`). What a
        multi-step teacher hands a flow map in distillation (:class:`~wdm3d.diffusion.WaveletDiffusionInferer`).

        Below ``s = 0.05`` an x-prediction teacher's velocity is damped by ``s / 0.05`` (as an x-prediction flow map
        damps its own, so the two agree; a velocity-predicting student learns the damped field there), and the clip
        projection the teacher's sampler may apply is not part of it. For a flow map, ``output`` must come from the
        network at interval 0 (``r = t``, the default when no interval is passed): then this is
        :meth:`flow_map_velocity` at ``r = t``, its instantaneous velocity.
        """
        if self.process != "rflow":
            raise ValueError(f"velocity() reads a rectified flow's output; this process is {self.process!r}.")
        if self.prediction_type == "v_prediction":
            return output
        return flow_maps.average_velocity_from_sample(output, x_t, timesteps / self.num_train_timesteps)

    def _ab(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return maths.expand_to(ab, like)

    def _s(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return maths.expand_to(timesteps.double() / self.num_train_timesteps, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noised coefficients ``x_t`` at ``timesteps``, computed in float64 and returned in ``x0``'s dtype.

        ddpm: ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` (DDPM eq. 4); rflow: ``(1 - s) x0 + s noise``, ``s = t / T``.
        Training (:class:`~wdm3d.diffusion.WaveletDiffusionInferer`), validation and inference all noise here.
        ``self.scheduler.add_noise`` (MONAI) gives the same up to float32 rounding: it computes in the input dtype.

        Args:
            x0: clean coefficients ``(B, C, ...)``.
            noise: standard normal noise of the same shape.
            timesteps: ``(B,)`` integer timesteps in ``[0, T)`` (ddpm) or times in ``[0, T]`` (rflow).
        """
        x0_64, noise_64 = x0.double(), noise.to(device=x0.device, dtype=torch.float64)
        if self.process == "ddpm":
            x_t = maths.ddpm_q_sample(x0_64, noise_64, self._ab(timesteps, x0_64))
        else:
            x_t = maths.rflow_q_sample(x0_64, noise_64, self._s(timesteps, x0_64))
        return x_t.to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's training target for clean coefficients ``x0``, ``noise`` and ``timesteps``, computed in
        float64 like :meth:`add_noise` and returned in ``x0``'s dtype."""
        x0_64, noise_64 = x0.double(), noise.to(device=x0.device, dtype=torch.float64)
        if self.process == "ddpm":
            target = maths.ddpm_target(x0_64, noise_64, self._ab(timesteps, x0_64), self.prediction_type)
        else:
            target = maths.rflow_target(x0_64, noise_64, self.prediction_type)
        return target.to(x0.dtype)

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample weights ``(B,)`` (float32) on the squared error of the training target at ``timesteps``.

        ``"none"``: 1. ``"min_snr"``: :func:`~wdm3d.diffusion.maths.min_snr_weight` of the process's SNR
        (``ab / (1 - ab)`` for ddpm, ``((1 - s) / s)^2`` for rflow) for this prediction type. ``"velocity"``:
        :func:`~wdm3d.diffusion.maths.velocity_loss_weight` ``1 / max(s, 0.05)^2``.
        """
        if self.process == "ddpm":
            level = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
            snr = maths.ddpm_snr(level)
        else:
            level = timesteps.double() / self.num_train_timesteps
            snr = maths.rflow_snr(level)
        if self.loss_weighting == "none":
            weight = torch.ones_like(level)
        elif self.loss_weighting == "min_snr":
            ratio = maths.target_error_ratio(self.process, self.prediction_type, level)
            weight = maths.min_snr_weight(snr, ratio, self.min_snr_gamma)
        else:
            weight = maths.velocity_loss_weight(level)
        return weight.float()

    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The x0 implied by a network ``output`` at ``x_t`` and ``timesteps``."""
        if self.process == "ddpm":
            return maths.ddpm_x0_from_output(output, x_t, self._ab(timesteps, x_t), self.prediction_type)
        return maths.rflow_x0_from_output(output, x_t, self._s(timesteps, x_t), self.prediction_type)

    # -- sampling --------------------------------------------------------------------------------------------------

    def sampling_timesteps(self, sampler: str, num_steps: int | None = None) -> list[float]:
        """The decreasing timesteps a sampler visits, with a final 0 (ddpm/ddim: -1 marks "clean")."""
        if sampler not in SAMPLERS[self.process]:
            raise ValueError(
                f"sampler {sampler!r} does not fit a model trained with process {self.process!r}; "
                f"use one of {SAMPLERS[self.process]}."
            )
        T = self.num_train_timesteps
        if sampler in FLOW_MAPS:
            if self.flow_map != sampler:
                raise ValueError(
                    f"sampler {sampler!r} needs a network trained as a flow map with flow_map={sampler!r}; this "
                    f"process has flow_map={self.flow_map!r}: sample it with "
                    f"{repr(self.flow_map) + ' or ' if self.flow_map else ''}'rflow'."
                )
            steps = 1 if num_steps is None else int(num_steps)
            if steps < 1:
                raise ValueError(f"num_steps must be at least 1 for {sampler}, got {num_steps}.")
            return [T * (1 - k / steps) for k in range(steps + 1)]
        if sampler == "rflow":
            steps = 30 if num_steps is None else int(num_steps)
            if not 1 <= steps <= T:
                raise ValueError(f"num_steps must be in [1, {T}] for rflow, got {num_steps}.")
            if self.time_shift != 1.0:  # computed here in float64 (MONAI's grid is stored as float16)
                grid = maths.rflow_time_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64), self.time_shift)
                return [float(t) for t in grid[:-1] * T] + [0.0]
            self.scheduler.set_timesteps(steps)
            return [float(t) for t in self.scheduler.timesteps] + [0.0]
        steps = (T if sampler == "ddpm" else 50) if num_steps is None else int(num_steps)
        if not 1 <= steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}] for {sampler}, got {num_steps}.")
        grid = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()
        return [int(t) for t in grid] + [-1]

    def default_sampler(self, fast: bool = False) -> str:
        """The sampler the bundles use when none is named: a flow map's own jumps, rectified flow's Euler steps, or
        DDPM's ancestral sampler (DDIM with ``fast=True``, as for validation previews)."""
        if self.process == "ddpm":
            return "ddim" if fast else "ddpm"
        return self.flow_map or "rflow"

    def default_num_steps(self, sampler: str) -> int:
        """The bundles' steps for ``sampler``: 4 flow-map jumps (the benchmark's choice, BENCHMARKS.md), 50 Euler or
        DDIM steps, all ``num_train_timesteps`` for DDPM."""
        if sampler not in SAMPLERS[self.process]:
            raise ValueError(
                f"sampler {sampler!r} does not fit process {self.process!r}; use one of {SAMPLERS[self.process]}."
            )
        if sampler == "ddpm":
            return self.num_train_timesteps
        return 4 if sampler in FLOW_MAPS else 50

    def network_evaluations(self, sampler: str, num_steps: int | None = None) -> int:
        """Network calls per sample of ``sampler`` with ``num_steps`` (one per step, for every sampler here)."""
        return len(self.sampling_timesteps(sampler, num_steps)) - 1

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        image_shape: Sequence[int],
        num_samples: int = 1,
        sampler: str | None = None,
        num_steps: int | None = None,
        eta: float = 0.0,
        clip_projection: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        return_coeffs: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """Generate image-space volumes.

        Args:
            model: called as ``model(x, timesteps, context=context)`` on wavelet coefficients.
            image_shape: ``(C, D, H, W)`` of one generated image (the network sees ``(8C, D/2, H/2, W/2)``).
            num_samples: batch size B.
            sampler: ``"ddpm"`` (ancestral, Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; WDM uses
                all T steps), ``"ddim"`` (Song et al. 2021, "Denoising Diffusion Implicit Models"; ``eta`` 0 =
                deterministic), ``"rflow"`` (Euler steps of rectified flow, Liu et al. 2022, "Flow Straight and
                Fast") or ``"meanflow"`` (flow-map jumps, Geng et al. 2025, "Mean Flows for One-step Generative
                Modeling"; a network trained with ``flow_map="meanflow"``, which also samples with rflow) or
                ``"shortcut"`` (the same jumps, Frans et al. 2024, "One Step Diffusion via Shortcut Models"; a
                network trained with ``flow_map="shortcut"``); defaults
                to ddpm for the ddpm process and rflow for rflow.
            num_steps: steps, one network evaluation each (ddpm: T, ddim: 50, rflow: 30, meanflow / shortcut: 1 by
                default).
                ddpm with fewer steps uses the respaced chain (betas recomputed for the visited timesteps).
            eta: DDIM noise scale.
            clip_projection: apply WDM's IDWT -> clamp -> DWT to every predicted x0 (needs ``clip_range``).
            seed: seeds a generator on the sampling device (ignored if ``generator`` is given).
            generator: a ``torch.Generator`` on ``device`` for the initial noise and ancestral noise.
            context: passed to the model as ``context`` (cross-attention conditioning), ``(B, N, dim)``.
            concat: image-space conditioning ``(B, Cc, D, H, W)``; its wavelet coefficients are concatenated to the
                model input on the channel axis (cWDM style).
            device: where to sample; defaults to the model's parameters' device.
            progress: show a progress bar.
            return_coeffs: return the final wavelet coefficients instead of images.
            model_kwargs: more keyword arguments of every model call, e.g. an IP-Adapter's image prompt
                ``{"image_tokens": tokens, "image_scale": 0.5}`` through
                :class:`~wdm3d.diffusion.ClassifierFreeGuidance` (not with ``"meanflow"``).

        Returns:
            ``(B, C, D, H, W)`` images (or ``(B, 8C, D/2, H/2, W/2)`` coefficients).
        """
        sampler = sampler or ("ddpm" if self.process == "ddpm" else "rflow")
        timesteps = self.sampling_timesteps(sampler, num_steps)
        if len(image_shape) != 4:
            raise ValueError(f"image_shape must be (C, D, H, W), got {tuple(image_shape)}.")
        c, d, h, w = (int(v) for v in image_shape)
        f = 2**self.levels
        if any(v % f for v in (d, h, w)):
            raise ValueError(
                f"image_shape {tuple(image_shape)} must have spatial sizes divisible by {f} for a {self.levels}-level "
                "wavelet transform (even sizes for one level, multiples of 4 for two)."
            )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        if device is None:
            param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        cond = None
        if concat is not None:
            if concat.shape[0] != num_samples or tuple(concat.shape[2:]) != (d, h, w):
                raise ValueError(
                    f"concat must have shape ({num_samples}, Cc, {d}, {h}, {w}), got {tuple(concat.shape)}."
                )
            cond = self.encode(concat.to(device))

        shape = (num_samples, self.channel_factor * c, d // f, h // f, w // f)
        x = torch.randn(shape, generator=generator, device=device)
        steps = list(zip(timesteps[:-1], timesteps[1:]))
        extra = dict(model_kwargs or {})
        if sampler in FLOW_MAPS:
            if extra:
                raise ValueError(f"flow-map sampling takes no model_kwargs, got {sorted(extra)}.")

            def u_fn(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.flow_map_velocity(model, z, r, t, context, cond)

            jumps = flow_maps.meanflow_sample if sampler == "meanflow" else flow_maps.shortcut_sample
            x = jumps(u_fn, x, len(steps))
            x = self.project(x) if clip_projection else x
            return x if return_coeffs else self.decode(x)
        for t, t_next in tqdm(steps, desc=f"{sampler} sampling", disable=not progress, leave=False):
            t_batch = torch.full(
                (num_samples,), t, device=device, dtype=torch.float32 if sampler == "rflow" else torch.long
            )
            model_in = x if cond is None else torch.cat((x, cond.to(x.dtype)), dim=1)
            output = model(model_in, t_batch, context=context, **extra).to(x.dtype)
            x0 = self.predict_x0(output, x, t_batch)
            if clip_projection:
                x0 = self.project(x0)
            x = self._step(sampler, x, x0, t, t_next, eta, generator)
        return x if return_coeffs else self.decode(x)

    def _step(self, sampler, x, x0, t, t_next, eta, generator) -> torch.Tensor:
        if sampler == "rflow":
            T = self.num_train_timesteps
            return maths.rflow_step(
                x, x0, torch.tensor(t / T, dtype=torch.float64), torch.tensor(t_next / T, dtype=torch.float64)
            )
        # coefficients stay float64 0-dim tensors: they are computed in float64 and do not promote x's dtype
        ab = self.alphas_cumprod.to(x.device)
        ab_t = ab[t]
        ab_s = ab[t_next] if t_next >= 0 else torch.ones((), dtype=torch.float64, device=x.device)
        noisy = t_next >= 0 and (sampler == "ddpm" or eta > 0)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if noisy else None
        if sampler == "ddpm":
            return maths.ddpm_step(x, x0, ab_t, ab_s, noise, self.ddpm_variance)
        return maths.ddim_step(x, x0, ab_t, ab_s, eta, noise)

    def config(self) -> dict:
        """The settings that define this process (for checkpoints and MLflow)."""
        out = {
            "process": self.process,
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "lll_scale": self.lll_scale,
            "wavelet": self.space.dwt.wavelet,
            "clip_range": list(self.clip_range) if self.clip_range else None,
            "levels": self.levels,
            "loss_weighting": self.loss_weighting,
        }
        if self.loss_weighting == "min_snr":
            out["min_snr_gamma"] = self.min_snr_gamma
        if self.process == "ddpm":
            out["ddpm_variance"] = self.ddpm_variance
            out.update(self.schedule)  # the noise schedule (two schedules otherwise looked like one process)
        else:
            out["rflow_sample_method"] = self.rflow_sample_method
            if self.time_shift != 1.0:  # absent at 1.0: earlier checkpoints' records stay equal
                out["time_shift"] = self.time_shift
        if self.flow_map is not None:
            out.update(
                flow_map=self.flow_map,
                flow_map_equal_fraction=self.flow_map_equal_fraction,
                flow_map_time=self.flow_map_time,
            )
            if (
                self.flow_map_time_mean != flow_maps.MEANFLOW_TIME_MEAN
            ):  # absent at the default: earlier records stay equal
                out["flow_map_time_mean"] = self.flow_map_time_mean
        return out
