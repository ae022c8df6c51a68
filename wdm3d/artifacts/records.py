"""What a checkpoint records about its training (network settings, diffusion process) and the checks on it."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .unwrap import unwrap

__all__ = ["check_diffusion_matches", "network_arguments", "plain"]


# diffusion settings a sampler may choose freely: the DDPM posterior variance, and how training drew its times and
# weighted its loss (time_shift also sets the sampling grid, which any grid may replace)
_FREE_AT_SAMPLING = (
    "ddpm_variance",
    "rflow_sample_method",
    "loss_weighting",
    "min_snr_gamma",
    "flow_map_equal_fraction",
    "flow_map_time",
    "flow_map_time_mean",
    "time_shift",
)


def check_diffusion_matches(checkpoint: Mapping[str, Any], diffusion: Any, path: str | os.PathLike) -> None:
    """Refuse to sample a checkpoint with another diffusion process than it was trained with.

    The network learnt one process (ddpm or rectified flow, its prediction type, schedule, wavelet scaling); another
    one samples without an error but gives wrong volumes. Compares the settings the checkpoint's ``run_config``
    recorded (nothing to compare for checkpoints without it) with ``diffusion.config()``.

    Raises:
        ValueError: naming each differing setting and the overrides that select the trained process.
    """
    run_config = checkpoint.get("run_config")
    trained = run_config.get("diffusion") if isinstance(run_config, Mapping) else None
    if not isinstance(trained, Mapping) or not trained or not hasattr(diffusion, "config"):
        return
    now = plain(diffusion.config())
    params = inspect.signature(type(diffusion)).parameters

    def value(config: Mapping[str, Any], key: str) -> Any:  # config() leaves out some settings at their default
        return plain(config[key]) if key in config else plain(params[key].default)  # (flow_map, time_shift)

    keys = [k for k in {**trained, **now} if (k in trained and k in now) or k in params]
    changed = {
        k: (value(trained, k), value(now, k))
        for k in keys
        if k not in _FREE_AT_SAMPLING and value(trained, k) != value(now, k)
    }
    if not changed:
        return
    fix = " ".join(f"--diffusion#{k} {json.dumps(changed[k][0])}" for k in changed if k in params)
    sampler = " and a sampler for it (--sampler rflow)" if changed.get("process", (None,))[0] == "rflow" else ""
    raise ValueError(
        f"Checkpoint {path} was trained with other diffusion settings than this config samples with (trained, now): "
        f"{changed}. Sampling would run without an error and give wrong volumes. Set the trained ones"
        f"{f' ({fix})' if fix else ''}{sampler}"
        + (
            ". A checkpoint of WDM's recipe (trained before the defaults changed, or imported with wdm3d import-wdm): "
            "add configs/wdm_paper.json to --config_file"
            if trained.get("process") == "ddpm"
            else "."
        )
    )


def plain(value: Any) -> Any:
    """``value`` as JSON-like plain types (what a checkpoint may hold to load with ``weights_only=True``)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def network_arguments(network: torch.nn.Module) -> dict[str, Any]:
    """The constructor settings of ``network`` that can be read back from it (class name, widths, groups, ...)."""
    net = unwrap(network)
    out: dict[str, Any] = {"class": f"{type(net).__module__}.{type(net).__qualname__}"}
    try:
        params = inspect.signature(type(net).__init__).parameters
    except (TypeError, ValueError):
        params = {}
    for name in params:
        if name != "self" and hasattr(net, name) and not callable(getattr(net, name)):
            out[name] = plain(getattr(net, name))
    if "norm_num_groups" in params and "norm_num_groups" not in out:
        norm = next((m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)), None)
        if norm is not None:
            out["norm_num_groups"] = norm.num_groups
    if "dropout" in params and "dropout" not in out:
        drop = next((m for m in net.modules() if isinstance(m, torch.nn.Dropout)), None)
        if drop is not None:
            out["dropout"] = drop.p
    return out
