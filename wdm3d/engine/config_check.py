"""Fail on misspelt override keys and on an image size the network cannot take.

``monai.bundle run ... --bacth_size 2`` silently adds a new key ``bacth_size`` and trains with the default batch
size; :func:`check_cli_overrides` (called from a bundle's ``initialize``) stops such a run, naming the unknown key
and the closest known one. It also reads ``--mlflow false`` as ``False``: the bundle runner passes lowercase
``false`` / ``true`` / ``null`` on as text, and the text ``"false"`` counts as true. :func:`check_image_size`
(called by :class:`~wdm3d.engine.RunConfig` and the inference generator as the bundle config is instantiated) refuses
an ``image_size`` that the wavelet levels and the U-Net's depth cannot divide, naming the sizes that work, before the
first training step fails on a tensor shape.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import logging
import pydoc
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

__all__ = ["check_override_keys", "check_cli_overrides", "check_image_size", "config_ids", "running_parser"]

logger = logging.getLogger(__name__)

# arguments of ``monai.bundle run`` itself, not config overrides
_RUN_ARGS = {
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_name",
    "workflow_type",
    "properties_path",
}


def check_image_size(
    image_size: Sequence[int],
    levels: int,
    channel_mult: Sequence[int],
    size_name: str = "image_size",
) -> None:
    """Refuse a volume size that the wavelet levels and the U-Net's depth cannot divide.

    Each wavelet level halves the grid, so the U-Net sees ``image_size / 2**levels``; its ``len(channel_mult) - 1``
    downsamplings then need that divisible by ``2**(len(channel_mult) - 1)``. Every side of ``image_size`` must
    therefore be a multiple of ``2**(levels + len(channel_mult) - 1)``.

    Args:
        image_size: ``(D, H, W)`` of what the diffusion runs on (the image, or the latent for latent diffusion).
        levels: wavelet levels of the diffusion (``diffusion#levels``).
        channel_mult: the U-Net's width multipliers, one per resolution (``network_def#channel_mult``).
        size_name: what to call ``image_size`` in the message (e.g. ``"latent size"``).

    Raises:
        ValueError: naming image_size, levels and channel_mult, the grid the U-Net would see, the smallest valid size,
            the nearest valid sizes around each side that does not fit, and the deepest channel_mult that would fit.
    """
    sizes = [int(s) for s in image_size]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"{size_name} must be positive sizes (D, H, W), got {list(image_size)}.")
    if not isinstance(levels, int) or levels < 0:
        raise ValueError(f"levels must be a non-negative integer, got {levels!r}.")
    mult = [int(m) for m in channel_mult]
    if not mult:
        raise ValueError("channel_mult must name at least one resolution.")
    step = 2 ** (levels + len(mult) - 1)
    bad = sorted({s for s in sizes if s % step})
    if not bad:
        return
    factor = 2**levels
    grid = "(" + ", ".join(f"{s / factor:g}" for s in sizes) + ")"
    nearest = []
    for s in bad:
        below, above = s // step * step, (s // step + 1) * step
        nearest.append(f"nearest to {s}: {below} or {above}" if below else f"nearest to {s}: {above}")
    # the deepest U-Net every side can take at these levels (0: the wavelet transform itself does not fit)
    depth = 0
    while depth < 16 and all(s % 2 ** (levels + depth) == 0 for s in sizes):
        depth += 1
    if depth:
        fix = (
            f", or use a shallower network (at most {depth} channel_mult entries fit {size_name} {sizes} with "
            f"levels {levels})"
        )
    else:
        fix = f"; the wavelet transform itself needs every side divisible by 2**levels = {factor}, whatever the network"
    raise ValueError(
        f"{size_name} {sizes} does not fit the network: with levels {levels} (diffusion#levels) each wavelet level "
        f"halves the grid, so the U-Net sees {grid}, and channel_mult {mult} (network_def#channel_mult: "
        f"{len(mult) - 1} downsampling(s)) needs every side of that divisible by {2 ** (len(mult) - 1)}. Every side of "
        f"{size_name} must be a multiple of {step}: the smallest valid size is {step}; valid sizes {'; '.join(nearest)}. "
        f"Set {size_name} to a valid size (and crop or pad the data to it){fix}."
    )


def config_ids(config: Mapping[str, Any], prefix: str = "", depth: int = 4) -> list[str]:
    """Every id (``a``, ``a#b``, ``a#0#c``, ...) of a nested config, down to ``depth`` levels."""
    out: list[str] = []
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        ident = f"{prefix}{key}"
        out.append(ident)
        if depth > 1 and isinstance(value, (Mapping, list)):
            out += config_ids(value, ident + "#", depth - 1)
    return out


def check_override_keys(config: Mapping[str, Any], overrides: Iterable[str], source: str = "the command line") -> None:
    """Raise ``KeyError`` for the first override key the config does not define, naming the closest known key.

    Args:
        config: the merged bundle config (dict, as read from its JSON files).
        overrides: override ids (``batch_size``, ``network_def#base_channels``, ...).
        source: where the overrides came from, for the message.
    """
    known = config_ids(config)
    known_set = set(known)
    for key in overrides:
        if key in known_set or key in _RUN_ARGS:
            continue
        parent, _, name = key.rpartition("#")
        node = _node(config, parent) if parent else None
        candidates = known
        if isinstance(node, Mapping) and "_target_" in node:  # a new argument of a component: ask its signature
            params = _parameters(node["_target_"])
            if params is None or name in params:
                continue
            candidates = [f"{parent}#{p}" for p in params]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"Unknown config key {key!r} from {source}: no config file defines it, so it would be silently ignored."
            f"{hint}"
        )


def _node(config: Any, ident: str) -> Any:
    node = config
    for part in ident.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _parameters(target: Any) -> list[str] | None:
    """The keyword arguments a component's ``_target_`` accepts (None: any, or it cannot be told)."""
    if not isinstance(target, str):
        return None
    try:
        module = ComponentLocator().get_component_module_name(target)
        obj = pydoc.locate(f"{module[0] if isinstance(module, list) else module}.{target}" if module else target)
        if obj is None:
            return None
        params = inspect.signature(obj).parameters.values()
    except Exception:
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            keys.append(arg[2:].split("=", 1)[0])
    return keys


def _arg_value(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _files(value: str) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(parsed, str):
        return [p for p in parsed.split(",") if p]
    return [str(p) for p in parsed]


def check_cli_overrides(argv: Sequence[str] | None = None) -> bool:
    """In a ``python -m monai.bundle run`` process, check its ``--key value`` overrides against the config files.

    Does nothing (returns False) in any other process (e.g. a ``ConfigWorkflow`` built in Python, where the
    caller's own command line is not a bundle's). Overrides from ``--args_file`` are checked too.

    Lowercase ``true`` / ``false`` / ``null`` / ``none`` values are set to ``True`` / ``False`` / ``None`` in the
    running config (except for keys whose default is plain text).

    Raises:
        KeyError: an override key that no config file defines, naming the closest known key.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or not Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py"):
        return False
    config_file = _arg_value(argv, "config_file")
    if config_file is None:
        return False
    config = ConfigParser.load_config_files(_files(config_file))
    meta = _arg_value(argv, "meta_file")
    if meta:
        config["_meta_"] = ConfigParser.load_config_files(_files(meta))
    keys = _override_keys(argv[1:])
    args_file = _arg_value(argv, "args_file")
    if args_file:
        keys += list(json.loads(Path(args_file).read_text()))
    check_override_keys(config, keys)
    _fix_lowercase_literals(argv[1:], config)
    return True


_LITERALS = {"true": True, "false": False, "null": None, "none": None}


def _cli_values(argv: Sequence[str]) -> list[tuple[str, str]]:
    # (key, text) of every ``--key value`` / ``--key=value`` pair
    pairs = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or len(arg) <= 2:
            continue
        key, eq, value = arg[2:].partition("=")
        if eq:
            pairs.append((key, value))
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((key, argv[i + 1]))
    return pairs


def running_parser() -> Any:
    """The ConfigParser evaluating the current call (a bundle expression), found on the call stack; None outside one."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _fix_lowercase_literals(argv: Sequence[str], config: Mapping[str, Any]) -> None:
    """Read ``--mlflow false`` / ``--autocast null`` as False / None, as JSON and YAML users expect.

    ``monai.bundle run`` parses values with ``fire``, which knows only Python's ``False``, ``True`` and ``None``: the
    lowercase words arrive as text, and the text ``"false"`` counts as true. Keys whose config default is plain text
    (not an expression) keep the text.
    """
    parser = None
    for key, text in _cli_values(argv):
        if key in _RUN_ARGS or text.lower() not in _LITERALS or text in ("True", "False", "None"):
            continue
        default = _node(config, key)
        if isinstance(default, str) and not default.startswith("$"):
            continue  # a text setting: "none" may be a legitimate value
        parser = parser or running_parser()
        if parser is None:
            raise ValueError(
                f"--{key} {text}: monai.bundle run passes lowercase {text!r} on as text (the text 'false' counts as "
                f"true); write --{key} {_LITERALS[text.lower()]!r}."
            )
        if parser.get(key) == text:
            parser[key] = _LITERALS[text.lower()]
            logger.info("Read --%s %s as %r.", key, text, _LITERALS[text.lower()])
