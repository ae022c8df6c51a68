"""The documentation's bundle commands and flags against the configs they name: every documented override key
exists (a misspelt one would be silently ignored by ``monai.bundle run``, or stopped by our check)."""

import inspect
import re
import shlex
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from wdm3d.engine import check_override_keys
from wdm3d.engine.config_check import _RUN_ARGS, config_ids

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(REPO.glob("bundles/*/docs/README.md"))]
TORCHRUN = {"nproc_per_node", "nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "max_restarts", "standalone"}
# the arguments of the other monai.bundle commands the READMEs show (ckpt_export, verify_net_in_out, verify_metadata)
BUNDLE_COMMANDS = {
    name for f in (ckpt_export, verify_net_in_out, verify_metadata) for name in inspect.signature(f).parameters
}


def _commands():
    # every `monai.bundle run` command in a fenced shell block, with the doc's shell variables (B=...) substituted
    for doc in DOCS:
        text = doc.read_text()
        variables = dict(re.findall(r"^([A-Z]+)=(\S+)$", text, re.M))
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                # "..." and <placeholders> mark a command's shape (docs/ARCHITECTURE.md), not one to run as written
                if "monai.bundle run" not in line or "..." in line or re.search(r"<[a-z_]+>", line):
                    continue
                for name, value in variables.items():
                    line = line.replace(f"${name}", value)
                yield pytest.param(doc, line.strip(), id=f"{doc.relative_to(REPO)}:{line.strip()[:60]}")


@pytest.mark.parametrize(("doc", "line"), list(_commands()))
def test_documented_bundle_commands_use_keys_their_configs_define(doc, line):
    argv = shlex.split(line)
    argv = argv[argv.index("run") + 1 :]
    run_id, args = argv[0], argv[1:]
    files_arg = args[args.index("--config_file") + 1]
    files = eval(files_arg) if files_arg.startswith("[") else [files_arg]  # noqa: S307 - the doc's own literal
    config = ConfigParser.load_config_files([str(REPO / f) for f in files])
    assert run_id in config, f"{doc.name}: {line}: no {run_id!r} in {files}"
    keys = [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]
    check_override_keys(config, keys, source=f"{doc.relative_to(REPO)}: {line}")


@pytest.mark.parametrize("bundle", sorted(p.parent.parent.name for p in REPO.glob("bundles/*/docs/README.md")))
def test_flags_named_in_a_bundle_readme_are_config_keys_or_data_prep_options(bundle):
    # the READMEs also describe data_prep and neighbouring bundles (latent diffusion in wfvae's), so any bundle's
    # config keys, any data_prep option and any benchmark script's option count; a misspelt or removed key does not
    known = set(_RUN_ARGS) | TORCHRUN | BUNDLE_COMMANDS
    for path in REPO.glob("bundles/*/configs/*.json"):
        known |= set(config_ids(ConfigParser.load_config_file(str(path))))
    # (and the options of the benchmark scripts whose measurements a README quotes with their command)
    for path in [*(REPO / "data_prep").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        known |= set(re.findall(r'add_argument\(\s*"--([a-z0-9_-]+)"', path.read_text()))
    readme = REPO / "bundles" / bundle / "docs" / "README.md"
    text = re.sub(r"```.*?```", "", readme.read_text(), flags=re.S)  # fenced commands: the test above
    spans = [s for s in re.findall(r"`([^`]+)`", text) if not s.startswith("wdm3d ")]  # (the wdm3d CLI has --help)
    flags = {m.rstrip("-") for span in spans for m in re.findall(r"--([a-z][a-z0-9_#-]*)", span)}
    unknown = sorted(
        f
        for f in flags
        if f not in known
        and not any(k.startswith(f + "#") for k in known)
        and not (f.endswith("_") and any(k.startswith(f) for k in known))
    )  # --image_encoder_*
    assert not unknown, f"{readme} names flags that no config key or data_prep option defines: {unknown}"
