"""MLflow tracking for the bundles: params, metric histories, previews, artifacts; safe against the usual traps.

- :class:`MLflowTracker` (``tracker``): the trainings' ignite handler, one run per launch, continued on resume,
  kept going through server outages;
- :func:`bundle_settings` / :func:`config_settings` and :func:`flatten_params` (``params``): the params a bundle
  logs, read from its running config rather than listed by hand;
- :func:`describe_network`, :func:`describe_optimizer`, ... (``description``): what a run is, as params;
- :func:`step_metrics` (``steps``): what is measured at a training step;
- :func:`default_tracking_uri` and :func:`log_to_run` (``runs``): where runs are stored, and logging to a run that
  exists (inference and evaluation to the training run of their checkpoint).

Tracking URI, in order: the ``tracking_uri`` argument, ``MLFLOW_TRACKING_URI``, an SQLite store in the output folder
(``sqlite:///<output_dir>/mlruns.db``, artifacts beside it in ``mlartifacts/``). Open it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db``.
"""

from .description import describe_datalist, describe_network, describe_optimizer, git_commit, versions
from .params import BundleSettings, bundle_settings, config_settings, flatten_params
from .runs import default_tracking_uri, log_to_run
from .steps import step_metrics
from .tracker import MLflowTracker

__all__ = [
    "BundleSettings",
    "MLflowTracker",
    "bundle_settings",
    "config_settings",
    "default_tracking_uri",
    "describe_datalist",
    "describe_network",
    "describe_optimizer",
    "flatten_params",
    "git_commit",
    "log_to_run",
    "step_metrics",
    "versions",
]
