"""What the conditional wavelet-diffusion trainings need, one module per concept: paired samples
(:mod:`.datalist`), a context-conditioned U-Net (:mod:`.context_unet`), a prepare-batch with condition dropout
(:mod:`.prepare_batch`), the frozen base and image encoder (:mod:`.frozen`) and the adapter's own weights
(:mod:`.adapter`). The training forward is :class:`~wdm3d.diffusion.WaveletDiffusionInferer`, the same for the
conditional and the unconditional models.

Three conditional models share these pieces (``bundles/ip_adapter_brats``):

- the *base*: a :class:`~wdm3d.networks.WDMUNet` with cross-attention to context tokens of the target's modality and
  dataset (:class:`ContextConditionedUNet`), trained on every modality of every case, so one model covers all targets;
- the *IP-Adapter* (:class:`~wdm3d.networks.IPAdapter`) on the frozen base: the reference volume (T1n of the same
  patient) is an image prompt, the target modality the base context;
- the *concat* baseline (cWDM, arXiv 2411.17203): the reference's wavelet coefficients concatenated to the noisy
  input of a base trained from scratch with twice the input channels.

MONAI's ``SupervisedTrainer`` calls ``prepare_batch`` -> ``inferer(inputs, network, *args, **kwargs)`` -> ``loss``.
:class:`ConditionalPrepareBatch` returns ``(x0, target, (), kwargs)`` with ``noise``, ``timesteps`` and the
conditions (``context`` indices with dropped rows set to the null index, ``image`` + ``drop_image`` for the adapter,
``concat`` coefficients for the baseline); :class:`~wdm3d.diffusion.WaveletDiffusionInferer` noises ``x0`` and
calls the network with them.
"""

from .adapter import AdapterSaver, AdapterState
from .context_unet import ContextConditionedUNet
from .datalist import MODALITIES, expand_paired_datalist
from .frozen import IMAGE_ENCODERS, build_image_encoder, encoder_feature_grid, load_frozen_base
from .prepare_batch import CONDITIONING_MODES, ConditionalPrepareBatch

# run_config records a network's class by module path (artifacts.network_arguments): keep the public one, which
# the base checkpoints name, so resuming one does not report a changed network
ContextConditionedUNet.__module__ = __name__

__all__ = [
    "MODALITIES",
    "CONDITIONING_MODES",
    "IMAGE_ENCODERS",
    "expand_paired_datalist",
    "ContextConditionedUNet",
    "ConditionalPrepareBatch",
    "AdapterState",
    "AdapterSaver",
    "load_frozen_base",
    "build_image_encoder",
    "encoder_feature_grid",
]
