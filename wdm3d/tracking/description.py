"""What a training run is, as MLflow params: its network, optimizer, datalist, code and library versions."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import monai
import torch

from .. import __version__
from ..artifacts import unwrap

__all__ = ["describe_datalist", "describe_network", "describe_optimizer", "git_commit", "versions"]

_NETWORK_SETTINGS = (
    "in_channels",
    "out_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "additive_skips",
    "use_checkpoint",
)


def describe_network(network: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and the constructor settings a network exposes as attributes.

    Args:
        network: the network, also inside DistributedDataParallel or torch.compile (described as the inner one).
    """
    net = unwrap(network)
    info: dict[str, Any] = {"class": type(net).__name__, "parameters": sum(p.numel() for p in net.parameters())}
    for attr in _NETWORK_SETTINGS:
        if hasattr(net, attr):
            info[attr] = getattr(net, attr)
    return info


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Class and the hyperparameters of the first parameter group.

    Args:
        optimizer: any torch optimizer.
    """
    group = optimizer.param_groups[0]
    return {
        "class": type(optimizer).__name__,
        **{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool, tuple))},
    }


def describe_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Path, SHA-256 and the number of entries of each list in a datalist file (``n_training``, ...).

    Args:
        path: a datalist JSON file.
    """
    data = json.loads(Path(path).read_text())
    return {
        "path": str(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        **{f"n_{k}": len(v) for k, v in data.items() if isinstance(v, list)},
    }


def git_commit() -> str | None:
    """The commit of the wdm3d source tree, ``-dirty`` when tracked files changed; None outside a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout: the commit is unknown
        pass
    return None


def versions(mlflow_version: str) -> dict[str, str]:
    """The versions of wdm3d, monai, torch, mlflow and python.

    Args:
        mlflow_version: ``mlflow.__version__`` (passed in: mlflow is imported only once a run starts).
    """
    return {
        "wdm3d": __version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "mlflow": mlflow_version,
        "python": sys.version.split()[0],
    }
