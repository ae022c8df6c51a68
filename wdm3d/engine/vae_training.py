"""Autoencoder (VAE / VAE-GAN) training on MONAI's ``SupervisedTrainer``.

MONAI's ``AdversarialTrainer`` passes only ``(reconstruction, target)`` to its reconstruction loss, so it cannot
add the KL, wavelet-pyramid or sparsity terms that need the posterior and coefficient pyramids, and it has no
adaptive GAN weight or discriminator warm-up. :class:`VAEIteration` is a :class:`~wdm3d.engine.GuardedIteration`
(non-finite guards, clipping, AMP) whose forward computes :class:`~wdm3d.losses.VAELoss` on the model's
:class:`~wdm3d.networks.vae_base.VAEOutput`, adds the generator's adversarial term (VQGAN's adaptive weight) once
the discriminator has started, and then takes the discriminator's step (hinge loss) with its own optimiser.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..artifacts import unwrap
from ..losses import adaptive_gan_weight, discriminator_adversarial_loss, generator_adversarial_loss
from .guards import GuardedIteration

__all__ = ["VAEIteration", "VolumePrepareBatch"]


class VolumePrepareBatch:
    """``prepare_batch`` for autoencoders: the volume under ``image_key`` is both input and target.

    Args:
        image_key: the datalist key of the volume (e.g. ``"t1n"``, ``"ct"``).
    """

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs: Any):
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            keys = sorted(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
            raise KeyError(f"batch has no key {self.image_key!r} (got {keys}); set image_key.")
        x = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking)
        if x.ndim != 5:
            raise ValueError(f"{self.image_key!r} must be (B, C, D, H, W), got {tuple(x.shape)}.")
        x = x.float() if not x.is_floating_point() else x
        return x, x


class VAEIteration(GuardedIteration):
    """One VAE(-GAN) training iteration for ``SupervisedTrainer(iteration_update=...)``.

    The trainer's ``network`` is the autoencoder, its ``optimizer`` the autoencoder's, its ``loss_function`` a
    :class:`~wdm3d.losses.VAELoss` (called as ``loss(output, target, model=network) -> (total, terms)``). Per
    iteration:

    1. generator: ``total = VAELoss + w * g_adv`` with ``w = adversarial_weight * adaptive_weight`` (the ratio of
       the reconstruction and adversarial gradient norms at the decoder's last layer, Esser et al. 2021) once
       ``iteration > discriminator_start``; guarded backward and step (see :class:`GuardedIteration`);
    2. discriminator (same condition): hinge loss on the real volume and the detached reconstruction, its own
       optimiser; a non-finite discriminator loss skips that step.

    The loss terms of the step go to ``engine.state.loss_terms`` (floats: ``recon``, ``wavelet``, ``kl``, ...,
    ``adv_g``, ``adv_d``, ``adaptive_weight``), which the MLflow tracker logs as ``loss_<term>``.

    Args:
        discriminator: e.g. :func:`wdm3d.losses.patch_discriminator`; None trains a plain VAE.
        d_optimizer: the discriminator's optimiser (required with a discriminator).
        adversarial_weight: the weight of the generator's adversarial term (before the adaptive factor).
        discriminator_start: iterations before the GAN terms start (WF-VAE warms up the autoencoder first).
        adaptive_weight: use the adaptive factor (else ``w = adversarial_weight``).
        grad_clip_norm, max_nonfinite_steps: see :class:`GuardedIteration`.
    """

    def __init__(
        self,
        discriminator: nn.Module | None = None,
        d_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.5,
        discriminator_start: int = 0,
        adaptive_weight: bool = True,
        grad_clip_norm: float | None = None,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, max_nonfinite_steps=max_nonfinite_steps)
        if discriminator is not None and d_optimizer is None:
            raise ValueError("a discriminator needs d_optimizer (its own optimiser).")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}.")
        if not isinstance(discriminator_start, int) or discriminator_start < 0:
            raise ValueError(f"discriminator_start must be an integer >= 0, got {discriminator_start!r}.")
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator_start = discriminator_start
        self.adaptive_weight = adaptive_weight
        self._probed = False

    def _probe_discriminator(self, x: torch.Tensor) -> None:
        # run (a copy of) the discriminator on one volume at the first step, so a volume too small for it fails now
        # and says why, not at iteration discriminator_start + 1 with instance norm's "more than 1 spatial element"
        self._probed = True
        probe = copy.deepcopy(unwrap(self.discriminator)).train()  # train mode: instance norm's check; a copy: BN stats
        try:
            with torch.no_grad():
                probe(x[:1].detach().float().contiguous())
        except (RuntimeError, ValueError) as err:
            layers = getattr(probe, "num_layers_d", None)
            raise ValueError(
                f"The discriminator cannot take volumes of {tuple(x.shape[2:])}"
                f"{f' with num_layers_d={layers}' if layers else ''}: {err}. Use fewer discriminator layers "
                "(num_layers_d; 3 needs >= 24 voxels per axis, 2 needs >= 12) or larger volumes."
            ) from err

    def gan_active(self, engine) -> bool:
        return (
            self.discriminator is not None
            and self.adversarial_weight > 0
            and engine.state.iteration > self.discriminator_start
        )

    def forward(self, engine, inputs: torch.Tensor, targets: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if self.discriminator is not None and self.adversarial_weight > 0 and not self._probed:
            self._probe_discriminator(inputs)
        output = engine.network(inputs)
        engine.state.output[Keys.PRED] = output.reconstruction
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        total, terms = engine.loss_function(output, targets, model=unwrap(engine.network))
        if self.gan_active(engine):
            for p in self.discriminator.parameters():  # the generator step must not fill D's gradients
                p.requires_grad_(False)
            try:
                g_loss = generator_adversarial_loss(self.discriminator(output.reconstruction))
            finally:
                for p in self.discriminator.parameters():
                    p.requires_grad_(True)
            weight = torch.tensor(self.adversarial_weight, device=g_loss.device)
            if self.adaptive_weight:
                weight = weight * adaptive_gan_weight(terms["nll"], g_loss, unwrap(engine.network).last_layer_weight())
            total = total + weight * g_loss
            terms = {**terms, "adv_g": g_loss, "adaptive_weight": weight}
        engine.state.output[Keys.LOSS] = total
        engine.state.loss_terms = {k: float(torch.as_tensor(v).detach().float()) for k, v in terms.items()}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

    def after_step(self, engine, ok: bool) -> None:
        if not self.gan_active(engine):
            return
        real = engine.state.output[Keys.IMAGE]
        fake = engine.state.output[Keys.PRED].detach()
        self.discriminator.train()
        self.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and real.device.type == "cuda"
        with torch.autocast("cuda", enabled=use_amp, **(engine.amp_kwargs if use_amp else {})):
            d_loss = discriminator_adversarial_loss(
                self.discriminator(real.contiguous()), self.discriminator(fake.contiguous())
            )
        if torch.isfinite(d_loss.detach()):
            d_loss.backward()
            if self.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.grad_clip_norm)
            self.d_optimizer.step()
        else:
            engine.logger.warning(
                "Iteration %d: non-finite discriminator loss; its step skipped.", engine.state.iteration
            )
        engine.state.loss_terms["adv_d"] = float(d_loss.detach().float())
