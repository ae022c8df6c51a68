"""Helpers for the MONAI bundles under ``bundles/``: where a bundle lives, running one from Python, and writing the
bundles' stand-alone configs from their family sources.

Every bundle folder must run on its own (the MONAI model-zoo layout: ``python -m monai.bundle run training
--config_file bundles/wdm3d_brats/configs/train.json``), and MONAI has no include: a config cannot pull shared
content from another file at run time. So what bundles share is written once, in ``bundles/families/<family>/``
(a base, one file per task, one small file per bundle with what makes it that bundle, and overlays every bundle of
the family has), and :func:`build_configs` writes each bundle's configs from them. ``python -m wdm3d.bundle
build-configs`` rewrites them after a source changed; ``--check`` lists those that are out of date.

A family's ``recipe.json``::

    {"bundles": {"wdm3d_brats": "brats.json", ...},                 # bundle -> its file (or null)
     "configs": {"train.json": ["base.json", "train.json"], ...},  # config -> the layers merged for it
     "overlays": ["dit.json", ...]}                                # copied from overlays/ as they are

A config is the layers merged as ``--config_file "['base.json','train.json']"`` would merge them (later files win,
``a#b`` keys set inside ``a``, ``+a`` keys extend ``a``), then the bundle's file applied where it fits: a key the
config has is overridden, an ``a#b`` key is set where ``a`` exists, and a new key is added where the config refers to
it (``@experiment_name`` in a training config, not in inference). New keys follow ``imports``, the workflow sections
(``train``, ``initialize``, ``run``, ...) come last, in a section its ``handlers`` and engine (``trainer``,
``evaluator``) last, and in every component ``_target_`` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.utils import merge_kv

from .io import atomic_write_text

__all__ = ["build_configs", "bundle_root", "bundle_config", "family_configs", "named", "run_bundle"]

_REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
_REFERENCE = re.compile(r"@(\w+)")  # a reference's top-level id: "@train#trainer" -> "train"
# the workflow, after the settings and components it is built from (a later layer may add a setting or set "run")
_SECTIONS = ("validate", "train", "initialize", "run", "training", "inference", "evaluate", "finalize")


def bundle_root(name: str) -> str:
    """The folder of bundle ``name``, so that a bundle writes inside itself wherever it is run from.

    The current directory if it is that bundle (``configs/metadata.json`` there names it), else
    ``bundles/<name>`` under the current directory, else the copy beside the installed ``wdm3d`` package
    (a source checkout). Override with ``--bundle_root`` to put outputs elsewhere.

    Args:
        name: the bundle's folder name (``wdm3d_brats``).
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
    """Path of ``configs/<filename>`` of bundle ``name``.

    Args:
        name: the bundle's folder name.
        filename: a file in its ``configs/``.
    """
    path = Path(bundle_root(name)) / "configs" / filename
    if not path.is_file():
        raise FileNotFoundError(f"Bundle {name!r} has no config {path}.")
    return str(path)


def run_bundle(name: str, run_id: str, configs: Sequence[str], **overrides: Any) -> ConfigWorkflow:
    """Run a bundle workflow like ``python -m monai.bundle run RUN_ID --config_file [...]`` would.

    Args:
        name: bundle folder name under ``bundles/``.
        run_id: the config key to run (``"training"``, ``"inference"``, ...).
        configs: config file names inside the bundle's ``configs/`` (later ones override earlier ones).
        overrides: config keys to override (``dataset_dir=...``, ``max_epochs=...``).
    """
    files = [bundle_config(name, c) for c in configs]
    meta = bundle_config(name, "metadata.json")
    logging_file = os.path.join(bundle_root(name), "configs", "logging.conf")
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=meta,
        logging_file=logging_file if os.path.isfile(logging_file) else None,
        workflow_type=None,
        run_id=run_id,
        **overrides,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def named(component: Any) -> Any:
    """The component itself, for a list entry that names a component defined under its own id.

    ``"handlers": [{"_target_": "wdm3d.bundle.named", "component": "@train#ema"}, ...]``: a bare ``"@train#ema"``
    entry would do at run time, but MONAI's ``ConfigWorkflow.check_properties`` (run by the model zoo) reads every
    entry of ``train#handlers`` as a component, and MONAI's callable mode (``"_mode_": "callable"``) warns for every
    handler that is not callable.

    Args:
        component: what the reference resolved to (a handler).
    """
    return component


# -- configs written from family sources ---------------------------------------------------------------------------


def _has_id(config: Any, ident: str) -> bool:
    node = config
    for part in ident.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _references(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_REFERENCE.findall(value))
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()
    return set().union(*(_references(v) for v in items))


def _target_first(value: Any) -> Any:
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: k != "_target_")  # stable: the other keys keep their order
        return {k: _target_first(value[k]) for k in keys}
    if isinstance(value, list):
        return [_target_first(v) for v in value]
    return value


def _apply_variant(config: dict, variant: Mapping[str, Any]) -> tuple[dict, set[str]]:
    # the variant's keys that fit this config, applied; returns the config and the keys used
    parser = ConfigParser(copy.deepcopy(config))
    used: set[str] = set()
    new: dict[str, Any] = {}
    pending = {k.replace("::", "#"): v for k, v in variant.items()}
    changed = True
    while changed:  # a new key may be referred to only by another key of the variant
        changed = False
        for key, value in list(pending.items()):
            ident = key.lstrip("+")
            parent, _, _ = ident.rpartition("#")
            config_now = parser.get()
            fits = (_has_id(config_now, parent) if parent else ident in config_now) or (
                not parent and ident in _references(config_now)
            )
            if not fits:
                continue
            if not parent and ident not in config_now:
                new[ident] = value
            merge_kv(parser, key, copy.deepcopy(value))
            used.add(key)
            del pending[key]
            changed = True
    merged = parser.get()
    order = [k for k in ("imports",) if k in merged] + [k for k in new if k != "imports"]
    order += [k for k in merged if k not in order and k not in _SECTIONS]
    order += [k for k in _SECTIONS if k in merged]
    ordered = {k: _engine_last(merged[k]) if k in _SECTIONS else merged[k] for k in order}
    return _target_first(ordered), used


def _engine_last(section: Any) -> Any:
    # in a workflow section the handlers and the engine come last: they are built from everything before them
    if not isinstance(section, Mapping):
        return section
    last = [k for k in ("handlers", "trainer", "evaluator") if k in section]
    return {k: section[k] for k in [k for k in section if k not in last] + last}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read family source {path}: {err}") from err


def family_configs(bundles_dir: str | os.PathLike | None = None) -> dict[Path, dict]:
    """Every config written from the family sources in ``<bundles_dir>/families``: its path -> its content.

    Args:
        bundles_dir: the ``bundles`` folder; None: the one of this source checkout.

    Raises:
        FileNotFoundError: no ``families`` folder, or a file a recipe names is missing.
        ValueError: a recipe without ``bundles`` / ``configs``, or a bundle file with a key that fits none of
            the bundle's configs (a misspelt key would otherwise be dropped without a word).
    """
    bundles = Path(bundles_dir) if bundles_dir is not None else _REPO_BUNDLES
    families = bundles / "families"
    if not families.is_dir():
        raise FileNotFoundError(f"No family sources in {families}: run from a source checkout of wdm3d.")
    out: dict[Path, dict] = {}
    for recipe_path in sorted(families.glob("*/recipe.json")):
        family = recipe_path.parent
        recipe = _read_json(recipe_path)
        if not isinstance(recipe, Mapping) or not {"bundles", "configs"} <= set(recipe):
            raise ValueError(f"{recipe_path} must be a JSON object with 'bundles' and 'configs' (and 'overlays').")
        for name, variant_file in recipe["bundles"].items():
            variant = _read_json(family / variant_file) if variant_file else {}
            used: set[str] = set()
            for config_name, layers in recipe["configs"].items():
                missing = [str(family / f) for f in layers if not (family / f).is_file()]
                if missing:
                    raise FileNotFoundError(f"{recipe_path}: {config_name} needs {missing}, which do not exist.")
                merged = ConfigParser.load_config_files([str(family / f) for f in layers])
                out[bundles / name / "configs" / config_name], keys = _apply_variant(merged, variant)
                used |= keys
            unused = [k for k in variant if k.replace("::", "#") not in used]
            if unused:
                raise ValueError(
                    f"{family / variant_file}: {unused} fit none of {sorted(recipe['configs'])} (no config has the "
                    "key, its parent, or a reference to it): check the spelling."
                )
            for overlay in recipe.get("overlays", []):
                out[bundles / name / "configs" / overlay] = _target_first(_read_json(family / "overlays" / overlay))
    return out


def config_text(config: Mapping[str, Any]) -> str:
    """A config as the bundles write it: JSON, indented by 4, ending in a newline.

    Args:
        config: the config content.
    """
    return json.dumps(config, indent=4) + "\n"


def build_configs(bundles_dir: str | os.PathLike | None = None, check: bool = False) -> list[Path]:
    """Write every bundle config that comes from the family sources; with ``check``, only list the stale ones.

    Args:
        bundles_dir: the ``bundles`` folder; None: the one of this source checkout.
        check: write nothing; return the configs whose file differs from what the sources give.

    Returns:
        The configs written (or, with ``check``, out of date).
    """
    changed = []
    for path, config in family_configs(bundles_dir).items():
        text = config_text(config)
        if path.is_file() and path.read_text() == text:
            continue
        changed.append(path)
        if not check:
            atomic_write_text(path, text)  # a config is never left half-written
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wdm3d.bundle build-configs [--check] [--bundles DIR]``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m wdm3d.bundle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-configs", help="write the bundles' configs from bundles/families/")
    build.add_argument("--check", action="store_true", help="write nothing; fail if a config is out of date")
    build.add_argument("--bundles", default=None, help="the bundles folder (default: this checkout's)")
    args = parser.parse_args(argv)
    paths = build_configs(args.bundles, check=args.check)
    for path in paths:
        print(("out of date: " if args.check else "wrote ") + str(path))
    if args.check and paths:
        print(
            "Edit bundles/families/ (not the generated configs) and run: python -m wdm3d.bundle build-configs",
            file=sys.stderr,
        )
        return 1
    if not paths:
        print("Every config is up to date with bundles/families/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
