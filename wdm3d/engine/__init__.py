"""What MONAI's engines lack: exact resume, safe weight loading, numerical guards, VAE(-GAN) iterations,
sampling and reconstruction checks during training,
geometry helpers, and a check of command-line override keys."""

from ..artifacts import (
    FORMAT_VERSION,
    check_state_fits,
    latest_checkpoint,
    load_checkpoint,
    load_network_weights,
    network_arguments,
)
from .checkpoint import ResumeFromLatest, RNGState, RunConfig, TrainingCheckpoints
from .config_check import check_override_keys, check_cli_overrides, seed_everything
from .geometry import DataGeometry, reference_geometry
from .guards import EMAHandler, GuardedIteration, NonFiniteTrainingError
from .vae_training import VAEIteration, VolumePrepareBatch
from .validation import ReconstructionValidator, SampleValidator

__all__ = [
    "FORMAT_VERSION", "ResumeFromLatest", "RNGState", "RunConfig", "TrainingCheckpoints", "check_state_fits",
    "latest_checkpoint", "load_checkpoint", "load_network_weights", "network_arguments", "check_override_keys",
    "check_cli_overrides", "seed_everything", "SampleValidator", "DataGeometry", "reference_geometry",
    "EMAHandler", "GuardedIteration", "NonFiniteTrainingError", "VAEIteration", "VolumePrepareBatch",
    "ReconstructionValidator",
]
