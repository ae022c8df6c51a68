"""Glue between :class:`WaveletDiffusion` and MONAI's stock training engine.

``SupervisedTrainer`` calls ``prepare_batch`` -> ``inferer(inputs, network, *args, **kwargs)`` -> ``loss(pred,
target)``. :class:`WaveletDiffusionPrepareBatch` (and, for the conditional models,
:class:`~wdm3d.diffusion.ConditionalPrepareBatch`) returns the wavelet coefficients of the batch as ``inputs``, the
diffusion target, and ``noise`` / ``timesteps`` plus the conditions (``context``, ``concat``, ``image``) as keyword
arguments; :class:`WaveletDiffusionInferer` noises the inputs with :meth:`WaveletDiffusion.add_noise` (float64, the
same maths as validation and sampling) and calls the network, so a bundle needs no custom engine:

.. code-block:: python

    trainer = SupervisedTrainer(
        ..., network=net,
        prepare_batch=WaveletDiffusionPrepareBatch(diffusion),
        inferer=WaveletDiffusionInferer(diffusion),
        loss_function=WaveletMSELoss(),
    )

MONAI's ``DiffusionInferer`` is not used: it noises with ``scheduler.add_noise`` in the input dtype, and its
``condition`` / ``mode`` arguments cannot carry an image prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.inferers import Inferer
from torch import nn

from ..artifacts import freeze, unwrap
from ..wavelets import SUBBANDS
from . import flow_map
from .wavelet_diffusion import WaveletDiffusion

__all__ = [
    "DiffusionTarget",
    "FlowMapPrediction",
    "WaveletDiffusionInferer",
    "WaveletDiffusionPrepareBatch",
    "WaveletMSELoss",
    "subband_mse",
    "target_tensor",
]


class DiffusionTarget(NamedTuple):
    """A training target with per-sample loss weights, for a process with ``loss_weighting`` other than "none".

    Attributes:
        target: what the network should output, ``(B, C, ...)``.
        weight: ``(B,)`` weights on each sample's squared error (:meth:`WaveletDiffusion.loss_weight`).
    """

    target: torch.Tensor
    weight: torch.Tensor


class FlowMapPrediction(NamedTuple):
    """What :class:`WaveletDiffusionInferer` returns for a flow map: the prediction and its target together.

    MeanFlow's target depends on the network itself (a Jacobian-vector product of it), so the inferer computes it
    and :class:`WaveletMSELoss` regresses ``u`` onto it, ignoring the prepare-batch's target.

    Attributes:
        u: the network's average velocity at ``(z_t, r, t)``, with its graph.
        target: MeanFlow's target, detached.
    """

    u: torch.Tensor
    target: torch.Tensor


def target_tensor(target: torch.Tensor | DiffusionTarget) -> torch.Tensor:
    """The target tensor of a plain or weighted target (for logging per-subband errors)."""
    return target.target if isinstance(target, DiffusionTarget) else target


class WaveletDiffusionPrepareBatch(PrepareBatch):
    """Turn an image batch into a wavelet diffusion training example for ``SupervisedTrainer``.

    The target is a tensor, or a :class:`DiffusionTarget` (target and per-sample weights) when the process has a
    ``loss_weighting``; :class:`WaveletMSELoss` takes both.

    Args:
        diffusion: the :class:`WaveletDiffusion` that defines the wavelet space, timesteps and target.
        image_key: key of the images ``(B, C, D, H, W)`` in the batch dict.
        condition_key: optional key of conditioning data.
        condition_mode: ``"concat"``: the condition is an image ``(B, Cc, D, H, W)``; its wavelet coefficients
            (same space as the images) are passed as ``concat=`` and :class:`WaveletDiffusionInferer` concatenates
            them to the noisy input. ``"crossattn"``: the condition is passed as ``context=`` unchanged (the
            network's cross-attention tokens).

    Returns (when called): ``(x0, target, (), kwargs)`` with ``kwargs`` the keyword arguments of
    :class:`WaveletDiffusionInferer`: ``noise``, ``timesteps`` and, with a ``condition_key``, ``concat`` or
    ``context``.
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        image_key: str = "image",
        condition_key: str | None = None,
        condition_mode: str = "concat",
    ) -> None:
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        if condition_mode not in ("concat", "crossattn"):
            raise ValueError(f"condition_mode must be 'concat' or 'crossattn', got {condition_mode!r}.")
        self.diffusion = diffusion
        self.image_key = image_key
        self.condition_key = condition_key
        self.condition_mode = condition_mode

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor] | torch.Tensor,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if isinstance(batchdata, Mapping):
            if self.image_key not in batchdata:
                raise KeyError(f"batch has no key {self.image_key!r} (keys: {sorted(batchdata)}); set image_key.")
            images = batchdata[self.image_key]
        else:
            images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images = torch.as_tensor(images).to(device=device, non_blocking=non_blocking)
        if images.ndim != 5:
            raise ValueError(f"images must have shape (B, C, D, H, W), got {tuple(images.shape)}.")
        images = images.float() if not images.is_floating_point() else images
        x0 = self.diffusion.encode(images)
        noise = torch.randn_like(x0)
        infer_kwargs: dict[str, Any] = {"noise": noise}
        if self.diffusion.flow_map is not None:
            # (r, t) pairs; the inferer computes MeanFlow's target from the network, so this is only its r = t value
            # (the velocity, whatever the network predicts) and no process target is computed
            r, timesteps = self.diffusion.sample_flow_map_times(x0.shape[0], device=x0.device)
            infer_kwargs["interval"] = timesteps - r
            target = x0 - noise
        else:
            timesteps = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
            target = self.diffusion.target(x0, noise, timesteps)
            if self.diffusion.loss_weighting != "none":
                target = DiffusionTarget(target, self.diffusion.loss_weight(timesteps))
        infer_kwargs["timesteps"] = timesteps
        if self.condition_key is not None:
            if not isinstance(batchdata, Mapping) or self.condition_key not in batchdata:
                raise KeyError(f"batch has no condition key {self.condition_key!r}.")
            cond = torch.as_tensor(batchdata[self.condition_key]).to(device=device, non_blocking=non_blocking)
            if self.condition_mode == "concat":
                infer_kwargs["concat"] = self.diffusion.encode(cond.float())
            else:
                infer_kwargs["context"] = cond
        return x0, target, (), infer_kwargs


class WaveletDiffusionInferer(Inferer):
    """The training forward of wavelet diffusion, unconditional and conditional: noise ``x0``, call the network.

    ``inferer(x0, network, noise=, timesteps=, context=None, concat=None, image=None, drop_image=None)``:

    - ``x_t = diffusion.add_noise(x0, noise, timesteps)`` (float64 maths, returned in ``x0``'s dtype);
    - with ``concat`` (cWDM), the network input is ``cat(x_t, concat)`` on channels;
    - with an ``image`` (IP-Adapter), the network's ``encode_image`` makes the image tokens, the rows in
      ``drop_image`` become the adapter's null prompt (``null_image_tokens``: learned, or all-zero tokens, which
      the adapter reads as "no image prompt"), and the call is
      ``network(x, timesteps, context=context, image_tokens=tokens)``;
    - else ``network(x, timesteps, context=context)`` (``context``: cross-attention tokens or condition indices,
      None for an unconditional network);
    - for a flow map (the process's ``flow_map``, with ``interval`` = ``t - r``): the average velocity
      (:meth:`WaveletDiffusion.flow_map_velocity`, which calls ``network(x, timesteps, context=context,
      interval=interval)``) is differentiated by one ``torch.func.jvp``
      (:func:`~wdm3d.diffusion.flow_map.meanflow_target`), or for shortcut models regressed onto two detached half
      jumps (:func:`~wdm3d.diffusion.flow_map.shortcut_target`); the result is a :class:`FlowMapPrediction`.

    The keyword arguments are what :class:`WaveletDiffusionPrepareBatch` and
    :class:`~wdm3d.diffusion.ConditionalPrepareBatch` return.

    Distillation (a flow map only): with a ``teacher``, a trained rectified flow (a multi-step one, or a flow map read
    at interval 0, its instantaneous velocity), the flow map's velocity ``v`` (its ``r = t`` target, and the tangent
    of MeanFlow's Jacobian-vector product) is the teacher's marginal velocity at ``(z_t, t)``
    (:meth:`WaveletDiffusion.velocity`) instead of the conditional ``x0 - noise``: the same map, learnt from a target
    without the data pairing's noise, as consistency distillation does for consistency models (Song et al. 2023). One
    more forward pass of the teacher per step, without a graph.

    Args:
        diffusion: the process whose :meth:`~WaveletDiffusion.add_noise` noises the inputs.
        teacher: the teacher network (called as ``teacher(x, timesteps, context=context)``), frozen here (eval mode,
            no gradients); :func:`~wdm3d.diffusion.load_teacher` rebuilds one from a checkpoint.
        teacher_diffusion: the teacher's process: rectified flow (with or without a flow map), in the student's
            wavelet space (same levels, LLL scale and wavelet) and time scale (same ``num_train_timesteps``).
    """

    def __init__(
        self,
        diffusion: WaveletDiffusion,
        teacher: nn.Module | None = None,
        teacher_diffusion: WaveletDiffusion | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(diffusion, WaveletDiffusion):
            raise TypeError(f"diffusion must be a WaveletDiffusion, got {type(diffusion).__name__}.")
        if teacher is not None:
            _check_teacher(diffusion, teacher_diffusion)
            freeze(teacher)
        elif teacher_diffusion is not None:
            raise ValueError("teacher_diffusion was given without a teacher network.")
        self.diffusion = diffusion
        self.teacher = teacher
        self.teacher_diffusion = teacher_diffusion

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        interval: torch.Tensor | None = None,
    ) -> torch.Tensor | FlowMapPrediction:
        """The network's prediction for ``x0`` noised at ``timesteps``.

        Args:
            inputs: clean coefficients ``x0`` ``(B, C, ...)``.
            network: the model being trained (may be wrapped in DDP / torch.compile).
            noise: noise of ``inputs``' shape.
            timesteps: ``(B,)`` timesteps.
            context: passed to the network as ``context``.
            concat: coefficients ``(B, Cc, ...)`` concatenated to the noisy input on channels.
            image: the image prompt ``(B, C, D, H, W)`` of an IP-Adapter network.
            drop_image: ``(B,)`` bool, the samples whose image tokens become the null prompt.
            interval: ``(B,)`` flow-map interval ``t - r`` in timestep units (a process with a ``flow_map``).
        """
        if self.diffusion.flow_map is not None:
            if interval is None or image is not None:
                raise ValueError("a flow map trains with an interval (t - r) and without image prompts.")
            return self._flow_map(inputs, network, noise, timesteps, interval, context, concat)
        x = self.diffusion.add_noise(inputs, noise, timesteps)
        if concat is not None:
            if concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"concat {tuple(concat.shape)} must match the noisy input {tuple(x.shape)} "
                    "in batch and spatial size."
                )
            x = torch.cat((x, concat.to(x.dtype)), dim=1)
        if image is None:
            return network(x, timesteps, context=context)
        model = unwrap(network)
        encode = getattr(model, "encode_image", None)
        if encode is None:
            raise ValueError(
                f"an image prompt needs an IPAdapter network (with encode_image), got {type(model).__name__}."
            )
        tokens = encode(image)
        if drop_image is not None:
            if drop_image.shape != (tokens.shape[0],):
                raise ValueError(f"drop_image must be ({tokens.shape[0]},), got {tuple(drop_image.shape)}.")
            null_of = getattr(model, "null_image_tokens", None)
            null = null_of(tokens.shape[0]).to(tokens.dtype) if null_of is not None else torch.zeros_like(tokens)
            tokens = torch.where(drop_image.to(tokens.device)[:, None, None], null, tokens)
        return network(x, timesteps, context=context, image_tokens=tokens)

    def _flow_map(self, x0, network, noise, timesteps, interval, context, concat) -> FlowMapPrediction:
        T = float(self.diffusion.num_train_timesteps)

        def u_fn(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.diffusion.flow_map_velocity(network, z, r, t, context, concat)

        t = timesteps.double() / T
        r = (timesteps - interval).double() / T
        z = self.diffusion.add_noise(x0, noise, timesteps)
        v = x0 - noise
        if self.teacher is not None:
            with torch.no_grad():
                x = z if concat is None else torch.cat((z, concat.to(z.dtype)), dim=1)
                out = self.teacher(x, timesteps, context=context).to(z.dtype)
                v = self.teacher_diffusion.velocity(out, z, timesteps)
        target_of = flow_map.shortcut_target if self.diffusion.flow_map == "shortcut" else flow_map.meanflow_target
        u, target = target_of(u_fn, z, r.to(x0.dtype), t.to(x0.dtype), v.to(x0.dtype))
        return FlowMapPrediction(u, target)


def _check_teacher(student: WaveletDiffusion, teacher: WaveletDiffusion | None) -> None:
    """A teacher fits a student when it is a rectified flow (a flow map too, read at interval 0) in the student's
    wavelet space."""
    if student.flow_map is None:
        raise ValueError(
            "a teacher distils into a flow map: the student's process needs flow_map='meanflow' or 'shortcut'."
        )
    if not isinstance(teacher, WaveletDiffusion):
        raise TypeError(f"teacher_diffusion must be the teacher's WaveletDiffusion, got {type(teacher).__name__}.")
    if teacher.process != "rflow":
        raise ValueError(
            f"the teacher must be a rectified flow (process 'rflow'; a flow map is read at interval 0, its "
            f"instantaneous velocity), got process {teacher.process!r}."
        )
    space = ("levels", "lll_scale", "num_train_timesteps")  # the teacher is called with the student's timesteps
    differ = {
        k: (getattr(teacher, k), getattr(student, k)) for k in space if getattr(teacher, k) != getattr(student, k)
    }
    if teacher.space.dwt.wavelet != student.space.dwt.wavelet:
        differ["wavelet"] = (teacher.space.dwt.wavelet, student.space.dwt.wavelet)
    if differ:
        fix = " ".join(f"--diffusion#{k} {json.dumps(v[0])}" for k, v in differ.items())
        raise ValueError(
            f"the teacher runs in another wavelet space or time scale than the student (teacher, student): {differ}. "
            f"Train the student in the teacher's ({fix}), and sample it so too."
        )


def _group_weights(weights: torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
    """``(G,)`` weights of channel groups -> ``(1, channels, 1, 1, 1)`` (each group is ``channels // G`` channels)."""
    groups = weights.numel()
    if channels % groups:
        raise ValueError(f"{groups} subband weights do not divide {channels} wavelet channels.")
    w = weights.to(dtype=like.dtype, device=like.device).repeat_interleave(channels // groups)
    return w.reshape(1, channels, *([1] * (like.ndim - 2)))


def subband_mse(pred: torch.Tensor, target: torch.Tensor | DiffusionTarget, levels: int = 1) -> dict[str, float]:
    """Mean squared error of each subband, ``{"LLL": ..., ..., "HHH": ...}`` (for logging).

    With ``levels=2`` (``64C`` channels) each name is a level-1 subband and covers the 8 level-2 bands computed from
    it: channel ``j`` belongs to level-1 subband ``(j % 8C) // C``.
    """
    target = target_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
    factor = 8**levels
    if pred.shape[1] % factor:
        raise ValueError(f"{levels}-level wavelet tensors have a multiple of {factor} channels, got {pred.shape[1]}.")
    err = (pred.detach().float() - target.detach().float()).pow(2).mean(dim=tuple(range(2, pred.ndim)))
    groups = err.reshape(err.shape[0], factor // 8, 8, pred.shape[1] // factor).mean(dim=(0, 1, 3))
    return {name: groups[k].item() for k, name in enumerate(SUBBANDS)}


class WaveletMSELoss(nn.Module):
    """MSE in the wavelet domain, optionally weighted per subband (WDM: plain MSE, all weights 1).

    Args:
        subband_weights: one weight per channel group, in channel order: 8 for one level (:data:`SUBBANDS`
            order), 64 for a two-level packet; None for equal weights. The weighted loss is
            ``sum_k w_k * mse_k / mean_k w_k / G`` so its scale does not depend on the weights.
        learned: learn one log-variance ``s_k`` per subband (heteroscedastic loss, Kendall & Gal 2017, as
            WaveDiT weights its subbands): ``loss = mean_k (exp(-s_k) mse_k + s_k)``. At the optimum
            ``exp(s_k) = mse_k``, so each subband's error is balanced by its own size. The ``s_k`` are parameters
            of this module: give them to the optimiser (``list(net.parameters()) + list(loss.parameters())``).
            Multiplies the fixed ``subband_weights`` if both are given.
        num_subbands: the number of groups with ``learned`` (8 for one level, 64 for two).

    The target may be a :class:`DiffusionTarget`; its per-sample weights multiply each sample's error. A
    :class:`FlowMapPrediction` brings its own target (MeanFlow's), which replaces ``target``.
    """

    def __init__(
        self, subband_weights: Sequence[float] | None = None, learned: bool = False, num_subbands: int = 8
    ) -> None:
        super().__init__()
        if subband_weights is not None:
            subband_weights = [float(w) for w in subband_weights]
            if len(subband_weights) not in (8, 64) or any(w < 0 for w in subband_weights) or sum(subband_weights) <= 0:
                raise ValueError(
                    f"subband_weights must be 8 (one level) or 64 (two levels) non-negative numbers, not all 0; "
                    f"got {subband_weights}."
                )
        if learned and num_subbands not in (8, 64):
            raise ValueError(f"num_subbands must be 8 (one level) or 64 (two levels), got {num_subbands}.")
        self.subband_weights = subband_weights
        self.learned = bool(learned)
        self.log_variance = nn.Parameter(torch.zeros(num_subbands)) if learned else None

    def forward(self, pred: torch.Tensor | FlowMapPrediction, target: torch.Tensor | DiffusionTarget) -> torch.Tensor:
        if isinstance(pred, FlowMapPrediction):  # the flow map's target came with the prediction
            pred, target = pred.u, pred.target
        weight = target.weight if isinstance(target, DiffusionTarget) else None
        target = target_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
        err = (pred.float() - target.float()).pow(2)
        if weight is not None:
            if weight.shape != (pred.shape[0],):
                raise ValueError(f"per-sample weights must have shape ({pred.shape[0]},), got {tuple(weight.shape)}.")
            err = err * weight.to(err).reshape(-1, *([1] * (err.ndim - 1)))
        if self.subband_weights is not None:
            w = torch.tensor(self.subband_weights)
            err = err * _group_weights(w / w.mean(), pred.shape[1], err)
        if not self.learned:
            return err.mean()
        groups = self.log_variance.numel()
        per_band = err.mean(dim=tuple(range(2, err.ndim))).mean(0)  # (channels,)
        per_band = per_band.reshape(groups, -1).mean(1)
        s = self.log_variance.float()
        return (torch.exp(-s) * per_band + s).mean()
