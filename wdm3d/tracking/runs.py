"""Where MLflow runs are stored, and logging files to a run that already exists (inference to its training run)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["default_tracking_uri", "fail_fast_on_a_dead_server", "log_to_run"]


def default_tracking_uri(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else an SQLite store in ``output_dir``.

    Args:
        output_dir: the run's output folder (holds ``mlruns.db`` when nothing else is named).
        tracking_uri: an explicit URI, which wins.
    """
    if tracking_uri:
        return str(tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlruns.db")


def fail_fast_on_a_dead_server() -> None:
    """Keep a dead server from stalling a job for minutes of HTTP retries (settings the user made win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def log_to_run(
    run_info: Mapping[str, Any] | None,
    files: Sequence[str | os.PathLike],
    artifact_path: str,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Log files (and metrics) to an existing run, e.g. inference outputs to the training run they came from.

    Args:
        run_info: ``{"run_id", "tracking_uri"}`` (as :meth:`MLflowTracker.state_dict` stores in checkpoints);
            None or an empty run id does nothing.
        files: files to upload.
        artifact_path: folder inside the run's artifacts.
        metrics: optional metrics to log.

    Returns:
        True if everything was logged; False (with a warning) if MLflow could not be reached.
    """
    if not run_info or not run_info.get("run_id"):
        return False
    try:
        # mlflow takes seconds to import: only once something is logged
        from mlflow.tracking import MlflowClient

        fail_fast_on_a_dead_server()
        uri = run_info.get("tracking_uri")
        if isinstance(uri, str) and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            # (a client on a missing SQLite file would create it, and its folders, as a new empty store)
            raise FileNotFoundError(f"the run's SQLite store {uri[len('sqlite:///') :]} does not exist here")
        client = MlflowClient(tracking_uri=uri)
        for f in files:
            client.log_artifact(run_info["run_id"], str(f), artifact_path)
        for k, v in (metrics or {}).items():
            client.log_metric(run_info["run_id"], k, float(v))
        return True
    except Exception as err:
        warnings.warn(
            f"Could not log to MLflow run {run_info.get('run_id')} ({type(err).__name__}: {err}); "
            "the files are still on disk.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
