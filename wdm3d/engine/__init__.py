"""What MONAI's engines lack: exact resume, numerical guards, VAE(-GAN) iterations, sampling and reconstruction
checks during training, geometry helpers, seeds, and a check of command-line override keys.

Checkpoint files themselves (newest, ``weights_only`` loading, atomic save) are :mod:`wdm3d.artifacts`'s;
``latest_checkpoint`` and ``load_checkpoint`` are re-exported here for callers that import them from the engine.
"""

from ..artifacts import latest_checkpoint, load_checkpoint
from .checkpoint import ResumeFromLatest, RNGState, RunConfig, TrainingCheckpoints
from .config_check import check_cli_overrides, check_image_size, check_override_keys
from .geometry import DataGeometry, reference_geometry
from .guards import EMAHandler, GuardedIteration, NonFiniteTrainingError
from .seeding import derive_seed, seed_everything
from .vae_training import VAEIteration, VolumePrepareBatch
from .validation import ReconstructionValidator, SampleValidator

__all__ = [
    "ResumeFromLatest",
    "RNGState",
    "RunConfig",
    "TrainingCheckpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "check_override_keys",
    "check_cli_overrides",
    "check_image_size",
    "derive_seed",
    "seed_everything",
    "SampleValidator",
    "DataGeometry",
    "reference_geometry",
    "EMAHandler",
    "GuardedIteration",
    "NonFiniteTrainingError",
    "VAEIteration",
    "VolumePrepareBatch",
    "ReconstructionValidator",
]
