"""MLflow tracking for the bundles: params, metric histories, previews, artifacts; safe against the usual traps.

Why not MONAI's ``MLFlowHandler``: with no run name a new launch attaches to any unfinished (e.g. crashed) run of
the experiment, a crashed run is never marked FAILED, a resumed training cannot continue its own run, file stores
are rejected with mlflow >= 3, and an unreachable server stops training. :class:`MLflowTracker` gives every launch a
unique run, marks a run that raised as FAILED, saves its run id in the checkpoints (``state_dict``) so that a
resumed training continues the same run, and keeps training going when the server is down: a failed call pauses
MLflow for a cool-down (1 min, doubling up to 30 min), the metrics that could not be sent are kept and sent when it
answers again, and every metric also goes to ``output_dir/metrics.jsonl`` so nothing is lost locally.

Tracking URI, in order: the ``tracking_uri`` argument, ``MLFLOW_TRACKING_URI``, an SQLite store in the output folder
(``sqlite:///<output_dir>/mlruns.db``, artifacts beside it in ``mlartifacts/``). Open it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db``.
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

__all__ = ["MLflowTracker", "flatten_params", "default_tracking_uri", "log_to_run"]

logger = logging.getLogger(__name__)
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_MAX_TAG_LEN = 5000  # ... and on a tag value
_MAX_PENDING = 100_000  # metric values kept for a server that is down (the oldest go first; metrics.jsonl has all)
_BATCH = 1000  # MLflow's limit of metrics per log_batch


def default_tracking_uri(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """``tracking_uri`` if given, else ``MLFLOW_TRACKING_URI``, else an SQLite store in ``output_dir``."""
    if tracking_uri:
        return str(tracking_uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlruns.db")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` with values as strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
        else:
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


def _file_digest(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git_commit() -> str | None:
    import subprocess

    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def describe_network(network: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and the constructor settings a network exposes as attributes."""
    net = network.module if hasattr(network, "module") and isinstance(network.module, torch.nn.Module) else network
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    info: dict[str, Any] = {"class": type(net).__name__, "parameters": sum(p.numel() for p in net.parameters())}
    for attr in ("in_channels", "out_channels", "base_channels", "channel_mult", "num_res_blocks", "additive_skips",
                 "use_checkpoint"):
        if hasattr(net, attr):
            info[attr] = getattr(net, attr)
    return info


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class and the hyperparameters of the first parameter group."""
    group = optimizer.param_groups[0]
    return {"class": type(optimizer).__name__,
            **{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple))}}


class MLflowTracker:
    """Log a training run to MLflow (an ignite handler; also checkpointable through ``state_dict``).

    Logged:

    - params: ``params`` (flattened), the network / optimizer / diffusion settings, versions of wdm3d, monai, torch
      and mlflow, the git commit, the datalist's digest and size, the command line;
    - metrics: ``loss`` and per-subband ``loss_<SUBBAND>`` (when the output has ``pred``/``label`` with 8C
      channels), the terms of a composite loss as ``loss_<term>`` (``engine.state.loss_terms``), ``lr``, ``grad_norm``, ``throughput_volumes_per_s``, ``peak_gpu_memory_gb`` (CUDA) every
      ``log_every`` iterations; ``engine.state.metrics`` (e.g. validation statistics) every epoch;
    - artifacts: validation previews (via :meth:`log_preview`, given to ``SampleValidator`` as a callback), the
      bundle's config files, and at the end the final checkpoint (``log_checkpoint``) and ``artifacts`` (globs).

    Args:
        output_dir: the run's local output folder (SQLite store, ``metrics.jsonl``, ``mlflow_run.json``).
        tracking_uri: see :func:`default_tracking_uri`.
        experiment_name: MLflow experiment.
        run_name: None: ``<experiment>-<UTC time>-<6 hex>``, unique per launch.
        params: extra params (the bundle passes its settings).
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
        self.run_name = run_name or f"{experiment_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
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
                logger.warning("MLflow at %s failed while %s (%s: %s); training goes on.", self.tracking_uri, what,
                               type(err).__name__, err)
                return
            self._failures += 1
            self._backoff = min(max(2 * self._backoff, self.retry_after), 1800.0)
            self._down_until = time.monotonic() + self._backoff
            message = (f"MLflow at {self.tracking_uri} failed while {what} ({type(err).__name__}: {err}); training goes "
                       f"on, MLflow is retried in {self._backoff:.0f} s and the metrics meanwhile are kept for it; "
                       f"all of them also go to {self.output_dir / 'metrics.jsonl'}.")
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
                logger.warning("Cannot write %s (%s): local metric records stop; MLflow goes on.",
                               self.output_dir / "metrics.jsonl", err)

    def _start(self) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        # keep a dead server from stalling training for minutes of retries (the user's settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
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
                    self.run_id, self.tracking_uri, where)
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
            self._client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in self._all_params().items()])
            self._started = True
            logger.info("MLflow: run %s (%s) at %s", self.run_name, self.run_id, self.tracking_uri)
        if self._started and self.run_id and self.config_dir and self.config_dir.is_dir():
            for cfg in sorted(self.config_dir.glob("*.json")):
                self.log_artifact(cfg, "config")
        if self.run_id:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "mlflow_run.json").write_text(
                    json.dumps({"run_id": self.run_id, "run_name": self.run_name, "tracking_uri": self.tracking_uri,
                                "experiment_name": self.experiment_name}, indent=2)
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
        import mlflow

        old = run.data.params
        now = self._all_params()
        new = {k: v for k, v in now.items() if k not in old}
        changed = {k: v for k, v in now.items() if k in old and old[k] != v and k not in ("command", "git_commit")}
        if new:
            self._client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v) for k, v in new.items()])
        if changed:
            n = sum(1 for k in run.data.tags if k.startswith("wdm3d.resume")) + 1
            self._client.log_batch(self.run_id, tags=[
                mlflow.entities.RunTag(f"wdm3d.resume{n}.{k}"[:250], v[:_MAX_TAG_LEN]) for k, v in changed.items()])
            logger.warning("Resumed with changed settings (the run's params keep the first launch's values; the new "
                           "ones are tags wdm3d.resume%d.*): %s", n,
                           {k: (old[k], v) for k, v in changed.items()})

    def _all_params(self) -> dict[str, str]:
        import mlflow
        import monai

        from . import __version__

        params: dict[str, Any] = dict(self.params)
        if self.network is not None:
            params["network"] = describe_network(self.network)
        if self.optimizer is not None:
            params["optimizer"] = describe_optimizer(self.optimizer)
        if self.diffusion is not None and hasattr(self.diffusion, "config"):
            params["diffusion"] = self.diffusion.config()
        params["versions"] = {"wdm3d": __version__, "monai": monai.__version__, "torch": torch.__version__,
                              "mlflow": mlflow.__version__, "python": sys.version.split()[0]}
        params["git_commit"] = _git_commit() or "unknown"
        params["command"] = " ".join(sys.argv)[:_MAX_PARAM_LEN]
        if self.datalist and Path(self.datalist).is_file():
            data = json.loads(Path(self.datalist).read_text())
            params["datalist"] = {"path": str(self.datalist), "sha256": _file_digest(self.datalist),
                                  **{f"n_{k}": len(v) for k, v in data.items() if isinstance(v, list)}}
        return flatten_params(params)

    # -- ignite ----------------------------------------------------------------------------------------------------

    def attach(self, engine) -> None:
        """Attach before MONAI's StatsHandler: ignite stops at the first exception handler that re-raises."""
        from ignite.engine import Events

        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self._on_iteration)
        engine.add_event_handler(Events.TERMINATE, self._on_terminate)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

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
        from mlflow.entities import Metric

        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        # non-finite values are kept (a diverging loss is worth seeing): null in the JSON lines, as they are in MLflow
        self._local({"step": step, "time": time.time(),
                     **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}})
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
            logger.warning("MLflow was down long enough that the oldest %d metric values were not kept for it; "
                           "they are in %s.", self._dropped, self.output_dir / "metrics.jsonl")
            self._dropped = 0

    def _on_iteration(self, engine) -> None:
        from .diffusion.training import subband_mse, target_tensor

        out = engine.state.output
        metrics: dict[str, float] = {}
        if isinstance(out, Mapping):
            if "loss" in out:
                metrics["loss"] = float(torch.as_tensor(out["loss"]).detach().float().mean())
            pred, label = out.get("pred"), target_tensor(out.get("label"))
            levels = getattr(self.diffusion, "levels", 1)
            if isinstance(pred, torch.Tensor) and isinstance(label, torch.Tensor) and pred.shape == label.shape \
                    and pred.ndim == 5 and pred.shape[1] % 8**levels == 0:
                metrics.update({f"loss_{k}": v for k, v in subband_mse(pred, label, levels).items()})
        # the terms of a composite loss (VAEIteration: recon, wavelet, kl, adv_g, adv_d, ...)
        metrics.update({f"loss_{k}": float(v) for k, v in (getattr(engine.state, "loss_terms", None) or {}).items()})
        opt = getattr(engine, "optimizer", None)
        if opt is not None:
            metrics["lr"] = opt.param_groups[0]["lr"]
            guarded = engine.state.metrics.get("grad_norm_total")  # GuardedIteration's norm of this step
            grads = [] if guarded is not None else [
                p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if guarded is not None:
                metrics["grad_norm"] = float(guarded)
            elif grads:
                metrics["grad_norm"] = float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g.detach().float()) for g in grads])))
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
        return {k: v for k, v in engine.state.metrics.items()
                if isinstance(v, (int, float)) and (fresh or not k.startswith("val_"))}

    def _on_epoch(self, engine) -> None:
        metrics = self._state_metrics(engine)
        metrics["epoch"] = engine.state.epoch
        self._log_metrics(metrics, engine.state.iteration)

    def log_preview(self, engine, png: str | os.PathLike, volumes=None) -> None:
        """``SampleValidator`` callback: log a validation montage under ``validation/``."""
        self.log_artifact(png, "validation")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
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
            from .engine.checkpoint import latest_checkpoint

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
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.tracking_uri)
                self._client.set_terminated(self.run_id, status=status)
                logger.info("MLflow: run %s ended as %s", self.run_id, status)
        if self._pending:
            logger.warning("%d metric values could not be sent to MLflow; they are in %s.", len(self._pending),
                           self.output_dir / "metrics.jsonl")


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
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        uri = run_info.get("tracking_uri")
        if isinstance(uri, str) and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # (a client on a missing SQLite file would create it, and its folders, as a new empty store)
            raise FileNotFoundError(f"the run's SQLite store {uri[len('sqlite:///'):]} does not exist here")
        client = MlflowClient(tracking_uri=uri)
        for f in files:
            client.log_artifact(run_info["run_id"], str(f), artifact_path)
        for k, v in (metrics or {}).items():
            client.log_metric(run_info["run_id"], k, float(v))
        return True
    except Exception as err:
        warnings.warn(f"Could not log to MLflow run {run_info.get('run_id')} ({type(err).__name__}: {err}); "
                      "the files are still on disk.", RuntimeWarning, stacklevel=2)
        return False
