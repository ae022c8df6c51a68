"""Flow maps: the average velocity of a rectified flow, learnt with MeanFlow's identity or the shortcut models'
self-consistency, and sampled in 1-4 steps.

Conventions are the project's rectified flow (process ``"rflow"``): ``z_s = (1 - s) x0 + s noise`` with ``s`` in
[0, 1] (noise at ``s = 1``), and the velocity ``v = x0 - noise`` points toward the data (the ``"v_prediction"``
target). A flow map moves a point from time ``t`` to an earlier time ``r <= t`` in one evaluation:

    z_r = z_t + (t - r) u(z_t, r, t),    u(z_t, r, t) = (z_r - z_t) / (t - r)   (the average velocity over [r, t])

and ``u(z, t, t) = v(z, t)``, the instantaneous velocity. MeanFlow (Geng et al. 2025, arXiv 2505.13447, eq. 6, in
this sign) learns ``u`` from the identity that differentiating ``(t - r) u = z_r - z_t`` in ``t`` gives:

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),    d/dt = -v . grad_z + d/dt|_z   along the path

with the conditional velocity ``v = x0 - noise`` standing in for the marginal one (as in flow matching); the total
derivative is one Jacobian-vector product of the network with tangent ``(-v, 0, 1)`` (``torch.func.jvp``).

Shortcut models (Frans et al. 2024, arXiv 2410.12557) learn the same map from its composition rule instead: one jump
of ``2d`` equals two jumps of ``d``,

    u(z_t, t - 2d, t) = (u(z_t, t - d, t) + u(z_{t-d}, t - 2d, t - d)) / 2,    z_{t-d} = z_t + d u(z_t, t - d, t)

with the flow-matching target ``v`` at ``d = 0`` and the right side detached (no Jacobian-vector product: two more
forward passes without a graph).

``u_fn(z, r, t)`` below is any callable of a batch ``z`` ``(B, ...)`` and times ``r``, ``t`` ``(B,)`` in [0, 1]
(a network wrapped to take the two times; see :func:`meanflow_target`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp

from .maths import expand_to

__all__ = [
    "MEANFLOW_TIME_MEAN",
    "TIME_DISTRIBUTIONS",
    "average_velocity_from_sample",
    "flow_map_step",
    "meanflow_loss",
    "meanflow_sample",
    "meanflow_target",
    "sample_time_pairs",
    "shortcut_sample",
    "shortcut_target",
    "shortcut_time_pairs",
]

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


#: how :func:`sample_time_pairs` draws each time
TIME_DISTRIBUTIONS = ("logit_normal", "uniform")
#: MeanFlow's logit-normal mean for the training times (Geng et al. 2025, Table 1), the default of every flow map here
MEANFLOW_TIME_MEAN = -0.4


def sample_time_pairs(
    batch_size: int,
    equal_fraction: float = 0.75,
    distribution: str = "logit_normal",
    mean: float = MEANFLOW_TIME_MEAN,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times ``(r, t)``, each ``(B,)`` in (0, 1) with ``r <= t``.

    Two draws, ordered; a fraction ``equal_fraction`` of the pairs is set to ``r = t``, where the MeanFlow target is
    the flow-matching one. MeanFlow's ImageNet setting: logit-normal (``sigmoid(N(-0.4, 1.0))``) with 25% of the
    pairs ``r != t`` (Geng et al. 2025, Table 1). A one-step map may need more pairs far apart: on the 1D two-mode
    mixture of the tests (3000 steps) ``uniform`` with ``equal_fraction=0.25`` reached KS 0.09-0.12 at one step,
    the logit-normal setting 0.18-0.21.

    Args:
        batch_size: ``B``.
        equal_fraction: share of pairs with ``r = t``, in [0, 1].
        distribution: ``"logit_normal"`` (``mean``, ``std``) or ``"uniform"`` on [0, 1].
        mean, std: of the logit-normal distribution.
        generator: for reproducible draws (on the CPU; the result is moved to ``device``).
        device: where the times go.
    """
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}.")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}.")
    if distribution == "uniform":
        a, b = torch.rand(batch_size, generator=generator), torch.rand(batch_size, generator=generator)
    else:
        a = torch.sigmoid(torch.randn(batch_size, generator=generator) * std + mean)
        b = torch.sigmoid(torch.randn(batch_size, generator=generator) * std + mean)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.rand(batch_size, generator=generator) < equal_fraction
    r = torch.where(equal, t, r)
    return r.to(device), t.to(device)


def shortcut_time_pairs(
    batch_size: int,
    equal_fraction: float = 0.75,
    distribution: str = "logit_normal",
    levels: int = 7,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mean: float = MEANFLOW_TIME_MEAN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times ``(r, t)`` of a shortcut model, each ``(B,)``, ``0 <= r <= t <= 1``.

    A share ``equal_fraction`` of the pairs has ``r = t`` (flow matching; ``t`` logit-normal(``mean``, 1) or uniform),
    the rest a jump of ``2d = 2^-k``, ``k`` uniform in ``0 .. levels - 1`` (the paper's powers of two down to 1/128 for
    ``levels = 7``; a quarter of the batch, its setting), with ``t`` uniform in ``[2d, 1]`` and ``r = t - 2d``.

    Args:
        batch_size: ``B``.
        equal_fraction: share of flow-matching pairs, in [0, 1].
        distribution: how ``t`` of the flow-matching pairs is drawn (see :func:`sample_time_pairs`).
        levels: jump sizes ``1, 1/2, ..., 2^-(levels - 1)``.
        generator: for reproducible draws (on the CPU; the result is moved to ``device``).
        device: where the times go.
        mean: of the flow-matching pairs' logit-normal law (MeanFlow's -0.4; the JiT's and SD3's 0).
    """
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}.")
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}.")
    if distribution == "uniform":
        fm = torch.rand(batch_size, generator=generator)
    else:  # logit-normal(mean, 1): MeanFlow's -0.4 by default
        fm = torch.sigmoid(torch.randn(batch_size, generator=generator) + mean)
    k = torch.randint(0, levels, (batch_size,), generator=generator)
    jump = torch.pow(2.0, -k.double()).float()
    t = jump + (1 - jump) * torch.rand(batch_size, generator=generator)
    r = (t - jump).clamp_min(0.0)
    equal = torch.rand(batch_size, generator=generator) < equal_fraction
    t = torch.where(equal, fm, t)
    r = torch.where(equal, fm, r)
    return r.to(device), t.to(device)


def shortcut_target(
    u_fn: AverageVelocity, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's average velocity at ``(z, r, t)`` and its shortcut-model target (Frans et al. 2024, sec. 3).

    Where ``r = t``: the flow-matching target ``v``. Elsewhere, with ``d = (t - r) / 2``: the mean of two half jumps,
    ``(u(z_t, t - d, t) + u(z_{t-d}, r, t - d)) / 2``, computed without a graph (the paper's stop-gradient); the
    two extra forward passes run on the whole batch.

    Args:
        u_fn: the average velocity, ``u_fn(z, r, t)``.
        z: the noisy batch ``z_t``, ``(B, ...)``.
        r, t: times ``(B,)``, ``r <= t``.
        v: the conditional velocity ``x0 - noise``, shaped like ``z``.

    Returns:
        ``(u, target)``: ``u`` carries the graph for the loss; ``target`` is detached.
    """
    _check_times(z, r, t, v)
    u = u_fn(z, r, t)
    with torch.no_grad():
        half = (t - r) / 2
        mid = t - half
        first = u_fn(z, mid, t)
        second = u_fn(z + expand_to(half, z) * first, r, mid)
        jumped = (half > 0).reshape(-1, *([1] * (z.ndim - 1)))
        target = torch.where(jumped, (first + second) / 2, v)
    return u, target.detach()


def _check_times(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> None:
    if v.shape != z.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of z {tuple(z.shape)}.")
    if r.shape != (z.shape[0],) or t.shape != (z.shape[0],):
        raise ValueError(f"r and t must be ({z.shape[0]},), got {tuple(r.shape)} and {tuple(t.shape)}.")
    if r.device.type == "cpu":  # checked where it costs no device synchronisation
        if bool((r > t).any()):
            raise ValueError("every r must be at most its t (the map runs from t back to r).")
    else:
        torch._assert_async((r <= t).all())


def meanflow_target(
    u_fn: AverageVelocity, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's average velocity at ``(z, r, t)`` and its MeanFlow target, from one forward-mode pass.

    ``target = v - (t - r) du/dt`` with ``du/dt`` the Jacobian-vector product of ``u_fn`` along the path (tangent
    ``(-v, 0, 1)`` in ``(z, r, t)``), detached: the loss regresses ``u`` onto it (the paper's stop-gradient).

    Args:
        u_fn: the average velocity, ``u_fn(z, r, t)``; differentiable in all three (a network whose time inputs
            are ``r`` and ``t``, or ``t`` and ``t - r``).
        z: the noisy batch ``z_t``, ``(B, ...)``.
        r, t: times ``(B,)``, ``r <= t``.
        v: the conditional velocity ``x0 - noise``, shaped like ``z``.

    Returns:
        ``(u, target)``: ``u`` carries the graph for the loss; ``target`` is detached.
    """
    _check_times(z, r, t, v)
    u, du_dt = jvp(u_fn, (z, r, t), (-v, torch.zeros_like(r), torch.ones_like(t)))
    target = v - expand_to(t - r, z) * du_dt
    return u, target.detach()


def meanflow_loss(
    u: torch.Tensor, target: torch.Tensor, adaptive_power: float = 0.0, eps: float = 1e-3
) -> torch.Tensor:
    """Mean over the batch of ``w * ||u - target||^2`` (sum over each sample's elements).

    ``w = 1`` for ``adaptive_power = 0``; else MeanFlow's adaptive weight ``sg(1 / (||u - target||^2 + eps)^p)``
    (Geng et al. 2025, section 4.3: ``p = 1`` on ImageNet), which damps samples with large errors.

    Args:
        u, target: ``(B, ...)``.
        adaptive_power: ``p`` >= 0.
        eps: keeps the weight finite.
    """
    if u.shape != target.shape:
        raise ValueError(f"u {tuple(u.shape)} and target {tuple(target.shape)} must have the same shape.")
    if adaptive_power < 0:
        raise ValueError(f"adaptive_power must be >= 0, got {adaptive_power}.")
    err = (u - target).pow(2).flatten(1).sum(1)
    if adaptive_power == 0:
        return err.mean()
    weight = (err.detach() + eps).pow(-adaptive_power)
    return (weight * err).mean()


def average_velocity_from_sample(
    x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_min: float = 0.05
) -> torch.Tensor:
    """The average velocity of a network that predicts clean data: ``u = (x_hat - z_t) / max(t, t_min)``.

    The x-prediction parameterisation (JiT, Li and He 2025, arXiv 2511.13720, carried over to flow maps): the jump
    ``z_r = z_t + (t - r) u`` moves along the straight line from ``z_t`` to the network's clean estimate, and the
    one-step map (``r = 0``) lands on ``x_hat`` itself. ``t_min`` keeps the division finite near the data, as JiT's
    velocity loss does.

    Args:
        x_hat: the network's clean estimate ``(B, ...)``.
        z: ``z_t``, shaped like ``x_hat``.
        t: ``(B,)`` times in [0, 1].
        t_min: the smallest divisor.
    """
    return (x_hat - z) / expand_to(t.clamp_min(t_min), z)


def flow_map_step(u_fn: AverageVelocity, z: torch.Tensor, r: float, t: float) -> torch.Tensor:
    """One flow-map jump ``z_r = z_t + (t - r) u(z_t, r, t)`` for the whole batch (``0 <= r <= t <= 1``)."""
    if not 0.0 <= r <= t <= 1.0:
        raise ValueError(f"a flow-map step needs 0 <= r <= t <= 1, got r={r}, t={t}.")
    n = z.shape[0]
    rr = torch.full((n,), float(r), device=z.device)
    tt = torch.full((n,), float(t), device=z.device)
    return z + (t - r) * u_fn(z, rr, tt)


def _uniform_jumps(u_fn: AverageVelocity, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    z = noise
    for t, r in zip(times[:-1], times[1:]):
        z = flow_map_step(u_fn, z, r, t)
    return z


def meanflow_sample(u_fn: AverageVelocity, noise: torch.Tensor, num_steps: int = 1) -> torch.Tensor:
    """MeanFlow's few-step sampler (Geng et al. 2025, Algorithm 2, over a uniform partition of [0, 1]).

    ``num_steps`` flow-map jumps from ``t = 1`` (``noise``) to ``t = 0``; one network evaluation each, so the number
    of function evaluations equals ``num_steps``. With ``num_steps = 1``: ``x0 = noise + u(noise, 0, 1)``.

    Args:
        u_fn: the learnt average velocity.
        noise: ``z_1``, ``(B, ...)``.
        num_steps: jumps (1, 2 and 4 are the few-step settings).
    """
    return _uniform_jumps(u_fn, noise, num_steps)


def shortcut_sample(u_fn: AverageVelocity, noise: torch.Tensor, num_steps: int = 1) -> torch.Tensor:
    """The shortcut models' sampler (Frans et al. 2024, Algorithm 2): ``num_steps`` jumps of size ``d = 1 /
    num_steps`` from noise to data, the network told the step size; the trained sizes are powers of two, so 1, 2, 4
    (... up to ``2^(levels - 1)``) steps are the ones it learnt.

    Args:
        u_fn: the learnt average velocity (step ``d`` as the interval ``t - r``).
        noise: ``z_1``, ``(B, ...)``.
        num_steps: jumps.
    """
    return _uniform_jumps(u_fn, noise, num_steps)
