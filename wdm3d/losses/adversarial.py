"""The adversarial part of the autoencoder loss: MONAI's 3D ``PatchDiscriminator`` with
``PatchAdversarialLoss(criterion="hinge")`` (which passes the logits through tanh before the hinge), and the VQGAN
adaptive weight (ratio of gradient norms at the decoder's last layer). The engine's
:class:`wdm3d.engine.VAEIteration` runs the GAN step with these."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

__all__ = ["adaptive_gan_weight", "discriminator_adversarial_loss", "generator_adversarial_loss", "patch_discriminator"]


def _grad_norm(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(
            "the loss does not depend on last_layer_weight: pass the weight of the decoder's output layer "
            "(model.last_layer_weight()) that produced the reconstruction."
        )
    return grad.norm()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's adaptive weight ``||grad_W rec_loss|| / (||grad_W g_loss|| + eps)``, clamped to ``[0, max_weight]``.

    ``W`` is the decoder's last layer; the result is detached (a number, not a path for gradients). Both gradients are
    taken with ``retain_graph=True`` so the caller can still back-propagate the total loss. When neither loss carries
    a graph (validation under ``torch.no_grad()``) the weight is 0, as in VQGAN's evaluation.

    Args:
        rec_loss: the (weighted) reconstruction-side loss, a scalar.
        g_loss: the generator's adversarial loss, a scalar.
        last_layer_weight: the weight tensor of the decoder's output layer (``model.last_layer_weight()``).
        max_weight: upper clamp.
        eps: added to the adversarial gradient norm.

    Returns:
        A detached scalar tensor.
    """
    if rec_loss.ndim != 0 or g_loss.ndim != 0:
        raise ValueError(
            f"rec_loss and g_loss must be scalars, got shapes {tuple(rec_loss.shape)} and {tuple(g_loss.shape)}."
        )
    if not (max_weight > 0 and eps > 0):
        raise ValueError(f"max_weight and eps must be > 0, got {max_weight}, {eps}.")
    if not (rec_loss.requires_grad and g_loss.requires_grad and last_layer_weight.requires_grad):
        return torch.zeros((), device=rec_loss.device)
    ratio = _grad_norm(rec_loss, last_layer_weight) / (_grad_norm(g_loss, last_layer_weight) + eps)
    return ratio.clamp(0.0, max_weight).detach()


def patch_discriminator(
    in_channels: int = 1,
    channels: int = 32,
    num_layers_d: int = 3,
    kernel_size: int = 4,
    norm: str | tuple = "INSTANCE",
    last_conv_kernel_size: int | None = None,
) -> nn.Module:
    """MONAI's 3D ``PatchDiscriminator`` with MAISI-like small defaults (32 channels, 3 layers, instance norm).

    With kernel 4 the patch map shrinks about ``2**num_layers_d`` per axis, minus 2: volumes need at least
    ``6 * 2**(num_layers_d - 1)`` voxels per axis (24 with the defaults, for a single patch) or instance norm fails;
    use ``num_layers_d=2`` for 16^3. :class:`wdm3d.engine.VAEIteration` checks this on its first step.

    Args:
        in_channels: image channels.
        channels: filters of the first layer (doubled per layer).
        num_layers_d: conv layers after the first (all but the last with stride 2).
        kernel_size: conv kernel size.
        norm: MONAI norm name (``"INSTANCE"``, ``"BATCH"``, ...); instance norm suits batch size 1-2.
        last_conv_kernel_size: kernel of the output conv (defaults to ``kernel_size``).

    Returns:
        ``monai.networks.nets.PatchDiscriminator``; called on ``(B, C, D, H, W)`` it returns a list of feature maps,
        the last being the logits ``(B, 1, d, h, w)``.
    """
    for name, value in (
        ("in_channels", in_channels),
        ("channels", channels),
        ("num_layers_d", num_layers_d),
        ("kernel_size", kernel_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return PatchDiscriminator(
        spatial_dims=3,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        num_layers_d=num_layers_d,
        kernel_size=kernel_size,
        norm=norm,
        last_conv_kernel_size=last_conv_kernel_size,
    )


def _hinge() -> nn.Module:
    return PatchAdversarialLoss(criterion="hinge")


def _logits(out: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], torch.Tensor):
        return out[-1]
    raise TypeError(
        f"{name} must be the discriminator's output (logits, or MONAI PatchDiscriminator's list of feature maps whose "
        f"last element is the logits), got {type(out).__name__}; call the discriminator first."
    )


def generator_adversarial_loss(
    fake_logits: torch.Tensor | Sequence[torch.Tensor], criterion: nn.Module | None = None
) -> torch.Tensor:
    """The generator's adversarial loss: the discriminator should call the reconstruction real.

    Args:
        fake_logits: ``discriminator(reconstruction)`` (not detached: the gradient reaches the autoencoder); logits
            ``(B, 1, d, h, w)`` or MONAI PatchDiscriminator's list (its last element is used).
        criterion: a MONAI ``PatchAdversarialLoss``; hinge by default (``mean(relu(1 - tanh(logits)))``).

    Returns:
        A scalar; near 0 when the discriminator is sure the reconstruction is real, near 2 when sure it is fake.
    """
    criterion = criterion if criterion is not None else _hinge()
    return criterion(_logits(fake_logits, "fake_logits"), target_is_real=True, for_discriminator=False)


def discriminator_adversarial_loss(
    real_logits: torch.Tensor | Sequence[torch.Tensor],
    fake_logits: torch.Tensor | Sequence[torch.Tensor],
    criterion: nn.Module | None = None,
) -> torch.Tensor:
    """The discriminator's loss ``(loss(real -> real) + loss(fake -> fake)) / 2``.

    Args:
        real_logits: ``discriminator(x)`` for real volumes (logits or PatchDiscriminator's list).
        fake_logits: ``discriminator(reconstruction.detach())``: detach the reconstruction *before* the
            discriminator, so this step does not reach the autoencoder.
        criterion: a MONAI ``PatchAdversarialLoss``; hinge by default
            (``relu(1 - tanh(d_real))`` and ``relu(1 + tanh(d_fake))``, means).

    Returns:
        A scalar in [0, 2] for hinge: 0 when real and fake are told apart with confidence.
    """
    criterion = criterion if criterion is not None else _hinge()
    loss_real = criterion(_logits(real_logits, "real_logits"), target_is_real=True, for_discriminator=True)
    loss_fake = criterion(_logits(fake_logits, "fake_logits"), target_is_real=False, for_discriminator=True)
    return 0.5 * (loss_real + loss_fake)
