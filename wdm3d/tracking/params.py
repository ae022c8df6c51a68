"""MLflow params: a bundle's settings read from its running config, and nested values flattened to strings.

A bundle does not list the settings it tracks: ``"settings": "$wdm3d.tracking.bundle_settings()"`` in its tracker
records every top-level setting of the config that runs (its files merged, command-line overrides applied), so a new
setting is tracked as soon as a config defines it.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..engine.config_check import running_parser

__all__ = ["BundleSettings", "bundle_settings", "config_settings", "flatten_params"]

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_CODE_PREFIXES = ("$", "@", "%")  # MONAI's expression, reference and macro prefixes
_WORKFLOW = ("imports", "initialize", "run", "finalize")  # what a MONAI bundle runs, not how


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` with values as strings (MLflow params are strings).

    Args:
        params: values by name; nested mappings become dotted names.
        prefix: put before every name (the nesting so far).

    Lists, booleans and None are written as JSON (``[1, 2]``, ``true``, ``null``), other values with ``str``; each
    value is cut to MLflow's limit of 6000 characters.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
        else:
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
            out[name] = text[:MAX_PARAM_LEN]
    return out


def _is_data(value: Any) -> bool:
    # a value written in a config file that is a setting as it stands (no expression, reference or component in it)
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return not value.startswith(_CODE_PREFIXES)
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, Mapping):
        return "_target_" not in value and all(isinstance(k, str) and _is_data(v) for k, v in value.items())
    return False


def _plain(value: Any) -> tuple[bool, Any]:
    # (True, value as JSON-like data) for what an expression evaluated to, (False, None) for an object (a network)
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if isinstance(value, Mapping):
        items = {k: _plain(v) for k, v in value.items() if isinstance(k, str)}
        return len(items) == len(value) and all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return False, None


def config_settings(parser: Any) -> dict[str, Any]:
    """The settings of a parsed MONAI bundle config: its top-level values that are data, as the run uses them.

    A top-level key is a setting when its value is data (a number, text, true / false, null, or a list or dict of
    these, overrides included), or a reference or expression that the run has already evaluated to data
    (``"intensity_range": "$wdm3d.data.intensity_range(@datalist)"``). Nothing is evaluated here (an expression may
    run the training: ``"training": "$@run"``), so an expression nothing used is left out. Components
    (``_target_``), expressions that give objects (``network``, ``device``), the workflow (``imports``,
    ``initialize``, ``run``, ``finalize``) and MONAI's own keys (``_meta_``) are not settings.

    Args:
        parser: the ``monai.bundle.ConfigParser`` of the running config.

    Returns:
        ``{key: value}`` in the config's order.
    """
    config = parser.get()
    if not isinstance(config, Mapping):
        raise TypeError(f"config_settings needs a ConfigParser holding a bundle config (a dict), got {type(config)}.")
    evaluated = parser.ref_resolver.resolved_content
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or key.startswith("_") or key in _WORKFLOW:
            continue
        if _is_data(value):
            out[key] = value
        elif isinstance(value, str) and value.startswith(("$", "@")) and key in evaluated:
            ok, plain = _plain(evaluated[key])
            if ok:
                out[key] = plain
    return out


class BundleSettings(Mapping):
    """The settings of a running bundle config (:func:`config_settings`), read each time they are asked for.

    A tracker built while the config is being instantiated reads them when its run starts, once the trainer and
    everything it needs have been evaluated.

    Args:
        parser: the ``monai.bundle.ConfigParser`` of the running config.
    """

    def __init__(self, parser: Any) -> None:
        if not hasattr(parser, "ref_resolver") or not hasattr(parser, "get"):
            raise TypeError(f"BundleSettings needs a monai.bundle.ConfigParser, got {type(parser).__name__}.")
        self.parser = parser

    def __getitem__(self, key: str) -> Any:
        return config_settings(self.parser)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(config_settings(self.parser))

    def __len__(self) -> int:
        return len(config_settings(self.parser))

    def __repr__(self) -> str:
        return f"BundleSettings({sorted(config_settings(self.parser))})"


def bundle_settings(parser: Any = None) -> BundleSettings:
    """The settings of the bundle config that evaluates this call: ``"$wdm3d.tracking.bundle_settings()"``.

    Args:
        parser: the ``monai.bundle.ConfigParser`` to read; None: the one evaluating this call (found on the call
            stack, as MONAI passes expressions nothing that names their config).

    Raises:
        RuntimeError: no parser given and none is evaluating this call.
    """
    parser = parser if parser is not None else running_parser()
    if parser is None:
        raise RuntimeError(
            "bundle_settings() reads the bundle config that evaluates it: call it from a config "
            '("settings": "$wdm3d.tracking.bundle_settings()") or pass the ConfigParser.'
        )
    return BundleSettings(parser)
