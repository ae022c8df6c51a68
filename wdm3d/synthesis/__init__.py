"""Image-conditioned generation for bundles: paired cross-modality synthesis and reference-guided generation.

Two modes of :class:`ConditionalSynthesis`:

- ``"paired"``: for each case of a datalist split, take its reference volume (e.g. T1n) and generate the target
  modality (e.g. T2w) of the same patient, written as NIfTI on the reference's voxel grid with its header geometry
  (qform and sform, each with its code), a PNG (reference | synthesis | truth), ``manifest.json``, and where the
  true target exists PSNR / SSIM / MAE per case and their mean and standard deviation (``metrics.json``). A failing
  case is reported and the rest continue.
- ``"reference_guided"``: for each reference, ``num_samples`` new volumes of the reference's modality at each image
  prompt strength lambda in ``ip_scales``, with the same seeds at every lambda (lambda = 0 is the base model: the
  unconditional samples of the comparison). Reported: SSIM / PSNR of each sample to its reference, to the other
  cases of the split (same modality), and between the samples of one reference (diversity).

Three methods generate: ``"ip_adapter"`` (the IP-Adapter on the frozen context-conditioned base; guidance scale and
lambda settable), ``"concat"`` (the cWDM-style baseline: reference coefficients concatenated to the noisy input) and
``"base"`` (the base alone, conditioned on the target modality only: unconditional with respect to the reference).
Metrics are computed in the diffusion range [-1, 1] on the ``image_size`` grid, over the whole volume (background
included, as in the autoencoder bundles).
"""

from .conditional import SYNTHESIS_METHODS, SYNTHESIS_MODES, ConditionalSynthesis
from .grid import ReferenceGrid, axis_positions, reference_grid, restore_grid

__all__ = [
    "ConditionalSynthesis",
    "ReferenceGrid",
    "SYNTHESIS_METHODS",
    "SYNTHESIS_MODES",
    "axis_positions",
    "reference_grid",
    "restore_grid",
]
