"""Numerical guards for training: skip steps with a non-finite loss or gradient, clip gradients, stop on a streak.

MONAI's ``SupervisedTrainer`` runs forward, backward and ``optimizer.step()`` in one ``_iteration`` with no hook
between backward and step; :class:`GuardedIteration` is passed as its ``iteration_update`` and does the same
iteration (prepare batch, inferer, loss, AMP/GradScaler) with the checks and clipping in that gap.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from ignite.handlers import EMAHandler as _IgniteEMAHandler
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

__all__ = ["GuardedIteration", "EMAHandler", "NonFiniteTrainingError"]

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


class GuardedIteration:
    """One training iteration for ``SupervisedTrainer(iteration_update=...)`` with non-finite guards and clipping.

    A step whose loss or total gradient norm is not finite is skipped (no optimizer step; :class:`EMAHandler`
    skips its update too) and counted in ``engine.state.nonfinite_steps`` (total, also in
    ``engine.state.metrics["nonfinite_steps"]`` for the stats and MLflow handlers) with a warning. After
    ``max_nonfinite_steps`` skipped steps in a row training stops with :class:`NonFiniteTrainingError`.
    The output dict is the trainer's (``image``, ``label``, ``pred``, ``loss``).

    Args:
        grad_clip_norm: clip the total gradient norm to this value (None: no clipping).
        max_nonfinite_steps: consecutive non-finite steps tolerated (0: the first one is an error).
    """

    def __init__(self, grad_clip_norm: float | None = None, max_nonfinite_steps: int = 10) -> None:
        if grad_clip_norm is not None and not (float(grad_clip_norm) > 0 and math.isfinite(float(grad_clip_norm))):
            raise ValueError(f"grad_clip_norm must be a positive number or null, got {grad_clip_norm!r}.")
        if not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be an integer >= 0, got {max_nonfinite_steps!r}.")
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.max_nonfinite_steps = max_nonfinite_steps

    def forward(self, engine, inputs: Any, targets: Any, args: tuple, kwargs: dict) -> None:
        """Forward pass and loss: set ``engine.state.output["pred"]`` and ``["loss"]`` (a scalar tensor).

        Subclasses (e.g. :class:`~wdm3d.engine.VAEIteration`) replace this; it runs under autocast with AMP.
        """
        engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output[Keys.LOSS] = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

    def after_step(self, engine, ok: bool) -> None:
        """Called after the (possibly skipped) optimizer step, before ``MODEL_COMPLETED``: a second optimiser's
        step goes here (the VAE's discriminator)."""

    def _params(self, engine) -> list[torch.nn.Parameter]:
        return [p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def __call__(self, engine, batchdata: Any) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise ValueError("GuardedIteration does not support gradient accumulation (accumulation_steps > 1).")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        if getattr(engine, "compile", False):  # compiled graphs do not take MetaTensors (as MONAI's iteration)
            inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
            targets = targets.as_tensor() if hasattr(targets, "as_tensor") else targets
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None
        if scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                self.forward(engine, inputs, targets, args, kwargs)
            scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            scaler.unscale_(engine.optimizer)
        else:
            self.forward(engine, inputs, targets, args, kwargs)
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        params = self._params(engine)
        loss_ok = bool(torch.isfinite(engine.state.output[Keys.LOSS].detach()).all())
        if self.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        ok = loss_ok and bool(torch.isfinite(norm))
        state = engine.state
        if ok:
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
            state.nonfinite_in_a_row = 0
        else:
            if scaler is not None:
                scaler.update()  # lowers the scale after the overflow unscale_ found
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            state.nonfinite_steps = getattr(state, "nonfinite_steps", 0) + 1
            state.nonfinite_in_a_row = getattr(state, "nonfinite_in_a_row", 0) + 1
            what = "loss" if not loss_ok else "gradient norm"
            engine.logger.warning(
                "Iteration %d: non-finite %s (loss %s, grad norm %s); step skipped (%d in a row, %d in total).",
                state.iteration,
                what,
                float(engine.state.output[Keys.LOSS].detach().float().mean()),
                float(norm),
                state.nonfinite_in_a_row,
                state.nonfinite_steps,
            )
            state.metrics["nonfinite_steps"] = state.nonfinite_steps
            if state.nonfinite_in_a_row > self.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"{state.nonfinite_in_a_row} consecutive training steps had a non-finite {what} (iteration "
                    f"{state.iteration}), more than max_nonfinite_steps={self.max_nonfinite_steps}. Lower the learning "
                    "rate, set grad_clip_norm, or check the data for NaN/Inf; resume from the last checkpoint."
                )
        state.step_skipped = not ok
        self.after_step(engine, ok)
        bad = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "num_bad", None)
        if bad is not None:  # SkipBadSamples: skipped inputs (the workers' too), for the stats and MLflow handlers
            state.metrics["bad_samples"] = bad
        state.metrics["nonfinite_steps"] = getattr(state, "nonfinite_steps", 0)
        state.metrics["grad_norm_total"] = float(norm) if ok else float("nan")
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class EMAHandler(_IgniteEMAHandler):
    """ignite's ``EMAHandler`` that leaves the EMA unchanged on a step :class:`GuardedIteration` skipped."""

    def _update_ema_model(self, engine, name: str) -> None:
        if getattr(engine.state, "step_skipped", False):
            return
        super()._update_ema_model(engine, name)
