"""Autoencoder losses: reconstruction, wavelet pyramid (WF-VAE), KL, model extras, 2.5D perceptual, patch GAN.

Every wdm3d autoencoder returns a :class:`wdm3d.networks.vae_base.VAEOutput`; :class:`VAELoss` turns it into one
scalar for the generator step and a dict of named terms for logging. The GAN step is the engine's
(:class:`wdm3d.engine.VAEIteration`), built from the adversarial functions here.

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

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from wdm3d.networks.state import state_mismatch
from wdm3d.networks.vae_base import LatentDistribution, VAEOutput

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

#: The logged term names (stable across code, configs and MLflow keys); model extras add their own names.
LOSS_NAMES: tuple[str, ...] = (
    "total", "recon", "wavelet", "kl", "sparsity", "perceptual", "nll", "adv_g", "adv_d", "adaptive_weight",
)


# --------------------------------------------------------------------------------------------------------------------
# pure terms
# --------------------------------------------------------------------------------------------------------------------


def wavelet_pyramid_loss(enc_coeffs: Sequence[torch.Tensor], dec_coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """WF-VAE's wavelet (WL) loss: ``sum_l mean |enc_l - dec_l|`` over the levels of two coefficient pyramids.

    Args:
        enc_coeffs: encoder-side coefficients per level (finest first), each ``(B, 8C, d_l, h_l, w_l)``.
        dec_coeffs: the decoder's coefficients for the same levels and shapes.

    Returns:
        A scalar tensor. Two empty pyramids (a model without a wavelet path) give 0.

    Raises:
        ValueError: the pyramids differ in length, or a level differs in shape.
    """
    if isinstance(enc_coeffs, torch.Tensor) or isinstance(dec_coeffs, torch.Tensor):
        raise TypeError("enc_coeffs and dec_coeffs must be lists of per-level tensors (finest first), not tensors.")
    enc_coeffs, dec_coeffs = list(enc_coeffs), list(dec_coeffs)
    if len(enc_coeffs) != len(dec_coeffs):
        raise ValueError(
            f"wavelet pyramids differ in length: {len(enc_coeffs)} encoder level(s) vs {len(dec_coeffs)} decoder "
            "level(s); the decoder must predict every level the encoder decomposed."
        )
    if not enc_coeffs:
        return torch.zeros(())
    total = None
    for lvl, (e, d) in enumerate(zip(enc_coeffs, dec_coeffs)):
        if e.shape != d.shape:
            raise ValueError(
                f"wavelet level {lvl} (0 = finest): encoder coefficients {tuple(e.shape)} vs decoder coefficients "
                f"{tuple(d.shape)}; the shapes must match."
            )
        diff = (e - d).abs()
        # half types (bf16 autocast) are averaged into float32: a bf16 scalar keeps about 3 significant digits
        term = diff.mean(dtype=torch.float32) if diff.dtype in (torch.bfloat16, torch.float16) else diff.mean()
        total = term if total is None else total + term
    return total


def gaussian_kl(posterior: LatentDistribution) -> torch.Tensor:
    """KL(q || N(0, I)) as a mean over all latent elements (and the batch): a scalar.

    Args:
        posterior: the encoder's :class:`LatentDistribution`, mean ``(B, Z, d, h, w)``.

    Returns:
        ``posterior.kl().sum() / posterior.mean.numel()``.
    """
    return posterior.kl().sum() / posterior.mean.numel()


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


# --------------------------------------------------------------------------------------------------------------------
# patch GAN (MONAI's discriminator and hinge loss)
# --------------------------------------------------------------------------------------------------------------------


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
    from monai.networks.nets import PatchDiscriminator

    for name, value in (("in_channels", in_channels), ("channels", channels), ("num_layers_d", num_layers_d),
                        ("kernel_size", kernel_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return PatchDiscriminator(
        spatial_dims=3, channels=channels, in_channels=in_channels, out_channels=1, num_layers_d=num_layers_d,
        kernel_size=kernel_size, norm=norm, last_conv_kernel_size=last_conv_kernel_size,
    )


def _hinge() -> nn.Module:
    from monai.losses import PatchAdversarialLoss

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


# --------------------------------------------------------------------------------------------------------------------
# 2.5D perceptual loss with a user-supplied 2D network
# --------------------------------------------------------------------------------------------------------------------

#: VGG16's convolutional trunk: conv widths, "M" for a 2x2 max-pool (torchvision's ``vgg16().features`` without its
#: final pool, so its parameter names ``features.0.weight`` ... ``features.28.bias`` are the same).
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SliceFeatureNet2D(nn.Module):
    """A VGG-style 2D feature network: 3x3 conv + ReLU stacks separated by 2x2 max-pools.

    Features are tapped at the last ReLU before every pool and at the end (for :data:`VGG16_LAYOUT`: relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3, LPIPS's taps). Parameters live in ``features`` (an ``nn.Sequential``) so the
    state-dict keys are torchvision's VGG keys.

    Args:
        layout: conv widths (positive ints) and ``"M"`` (max-pool); must start and end with a conv.
        in_channels: input channels of the first conv (3 for ImageNet weights; grey slices are repeated).

    Example:
        >>> net = SliceFeatureNet2D(layout=(8, "M", 16))
        >>> [f.shape[1:] for f in net(torch.zeros(1, 3, 8, 8))]
        [torch.Size([8, 8, 8]), torch.Size([16, 4, 4])]
    """

    def __init__(self, layout: Sequence[int | str] = VGG16_LAYOUT, in_channels: int = 3) -> None:
        super().__init__()
        layout = tuple(layout)
        if not layout or any(not (item == "M" or (isinstance(item, int) and item > 0)) for item in layout):
            raise ValueError(f"layout must be positive conv widths and 'M' (max-pool), got {layout!r}.")
        if layout[0] == "M" or layout[-1] == "M" or any(a == b == "M" for a, b in zip(layout, layout[1:])):
            raise ValueError(f"layout must start and end with a conv width and not repeat 'M', got {layout!r}.")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}.")
        layers: list[nn.Module] = []
        taps: list[int] = []
        ch = in_channels
        for item in layout:
            if item == "M":
                taps.append(len(layers) - 1)
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, item, 3, padding=1), nn.ReLU()]
                ch = item
        taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps = tuple(taps)
        self.in_channels = in_channels
        self.num_pools = layout.count("M")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(N, in_channels, H, W)`` -> one feature map per tap, ``(N, C_k, H / 2^k, W / 2^k)``."""
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


def load_slice_feature_weights(net: SliceFeatureNet2D, path: str | os.PathLike) -> SliceFeatureNet2D:
    """Load a local weights file into ``net`` strictly (never downloads).

    Accepted contents (read with ``torch.load(weights_only=True)``): a state dict with keys ``features.N.weight`` /
    ``features.N.bias`` (e.g. a whole torchvision VGG16 state dict: other keys such as ``classifier.*`` are ignored)
    or one with bare keys ``N.weight`` (a saved ``vgg16().features``).

    Args:
        net: the network to fill.
        path: the weights file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: not a plain tensor checkpoint, or keys/shapes do not fit ``net``'s layout.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"perceptual-loss weights file {path} does not exist. wdm3d never downloads weights: save the 2D network's "
            "state dict there (e.g. torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), path) "
            "on a machine with torchvision), or turn the perceptual term off."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled code, RuntimeError for non-checkpoints
        raise ValueError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint that torch.load(weights_only=True) accepts "
            f"({type(err).__name__}). Save a state dict with torch.save(model.state_dict(), path)."
        ) from err
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} must hold a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
    if any(k.startswith("features.") for k in obj):
        state = {k: v for k, v in obj.items() if k.startswith("features.")}
    else:
        state = {f"features.{k}": v for k, v in obj.items()}
    own = net.state_dict()
    mismatch = state_mismatch(own, state)
    if mismatch:
        raise ValueError(
            f"{path} does not fit the 2D feature network (layout with {len(own) // 2} convs): {mismatch}. "
            "Check that `layout` matches the file (VGG16_LAYOUT for torchvision's VGG16)."
        )
    net.load_state_dict(state, strict=True)
    return net


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.square().sum(dim=1, keepdim=True).sqrt() + eps)


class Perceptual25DLoss(nn.Module):
    """2.5D perceptual distance: a frozen 2D feature network on slices along the three axes of a volume.

    For each axis in ``axes`` a random subset of slices (the same for both volumes, ``slice_fraction`` of them, at
    least one) is taken, every image channel as a grey slice (repeated to the network's ``in_channels``), mapped from
    ``input_range`` to [0, 1] and, optionally, ImageNet-normalised. The distance per slice is LPIPS's with equal layer
    weights: at every tap, features are scaled to unit norm over channels, the squared difference is summed over
    channels and averaged over positions; the taps are summed. The result is averaged over slices and over the axes
    (one 2D distance in scale, so the weights of 2D LPIPS carry over).

    Args:
        weights_path: local weights file for the 2D network (see :func:`load_slice_feature_weights`); required.
        layout: the network's layout (:data:`VGG16_LAYOUT` for torchvision VGG16 weights).
        in_channels: the network's input channels.
        slice_fraction: fraction of slices per axis used per call, in (0, 1].
        axes: spatial axes of ``(B, C, D, H, W)`` to slice along, a non-empty subset of (2, 3, 4).
        input_range: intensity range of the volumes, mapped to [0, 1].
        imagenet_normalize: subtract ImageNet's mean and divide by its std (needs ``in_channels`` 3); set False for
            networks trained on other data.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.pt")
        >>> torch.save(SliceFeatureNet2D((8, "M", 8)).state_dict(), path)
        >>> loss = Perceptual25DLoss(path, layout=(8, "M", 8), slice_fraction=1.0)
        >>> x = torch.rand(1, 1, 8, 8, 8)
        >>> float(loss(x, x))
        0.0
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        layout: Sequence[int | str] = VGG16_LAYOUT,
        in_channels: int = 3,
        slice_fraction: float = 0.5,
        axes: Sequence[int] = (2, 3, 4),
        input_range: tuple[float, float] = (-1.0, 1.0),
        imagenet_normalize: bool = True,
    ) -> None:
        super().__init__()
        if weights_path is None:
            raise FileNotFoundError(
                "Perceptual25DLoss needs weights_path, a local weights file; wdm3d never downloads weights."
            )
        if not (isinstance(slice_fraction, (int, float)) and 0 < slice_fraction <= 1):
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction!r}.")
        axes = tuple(axes)
        if not axes or len(set(axes)) != len(axes) or any(a not in (2, 3, 4) for a in axes):
            raise ValueError(f"axes must be distinct spatial axes of (B, C, D, H, W), from (2, 3, 4); got {axes!r}.")
        lo, hi = (float(v) for v in input_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range!r}.")
        if imagenet_normalize and in_channels != 3:
            raise ValueError("imagenet_normalize needs in_channels=3 (ImageNet statistics are per RGB channel).")
        self.net = load_slice_feature_weights(SliceFeatureNet2D(layout, in_channels), weights_path)
        self.net.requires_grad_(False)
        self.net.eval()
        self.weights_path = str(weights_path)
        self.slice_fraction, self.axes, self.input_range = float(slice_fraction), axes, (lo, hi)
        self.imagenet_normalize = bool(imagenet_normalize)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Perceptual25DLoss:
        """Keep the feature network in eval mode whatever the surrounding module does."""
        super().train(mode)
        self.net.eval()
        return self

    def _prepare(self, slices: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        slices = (slices - lo) / (hi - lo)
        slices = slices.expand(-1, self.net.in_channels, -1, -1)
        if self.imagenet_normalize:
            slices = (slices - self.mean.to(slices.dtype)) / self.std.to(slices.dtype)
        return slices

    def _slices(self, x: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
        # (B, C, D, H, W) -> (B * C * n, 1, a, b): the chosen slices along `axis`, each channel a grey image
        x = x.index_select(axis, index).movedim(axis, 2)
        return x.reshape(-1, 1, *x.shape[-2:])

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = None
        for fa, fb in zip(self.net(self._prepare(a)), self.net(self._prepare(b))):
            d = (_unit_channels(fa) - _unit_channels(fb)).square().sum(dim=1).mean()
            total = d if total is None else total + d
        return total

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean 2.5D perceptual distance between two volume batches.

        Args:
            input: ``(B, C, D, H, W)``, e.g. the reconstruction (gradients flow to it).
            target: same shape.

        Returns:
            A scalar, 0 for identical inputs.
        """
        if input.ndim != 5 or input.shape != target.shape:
            raise ValueError(
                f"input and target must both be (B, C, D, H, W) of the same shape, got {tuple(input.shape)} and "
                f"{tuple(target.shape)}."
            )
        need = 2**self.net.num_pools
        for axis in self.axes:
            plane = [s for i, s in enumerate(input.shape[2:], start=2) if i != axis]
            if min(plane) < need:
                raise ValueError(
                    f"slices along axis {axis} are {tuple(plane)}; the 2D network pools {self.net.num_pools} times and "
                    f"needs slices of at least {need}x{need}. Use larger volumes, other axes or a shallower layout."
                )
        losses = []
        for axis in self.axes:
            n = input.shape[axis]
            keep = max(1, round(self.slice_fraction * n))
            index = torch.randperm(n)[:keep].to(input.device)
            losses.append(self._distance(self._slices(input, axis, index), self._slices(target, axis, index)))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"weights_path={self.weights_path!r}, slice_fraction={self.slice_fraction}, axes={self.axes}"


# --------------------------------------------------------------------------------------------------------------------
# the combined loss
# --------------------------------------------------------------------------------------------------------------------


def perceptual_loss(
    weights_path: str | os.PathLike | None, weight: float, device: str | torch.device = "cpu"
) -> Perceptual25DLoss | None:
    """The bundles' perceptual term: a :class:`Perceptual25DLoss` from ``weights_path``, or None when it is off.

    Refuses the two settings that silently do something else: a weight > 0 without a weights file (no perceptual
    term would be trained, yet the run would record the weight) and a weights file with weight 0 (the VGG passes
    would run every step and be multiplied by 0).

    Example:
        >>> perceptual_loss(None, 0.0) is None
        True
    """
    if weights_path:
        if not weight > 0:
            raise ValueError(
                f"perceptual_weights={str(weights_path)!r} is set but perceptual_weight={weight!r}: the perceptual loss "
                "would be computed every step and not trained on. Set perceptual_weight > 0 (WF-VAE: 0.1), or drop "
                "perceptual_weights."
            )
        return Perceptual25DLoss(weights_path).to(device)
    if weight > 0:
        raise ValueError(
            f"perceptual_weight={weight!r} needs perceptual_weights, the path of a VGG16 state dict (nothing is "
            "downloaded); without it there is no perceptual term to weigh."
        )
    return None


class VAELoss(nn.Module):
    """Generator-side loss of a wdm3d autoencoder (the GAN terms are the engine's, see below).

    ``total = recon_weight * recon + wavelet_weight * wavelet + kl_weight * kl + sum_k extra_weights[k] * extra_k
    + perceptual_weight * perceptual``, with

    - ``recon``: mean L1 over all voxels;
    - ``wavelet``: :func:`wavelet_pyramid_loss` of ``output.enc_coeffs`` / ``output.dec_coeffs`` (0 without them);
    - ``kl``: :func:`gaussian_kl`, a mean over latent elements; left out (reported as 0) when ``use_gaussian_kl`` is
      False, or, with ``use_gaussian_kl=None``, when the ``model`` passed says ``use_gaussian_kl = False``
      (e.g. ``WaveletVAE3D(prior="laplace")``);
    - extras: every entry of ``output.extra_losses``, weighted by ``extra_weights`` (names without a weight get 1.0);
    - ``perceptual``: ``perceptual(reconstruction, x)`` when a perceptual module is given.

    The terms also hold ``nll = recon_weight * recon + perceptual_weight * perceptual``, the part the VQGAN adaptive
    GAN weight is measured against. The adversarial terms (generator hinge loss with the adaptive weight, the
    discriminator's own step, ``discriminator_start``) need a second optimiser and are run by
    :class:`wdm3d.engine.VAEIteration` with :func:`generator_adversarial_loss`,
    :func:`discriminator_adversarial_loss` and :func:`adaptive_gan_weight`.

    Called MONAI-style, ``loss(output, target)``, so it can be a ``SupervisedTrainer``'s ``loss_function``.
    The weights are for *mean* reductions (see the module docstring for converting WF-VAE's summed weights).

    Args:
        recon_weight: weight of the L1 reconstruction term.
        wavelet_weight: weight of the wavelet pyramid loss (WF-VAE: 0.1; 0 hurts PSNR).
        kl_weight: weight of the per-element mean KL.
        extra_weights: weight per ``extra_losses`` name; default ``{"sparsity": 1e-4}``.
        perceptual: a perceptual module ``(input, target) -> scalar`` (e.g. :class:`Perceptual25DLoss`); None: off.
        perceptual_weight: its weight (WF-VAE's LPIPS: 1.0, later 0.1).
        use_gaussian_kl: add the KL term; None (default) asks the ``model`` given to the call (its
            ``use_gaussian_kl`` attribute) and adds it when there is none.

    Example:
        >>> loss_fn = VAELoss()
        >>> # total, terms = loss_fn(model(x), x, model=model)
    """

    def __init__(
        self,
        recon_weight: float = 1.0,
        wavelet_weight: float = 0.1,
        kl_weight: float = 1e-6,
        extra_weights: Mapping[str, float] | None = None,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        use_gaussian_kl: bool | None = None,
    ) -> None:
        super().__init__()
        extra_weights = {"sparsity": 1e-4} if extra_weights is None else dict(extra_weights)
        named = {"recon_weight": recon_weight, "wavelet_weight": wavelet_weight, "kl_weight": kl_weight,
                 "perceptual_weight": perceptual_weight,
                 **{f"extra_weights[{k!r}]": v for k, v in extra_weights.items()}}
        for name, value in named.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if perceptual is not None and not callable(perceptual):
            raise TypeError(f"perceptual must be a module (input, target) -> scalar, got {type(perceptual).__name__}.")
        self.recon_weight, self.wavelet_weight = float(recon_weight), float(wavelet_weight)
        self.kl_weight = float(kl_weight)
        self.extra_weights = {k: float(v) for k, v in extra_weights.items()}
        self.perceptual = perceptual
        self.perceptual_weight = float(perceptual_weight)
        if use_gaussian_kl is not None and not isinstance(use_gaussian_kl, bool):
            raise TypeError(f"use_gaussian_kl must be True, False or None, got {use_gaussian_kl!r}.")
        self.use_gaussian_kl = use_gaussian_kl

    def forward(
        self, output: VAEOutput, x: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator-side loss.

        Args:
            output: the autoencoder's :class:`VAEOutput` for ``x``.
            x: the input volumes (the target) ``(B, C, D, H, W)``.
            model: the autoencoder; read for ``use_gaussian_kl`` when the constructor left it None.

        Returns:
            ``(total, terms)``: the scalar to back-propagate and the unweighted scalar terms ``total``, ``recon``,
            ``wavelet``, ``kl``, ``perceptual``, ``nll`` and one per extra loss (every name in ``extra_weights`` is
            present, 0 when the model did not return it). The terms are still attached to the graph (the engine
            computes the adaptive GAN weight from ``terms["nll"]``); detach them to log.
        """
        if not isinstance(output, VAEOutput):
            raise TypeError(
                f"output must be a VAEOutput (the autoencoder's forward result), got {type(output).__name__}."
            )
        rec = output.reconstruction
        if rec.shape != x.shape:
            raise ValueError(f"reconstruction {tuple(rec.shape)} and input {tuple(x.shape)} must have the same shape.")
        zero = rec.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        terms["recon"] = (rec - x).abs().mean()
        # half-type pyramids give a float32 loss; .to(rec) would round it back to bf16 under autocast
        terms["wavelet"] = wavelet_pyramid_loss(output.enc_coeffs, output.dec_coeffs).to(device=rec.device)
        use_kl = self.use_gaussian_kl
        if use_kl is None:
            use_kl = bool(getattr(model, "use_gaussian_kl", True)) if model is not None else True
        terms["kl"] = gaussian_kl(output.posterior) if use_kl else zero
        total = self.recon_weight * terms["recon"] + self.wavelet_weight * terms["wavelet"]
        if use_kl:
            total = total + self.kl_weight * terms["kl"]
        for name in self.extra_weights:
            terms.setdefault(name, zero)
        for name, value in output.extra_losses.items():
            if name in LOSS_NAMES and name != "sparsity":
                raise ValueError(f"extra loss name {name!r} clashes with a VAELoss term; rename it in the model.")
            if not isinstance(value, torch.Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"extra loss {name!r} must be a scalar tensor (reduce it in the model), got {shape}.")
            terms[name] = value
            total = total + self.extra_weights.get(name, 1.0) * value
        nll = self.recon_weight * terms["recon"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(rec, x)
            nll = nll + self.perceptual_weight * terms["perceptual"]
            total = total + self.perceptual_weight * terms["perceptual"]
        else:
            terms["perceptual"] = zero
        terms["nll"] = nll
        terms["total"] = total
        return total, terms
