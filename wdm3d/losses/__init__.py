"""Autoencoder losses: reconstruction, wavelet pyramid (WF-VAE), KL, model extras, 2.5D perceptual, patch GAN.

Every wdm3d autoencoder returns a :class:`wdm3d.networks.vae_base.VAEOutput`; :class:`VAELoss` turns it into one
scalar for the generator step and a dict of named terms for logging. The GAN step is the engine's
(:class:`wdm3d.engine.VAEIteration`), built from the adversarial functions here.

One module per concept: :mod:`~.terms` (wavelet pyramid loss, KL), :mod:`~.adversarial` (patch discriminator, hinge
losses, adaptive weight), :mod:`~.feature_net` (the 2D feature network and its pretrained weights file),
:mod:`~.perceptual` (the 2.5D perceptual loss) and :mod:`~.vae` (:class:`VAELoss`, which weighs them into one).

Reductions (and what they mean for the weights). WF-VAE sums its terms over pixels (and divides by the batch);
here every term is a *mean*: the L1 reconstruction over all voxels, the wavelet loss per level over all coefficients
(then summed over levels), the KL over all latent elements (:func:`gaussian_kl`). Multiplying our total by ``N_x``
(image elements per sample) turns the mean L1 into WF-VAE's summed L1 and ``w * KL_mean`` into
``w * (N_x / N_z) * KL_sum``: a KL weight ``w`` here equals ``w * N_x / N_z`` in WF-VAE's units, with ``N_z`` latent
elements per sample (``N_x / N_z = C f^3 / Z``, e.g. 64 / 8 = 8 for Z=8, C=1, f=4). Our default ``kl_weight=1e-6``
is therefore the stronger ``8e-6`` in WF-VAE's units in that example; their ``1e-6`` would be ``1.25e-7`` here. We
keep 1e-6 (the KL stays a small regulariser either way, and the latents are normalised per channel before
diffusion); retune the weights whenever comparing with summed losses.

Adversarial part: MONAI's ``PatchDiscriminator`` (3D) with ``PatchAdversarialLoss(criterion="hinge")`` (which passes
the logits through tanh before the hinge), the VQGAN adaptive weight (ratio of gradient norms at the decoder's last
layer) and a ``discriminator_start`` iteration before which the GAN term is off.

Perceptual part (off by default, never downloads). MONAI's ``PerceptualLoss`` cannot be used offline here:
``network_type="resnet50"`` with ``pretrained_path`` reads a local file (``torch.load(weights_only=True)``) but
needs torchvision, which wdm3d does not depend on; ``"alex"/"vgg"/"squeeze"`` need the ``lpips`` package (whose
backbones come from torchvision downloads); the MedicalNet / RadImageNet types go through ``torch.hub`` (network).
:class:`Perceptual25DLoss` therefore runs its own VGG-style 2D network (:class:`SliceFeatureNet2D`) on slices along
the three axes, with weights from a file the user supplies. The default layout is VGG16's convolutional trunk with
torchvision's parameter names, so ``torch.save(torchvision.models.vgg16(weights=...).state_dict(), path)`` made on
any machine with torchvision loads as is (an LPIPS-style distance with equal layer weights, no learned LPIPS heads).
"""

from .adversarial import (
    adaptive_gan_weight,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    patch_discriminator,
)
from .feature_net import VGG16_LAYOUT, SliceFeatureNet2D, load_slice_feature_weights
from .perceptual import Perceptual25DLoss, perceptual_loss
from .terms import gaussian_kl, wavelet_pyramid_loss
from .vae import LOSS_NAMES, VAELoss

__all__ = [
    "LOSS_NAMES",
    "VGG16_LAYOUT",
    "Perceptual25DLoss",
    "perceptual_loss",
    "SliceFeatureNet2D",
    "VAELoss",
    "adaptive_gan_weight",
    "discriminator_adversarial_loss",
    "gaussian_kl",
    "generator_adversarial_loss",
    "load_slice_feature_weights",
    "patch_discriminator",
    "wavelet_pyramid_loss",
]
