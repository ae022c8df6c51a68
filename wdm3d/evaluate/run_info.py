"""The MLflow run that generated a folder of samples, found from the inference manifest and the training output."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

__all__ = ["find_run_info"]


def find_run_info(
    fake_dir: str | os.PathLike, mlflow_run_id: str | None = None, tracking_uri: str | None = None
) -> dict[str, str] | None:
    """The MLflow run that generated the samples in ``fake_dir``: ``{"run_id", "tracking_uri"}`` or None.

    Run id: ``mlflow_run_id``, else ``manifest.json``'s ``mlflow_run_id``. Tracking URI: ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else the ``mlflow_run.json`` (written by training) in the samples folder, its parent, or
    the folder above the manifest's checkpoint (the one naming the same run first).

    Args:
        fake_dir: the samples folder (an inference output).
        mlflow_run_id: the run to log to, instead of the manifest's.
        tracking_uri: the tracking server, instead of the one found beside the samples.
    """
    fake_dir = Path(fake_dir)
    manifest = {}
    if (fake_dir / "manifest.json").is_file():
        try:
            manifest = json.loads((fake_dir / "manifest.json").read_text())
        except json.JSONDecodeError:
            manifest = {}
    run_id = mlflow_run_id or manifest.get("mlflow_run_id")
    if not run_id:
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        candidates = [fake_dir, fake_dir.parent]
        if manifest.get("checkpoint"):
            candidates.append(Path(manifest["checkpoint"]).parent.parent)
        found = []
        for folder in candidates:
            f = folder / "mlflow_run.json"
            if f.is_file():
                try:
                    info = json.loads(f.read_text())
                except json.JSONDecodeError:
                    continue
                found.append(info)
        same = [i for i in found if i.get("run_id") == run_id] or found
        uri = same[0].get("tracking_uri") if same else None
    if not uri:
        warnings.warn(
            f"Found MLflow run {run_id} but no tracking URI (no mlflow_run.json beside the samples); pass "
            "--tracking-uri or set MLFLOW_TRACKING_URI to log the evaluation.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return {"run_id": str(run_id), "tracking_uri": str(uri)}
