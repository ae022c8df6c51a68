"""What the tracker measures at a training step: the loss (per wavelet subband too), a composite loss's terms, the
learning rate and the gradient norm. Throughput and GPU memory need the time between steps: the tracker adds them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..diffusion import subband_mse, target_tensor

__all__ = ["step_metrics"]


def step_metrics(engine: Any, levels: int = 1) -> dict[str, float]:
    """The metrics of the step an ignite trainer has just done.

    - ``loss``; ``loss_<SUBBAND>`` when the output has ``pred`` / ``label`` of shape ``(B, 8**levels * C, D, H, W)``;
    - ``loss_<term>`` for each term of a composite loss (``engine.state.loss_terms``, e.g. ``VAEIteration``'s recon,
      kl, adv_g, ...);
    - ``lr`` of the first parameter group and ``grad_norm`` (``GuardedIteration``'s norm of the step if it measured
      one, else the norm of the gradients left in the optimizer).

    Args:
        engine: the trainer, after an iteration (``engine.state.output``, ``engine.optimizer``).
        levels: the wavelet levels of the diffusion process (the subbands of ``pred`` / ``label``).
    """
    out = engine.state.output
    metrics: dict[str, float] = {}
    if isinstance(out, Mapping):
        if "loss" in out:
            metrics["loss"] = float(torch.as_tensor(out["loss"]).detach().float().mean())
        pred, label = out.get("pred"), target_tensor(out.get("label"))
        if (
            isinstance(pred, torch.Tensor)
            and isinstance(label, torch.Tensor)
            and pred.shape == label.shape
            and pred.ndim == 5
            and pred.shape[1] % 8**levels == 0
        ):
            metrics.update({f"loss_{k}": v for k, v in subband_mse(pred, label, levels).items()})
    metrics.update({f"loss_{k}": float(v) for k, v in (getattr(engine.state, "loss_terms", None) or {}).items()})
    opt = getattr(engine, "optimizer", None)
    if opt is not None:
        metrics["lr"] = opt.param_groups[0]["lr"]
        guarded = engine.state.metrics.get("grad_norm_total")  # GuardedIteration's norm of this step
        if guarded is not None:
            metrics["grad_norm"] = float(guarded)
        else:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                metrics["grad_norm"] = float(
                    torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
                )
    return metrics
