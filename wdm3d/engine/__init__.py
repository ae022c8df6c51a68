"""What MONAI's engines lack: resume-from-latest, weight loading, sampling during training, geometry helpers."""

from .checkpoint import ResumeFromLatest, TrainingCheckpoints, latest_checkpoint, load_checkpoint, load_network_weights
from .geometry import DataGeometry, reference_geometry
from .validation import SampleValidator

__all__ = ["ResumeFromLatest", "TrainingCheckpoints", "latest_checkpoint", "load_checkpoint", "load_network_weights", "SampleValidator", "DataGeometry", "reference_geometry"]
