"""The MLflow handler of the bundles' trainings: params, metric histories, previews, artifacts; safe against the
usual traps.

One module because it is one handler class whose methods share its run state (run id, pending metrics, server health).

Why not MONAI's ``MLFlowHandler``: with no run name a new launch attaches to any unfinished (e.g. crashed) run of
the experiment, a crashed run is never marked FAILED, a resumed training cannot continue its own run, file stores
are rejected with mlflow >= 3, and an unreachable server stops training. :class:`MLflowTracker` gives every launch a
unique run, marks a run that raised as FAILED, saves its run id in the checkpoints (``state_dict``) so that a
resumed training continues the same run, and keeps training going when the server is down: a failed call pauses
MLflow for a cool-down (1 min, doubling up to 30 min), the metrics that could not be sent are kept and sent when it
answers again, and every metric also goes to ``output_dir/metrics.jsonl`` so nothing is lost locally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from ..artifacts import latest_checkpoint
from .description import describe_datalist, describe_network, describe_optimizer, git_commit, versions
from .params import MAX_PARAM_LEN, flatten_params
from .runs import default_tracking_uri, fail_fast_on_a_dead_server
from .steps import step_metrics

__all__ = ["MLflowTracker"]

logger = logging.getLogger(__name__)
_MAX_TAG_LEN = 5000  # MLflow's limit on a tag value
_MAX_PENDING = 100_000  # metric values kept for a server that is down (the oldest go first; metrics.jsonl has all)
_BATCH = 1000  # MLflow's limit of metrics per log_batch
_PARAM_BATCH = 100  # ... and of params (or tags) per log_batch


class MLflowTracker:
    """Log a training run to MLflow (an ignite handler; also checkpointable through ``state_dict``).

    Logged:

    - params: ``settings`` and ``params`` (flattened), the network / optimizer / diffusion settings, versions of
      wdm3d, monai, torch and mlflow, the git commit, the datalist's digest and size, the command line;
    - metrics: :func:`~wdm3d.tracking.steps.step_metrics` (loss, per subband too, a composite loss's terms,
      ``lr``, ``grad_norm``), ``throughput_volumes_per_s`` and ``peak_gpu_memory_gb`` (CUDA) every ``log_every``
      iterations; ``engine.state.metrics`` (e.g. validation statistics) every epoch;
    - artifacts: validation previews (via :meth:`log_preview`, given to ``SampleValidator`` as a callback), the
      bundle's config files, and at the end the final checkpoint (``log_checkpoint``) and ``artifacts`` (globs).

    Args:
        output_dir: the run's local output folder (SQLite store, ``metrics.jsonl``, ``mlflow_run.json``).
        tracking_uri: see :func:`default_tracking_uri`.
        experiment_name: MLflow experiment.
        run_name: None: ``<experiment>-<UTC time>-<6 hex>``, unique per launch.
        settings: the run's settings, read when the run starts (the bundles pass
            :func:`~wdm3d.tracking.bundle_settings`: every top-level setting of the running config).
        params: more params, e.g. values derived from objects (they win over ``settings`` of the same name).
        network, optimizer, diffusion: described in the params.
        datalist: its SHA-256 and entry counts go into the params.
        config_dir: every ``*.json`` in it is logged as an artifact under ``config/``.
        artifacts: glob patterns (relative to ``output_dir``) logged at the end, e.g. ``["samples/*"]``.
        log_every: iterations between metric logs.
        log_checkpoint: log the newest checkpoint in ``checkpoint_dir`` at the end.
        checkpoint_dir: where the checkpoints are.
        enabled: False turns tracking off entirely (e.g. ranks > 0).
        tags: extra run tags.
        retry_after: seconds MLflow is left alone after a failed call (doubling on each further failure, up to 30
            min); the metrics of that time are sent when it answers again.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment_name: str = "wdm3d",
        run_name: str | None = None,
        settings: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        network: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        diffusion: Any = None,
        datalist: str | os.PathLike | None = None,
        config_dir: str | os.PathLike | None = None,
        artifacts: Sequence[str] = (),
        log_every: int = 10,
        log_checkpoint: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
        retry_after: float = 60.0,
    ) -> None:
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive number of iterations, got {log_every!r}.")
        self.output_dir = Path(output_dir)
        self.tracking_uri = default_tracking_uri(output_dir, tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = (
            run_name or f"{experiment_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        )
        self.settings = settings
        self.params = dict(params or {})
        self.network, self.optimizer, self.diffusion = network, optimizer, diffusion
        self.datalist = datalist
        self.config_dir = Path(config_dir) if config_dir else None
        self.artifacts = list(artifacts)
        self.log_every = log_every
        self.log_checkpoint = log_checkpoint
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.enabled = enabled
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self.resumed = False
        self.retry_after = float(retry_after)
        self._client = None
        self._started = False  # the run exists (created or continued) and has its params
        self._down_until = 0.0  # time.monotonic() before which MLflow is not called
        self._backoff = 0.0
        self._failures = 0
        self._pending: list[Any] = []  # mlflow Metric objects not sent yet
        self._dropped = 0
        self._local_failed = False
        self._restored_uri: str | None = None
        self._val_round_logged = 0
        self._last_time: float | None = None
        self._last_iter = 0

    # -- checkpointing: the run id travels with the checkpoints, so a resumed training continues its run -----------

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id or "", "tracking_uri": self.tracking_uri, "experiment_name": self.experiment_name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("run_id"):
            self.run_id = str(state["run_id"])
            self._restored_uri = str(state.get("tracking_uri") or "")
            self.resumed = True

    # -- MLflow calls, each guarded: a failure pauses MLflow for a cool-down, training goes on ----------------------

    @property
    def remote_available(self) -> bool:
        """False while MLflow is paused after a failed call."""
        return time.monotonic() >= self._down_until

    @contextmanager
    def _remote(self, what: str, force: bool = False, pause: bool = True):
        # force: call even during a cool-down (the run's final status, once). pause: a failure pauses MLflow (False
        # for uploads: an artifact store that refuses a file says nothing about the metrics)
        if not force and not self.remote_available:
            yield False
            return
        try:
            yield True
        except Exception as err:  # network errors, server errors, mlflow exceptions
            if not pause:
                logger.warning(
                    "MLflow at %s failed while %s (%s: %s); training goes on.",
                    self.tracking_uri,
                    what,
                    type(err).__name__,
                    err,
                )
                return
            self._failures += 1
            self._backoff = min(max(2 * self._backoff, self.retry_after), 1800.0)
            self._down_until = time.monotonic() + self._backoff
            message = (
                f"MLflow at {self.tracking_uri} failed while {what} ({type(err).__name__}: {err}); training goes "
                f"on, MLflow is retried in {self._backoff:.0f} s and the metrics meanwhile are kept for it; "
                f"all of them also go to {self.output_dir / 'metrics.jsonl'}."
            )
            if self._failures == 1:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
        else:
            if self._backoff:
                logger.info("MLflow at %s answers again (%s).", self.tracking_uri, what)
            self._backoff = 0.0

    def _local(self, record: dict) -> None:
        # metrics.jsonl: a full or read-only disk warns once and does not stop training (the checkpoints will say so)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as err:
            if not self._local_failed:
                self._local_failed = True
                logger.warning(
                    "Cannot write %s (%s): local metric records stop; MLflow goes on.",
                    self.output_dir / "metrics.jsonl",
                    err,
                )

    def _start(self) -> None:
        # mlflow takes seconds to import: only once a run starts (not with --mlflow false, not on ranks > 0)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        fail_fast_on_a_dead_server()
        with self._remote("starting the run") as ok:
            if not ok:
                return
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            if self.run_id:
                try:
                    run = self._client.get_run(self.run_id)
                    gone = run.info.lifecycle_stage == "deleted"
                except MlflowException as err:
                    if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    run, gone = None, True
                if not gone:
                    self._client.update_run(self.run_id, status="RUNNING")
                    self._log_changed_params(run)
                    self._started = True
                    logger.info("MLflow: continuing run %s (%s)", run.info.run_name, self.run_id)
                    return
                where = f"{self.run_id}@{self._restored_uri or 'unknown'}"
                logger.warning(
                    "MLflow run %s from the checkpoint is not in %s (the output folder moved, another tracking URI, "
                    "or the run was deleted): a new run is started, tagged wdm3d.resumed_from=%s.",
                    self.run_id,
                    self.tracking_uri,
                    where,
                )
                self.tags["wdm3d.resumed_from"] = where
                self.run_id = None
            exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                location = None
                if self.tracking_uri.startswith("sqlite:"):
                    location = (self.output_dir.resolve() / "mlartifacts").as_uri()
                exp_id = self._client.create_experiment(self.experiment_name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            tags = {"mlflow.source.name": "wdm3d", **self.tags}
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(self._all_params())
            self._started = True
            logger.info("MLflow: run %s (%s) at %s", self.run_name, self.run_id, self.tracking_uri)
        if self._started and self.run_id and self.config_dir and self.config_dir.is_dir():
            for cfg in sorted(self.config_dir.glob("*.json")):
                self.log_artifact(cfg, "config")
        if self.run_id:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "mlflow_run.json").write_text(
                    json.dumps(
                        {
                            "run_id": self.run_id,
                            "run_name": self.run_name,
                            "tracking_uri": self.tracking_uri,
                            "experiment_name": self.experiment_name,
                        },
                        indent=2,
                    )
                )
            except OSError as err:
                logger.warning("Cannot write %s (%s).", self.output_dir / "mlflow_run.json", err)

    def _log_changed_params(self, run) -> None:
        # a resumed launch: MLflow refuses to change a param, so new settings become params and changed ones tags.
        # Best effort: a failure here must not keep the run from being continued (and its metrics from being sent)
        try:
            self._record_changed_params(run)
        except Exception as err:
            logger.warning("MLflow: could not record the settings changed on resume (%s: %s).", type(err).__name__, err)

    def _record_changed_params(self, run) -> None:
        old = run.data.params
        now = self._all_params()
        new = {k: v for k, v in now.items() if k not in old}
        changed = {k: v for k, v in now.items() if k in old and old[k] != v and k not in ("command", "git_commit")}
        if new:
            self._log_params(new)
        if changed:
            n = sum(1 for k in run.data.tags if k.startswith("wdm3d.resume")) + 1
            self._log_params({f"wdm3d.resume{n}.{k}"[:250]: v[:_MAX_TAG_LEN] for k, v in changed.items()}, tags=True)
            logger.warning(
                "Resumed with changed settings (the run's params keep the first launch's values; the new "
                "ones are tags wdm3d.resume%d.*): %s",
                n,
                {k: (old[k], v) for k, v in changed.items()},
            )

    def _log_params(self, values: Mapping[str, str], tags: bool = False) -> None:
        # in batches of MLflow's limit (a bundle's settings with the descriptions pass it)
        # mlflow takes seconds to import: only once a run starts
        from mlflow.entities import Param, RunTag

        entity = RunTag if tags else Param
        items = [entity(k, v) for k, v in values.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            chunk = items[i : i + _PARAM_BATCH]
            self._client.log_batch(self.run_id, **({"tags": chunk} if tags else {"params": chunk}))

    def _all_params(self) -> dict[str, str]:
        # mlflow takes seconds to import: only once a run starts
        import mlflow

        params: dict[str, Any] = {**dict(self.settings or {}), **self.params}
        if self.network is not None:
            params["network"] = describe_network(self.network)
        if self.optimizer is not None:
            params["optimizer"] = describe_optimizer(self.optimizer)
        if self.diffusion is not None and hasattr(self.diffusion, "config"):
            params["diffusion"] = self.diffusion.config()
        params["versions"] = versions(mlflow.__version__)
        params["git_commit"] = git_commit() or "unknown"
        params["command"] = " ".join(sys.argv)[:MAX_PARAM_LEN]
        if self.datalist and Path(self.datalist).is_file():
            params["datalist"] = describe_datalist(self.datalist)
        return flatten_params(params)

    # -- ignite ----------------------------------------------------------------------------------------------------

    def attach(self, engine) -> None:
        """Attach before MONAI's StatsHandler: ignite stops at the first exception handler that re-raises."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self._on_iteration)
        engine.add_event_handler(Events.TERMINATE, self._on_terminate)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_started(self, engine) -> None:
        # registered now, after every handler has attached, so that they run last at each epoch's end and at the end
        # of training, and log what other handlers (validation) computed then rather than before
        if not engine.has_event_handler(self._on_epoch, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
        if not engine.has_event_handler(self._on_completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._on_completed)
        self._start()
        self._last_time, self._last_iter = time.perf_counter(), engine.state.iteration
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # mlflow takes seconds to import: only once a run starts
        from mlflow.entities import Metric

        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        # non-finite values are kept (a diverging loss is worth seeing): null in the JSON lines, as they are in MLflow
        self._local(
            {"step": step, "time": time.time(), **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}
        )
        now = int(time.time() * 1000)
        self._pending += [Metric(k, v, now, step) for k, v in metrics.items()]
        if len(self._pending) > _MAX_PENDING:
            self._dropped += len(self._pending) - _MAX_PENDING
            del self._pending[: len(self._pending) - _MAX_PENDING]
        self._flush()

    def _flush(self, force: bool = False) -> None:
        # send the pending metrics, oldest first; (re)start the run first if that failed before. force: try even
        # during a cool-down (once, at the end of training)
        if not force and not self.remote_available:
            return
        if not self._started:
            if force:
                self._down_until = 0.0
            self._start()
            if not self._started:
                return
        with self._remote("logging metrics", force=force) as ok:
            while ok and self._pending:
                chunk = self._pending[:_BATCH]
                self._client.log_batch(self.run_id, metrics=chunk)
                del self._pending[: len(chunk)]
        if self._dropped and not self._pending:
            logger.warning(
                "MLflow was down long enough that the oldest %d metric values were not kept for it; they are in %s.",
                self._dropped,
                self.output_dir / "metrics.jsonl",
            )
            self._dropped = 0

    def _on_iteration(self, engine) -> None:
        metrics = step_metrics(engine, getattr(self.diffusion, "levels", 1))
        now = time.perf_counter()
        iters = engine.state.iteration - self._last_iter
        batch = getattr(getattr(engine, "data_loader", None), "batch_size", None)
        if iters > 0 and batch and self._last_time is not None and now > self._last_time:
            metrics["throughput_volumes_per_s"] = iters * batch / (now - self._last_time)
        self._last_time, self._last_iter = now, engine.state.iteration
        if torch.cuda.is_available():
            metrics["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self._log_metrics(metrics, engine.state.iteration)

    def _state_metrics(self, engine) -> dict[str, float]:
        # engine.state.metrics; the validators' val_* only from a round not logged yet (they stay in the state after
        # their round and were logged again every epoch, as if new)
        fresh = getattr(engine.state, "val_round", 0) > self._val_round_logged
        self._val_round_logged = getattr(engine.state, "val_round", 0)
        return {
            k: v
            for k, v in engine.state.metrics.items()
            if isinstance(v, (int, float)) and (fresh or not k.startswith("val_"))
        }

    def _on_epoch(self, engine) -> None:
        metrics = self._state_metrics(engine)
        metrics["epoch"] = engine.state.epoch
        self._log_metrics(metrics, engine.state.iteration)

    def log_preview(self, engine, png: str | os.PathLike, volumes=None) -> None:
        """``SampleValidator`` callback: log a validation montage under ``validation/``."""
        self.log_artifact(png, "validation")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file to the run (nothing before the run started or with tracking off; a failure only warns).

        Args:
            path: the file.
            artifact_path: the folder inside the run's artifacts; None: their root.
        """
        if self.run_id is None or not self.enabled or not self._started:
            return
        with self._remote(f"uploading {path}", pause=False) as ok:
            if ok:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def _on_completed(self, engine) -> None:
        # registered at STARTED, so it runs after the other COMPLETED handlers (the final validation round)
        fresh = {k: v for k, v in self._state_metrics(engine).items() if k.startswith("val_")}
        if fresh:
            self._log_metrics(fresh, engine.state.iteration)
        if self.log_checkpoint and self.checkpoint_dir is not None:
            ckpt = latest_checkpoint(self.checkpoint_dir)
            if ckpt is not None:
                self.log_artifact(ckpt, "checkpoints")
        for pattern in self.artifacts:
            for path in sorted(self.output_dir.glob(pattern)):
                if path.is_file():
                    self.log_artifact(path, str(path.parent.relative_to(self.output_dir)))
        self._end("FINISHED")

    def _on_terminate(self, engine) -> None:
        # stopped by SIGTERM (pre-emption): the run is not finished; a resumed launch sets it RUNNING again
        if getattr(engine.state, "stopped_by_signal", False):
            self._end("KILLED")

    def _on_exception(self, engine, err: BaseException) -> None:
        self._end("FAILED" if not isinstance(err, KeyboardInterrupt) else "KILLED")
        raise err

    def _end(self, status: str) -> None:
        # tried once whatever the cool-down (a run left RUNNING looks alive forever), after a last flush
        if self.run_id is None:
            return
        self._flush(force=True)
        with self._remote("ending the run", force=True) as ok:
            if ok:
                if self._client is None:  # failed before the tracker started (a handler before it raised)
                    # mlflow takes seconds to import: only once a run ends that never started
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.tracking_uri)
                self._client.set_terminated(self.run_id, status=status)
                logger.info("MLflow: run %s ended as %s", self.run_id, status)
        if self._pending:
            logger.warning(
                "%d metric values could not be sent to MLflow; they are in %s.",
                len(self._pending),
                self.output_dir / "metrics.jsonl",
            )
