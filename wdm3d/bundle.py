"""Helpers for the MONAI bundles under ``bundles/``: where a bundle lives, and running one from Python."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_root", "bundle_config", "run_bundle"]

_REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def bundle_root(name: str) -> str:
    """The folder of bundle ``name``, so that a bundle writes inside itself wherever it is run from.

    The current directory if it is that bundle (``configs/metadata.json`` there names it), else
    ``bundles/<name>`` under the current directory, else the copy beside the installed ``wdm3d`` package
    (a source checkout). Override with ``--bundle_root`` to put outputs elsewhere.
    """
    here = Path.cwd()
    meta = here / "configs" / "metadata.json"
    if meta.is_file():
        try:
            if json.loads(meta.read_text()).get("name") == name:
                return str(here)
        except (OSError, json.JSONDecodeError):
            pass
    for candidate in (here / "bundles" / name, _REPO_BUNDLES / name):
        if (candidate / "configs").is_dir():
            return str(candidate)
    raise FileNotFoundError(
        f"Cannot find bundle {name!r}: run from the repository root or from the bundle folder, or pass --bundle_root."
    )


def bundle_config(name: str, filename: str) -> str:
    """Path of ``configs/<filename>`` of bundle ``name``."""
    path = Path(bundle_root(name)) / "configs" / filename
    if not path.is_file():
        raise FileNotFoundError(f"Bundle {name!r} has no config {path}.")
    return str(path)


def run_bundle(name: str, run_id: str, configs: Sequence[str], **overrides) -> object:
    """Run a bundle workflow like ``python -m monai.bundle run RUN_ID --config_file [...]`` would.

    Args:
        name: bundle folder name under ``bundles/``.
        run_id: the config key to run (``"training"``, ``"inference"``, ...).
        configs: config file names inside the bundle's ``configs/`` (later ones override earlier ones).
        overrides: config keys to override (``dataset_dir=...``, ``max_epochs=...``).
    """
    from monai.bundle import ConfigWorkflow

    files = [bundle_config(name, c) for c in configs]
    meta = bundle_config(name, "metadata.json")
    logging_file = os.path.join(bundle_root(name), "configs", "logging.conf")
    workflow = ConfigWorkflow(
        config_file=files, meta_file=meta, logging_file=logging_file if os.path.isfile(logging_file) else None,
        workflow_type=None, run_id=run_id, **overrides,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow
