"""Evaluate synthetic volumes against real ones: 3D FID, MS-SSIM diversity, distribution checks, memorization audit.

Used by ``wdm3d evaluate`` and by the bundles' ``configs/evaluate.json``. Writes ``results.json``, ``report.md`` and
PNG plots to the output folder, and logs the metrics and the report to the MLflow run that generated the samples
(``mlflow_run_id`` of the inference ``manifest.json``; the tracking URI from the training output's
``mlflow_run.json``). See :func:`evaluate` for what each metric reports.
"""

from .evaluation import Evaluator, evaluate
from .features import FEATURE_EXTRACTORS, build_feature_extractor
from .run_info import find_run_info
from .samples import check_sample_folder, load_volumes

__all__ = [
    "load_volumes",
    "check_sample_folder",
    "build_feature_extractor",
    "find_run_info",
    "evaluate",
    "Evaluator",
    "FEATURE_EXTRACTORS",
]
