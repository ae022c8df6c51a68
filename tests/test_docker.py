"""docker/Dockerfile and docker/compose.yaml, read as files (no Docker daemon needed): what they promise holds."""

import fnmatch
import json
import re
import shlex
from importlib.metadata import requires
from pathlib import Path

import pytest
import tomllib
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
CONTEXT = REPO  # `docker build -f docker/Dockerfile .` from the repository root
IGNORE = DOCKER / "Dockerfile.dockerignore"  # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile
PYTORCH_TAG = re.compile(
    r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn(?P<cudnn>\d+)-runtime$"
)
ROOT_USERS = {"root", "0"}


@pytest.fixture(scope="module")
def dockerfile():
    return DockerfileParser(str(DOCKERFILE))


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def instructions(parser, name):
    return [i for i in parser.structure if i["instruction"] == name]


def shell_commands(parser, after: int = -1):
    """Each RUN (below structure index `after`) split into its simple commands (at &&, ||, ;, |), tokenised as the
    shell would (quotes kept whole)."""
    out = []
    for ins in instructions(parser, "RUN"):
        if parser.structure.index(ins) <= after:
            continue
        lexer = shlex.shlex(ins["value"], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        cmd = []
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(token)
        out.append(cmd)
    return [c for c in out if c]


def copy_sources(parser):
    """(instruction, sources) of every COPY/ADD that reads the build context (not `--from=` another stage)."""
    out = []
    for ins in instructions(parser, "COPY") + instructions(parser, "ADD"):
        value = ins["value"].strip()
        if value.startswith("["):
            words = json.loads(value)
        else:
            words = shlex.split(value)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"{ins['instruction']} {value!r} needs a source and a destination"
        out.append((ins, paths[:-1]))
    return out


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def in_context(path: str, rules: list[str]) -> bool:
    """Whether `path` (relative to the context) is sent to the builder: the last rule matching it or a parent wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = _ignore_regex(rule[1:].strip("/") if negate else rule.strip("/"))
        if any(pattern.match(p) for p in prefixes):
            included = negate
    return included


def ignore_rules():
    return [line.strip() for line in IGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]


# -- Dockerfile ------------------------------------------------------------------------------------------------------


def test_base_image_is_an_official_cuda_pytorch_runtime_that_our_torch_range_accepts(dockerfile):
    base = dockerfile.baseimage  # ARG defaults substituted
    m = PYTORCH_TAG.match(base or "")
    assert m, f"FROM {base!r} is not an official pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime image"
    torch_version, cuda = Version(m["torch"]), Version(m["cuda"])
    assert cuda >= Version("11.8"), f"CUDA {cuda} has no H100 (sm_90) support; use CUDA >= 11.8"
    # pip keeps the base image's torch only if every requirement on torch accepts it
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_reqs = [r for r in map(Requirement, project) if r.name == "torch"]
    torch_reqs += [r for r in map(Requirement, requires("monai") or []) if r.name == "torch" and not r.marker]
    assert len(torch_reqs) == 2, f"expected torch requirements from pyproject.toml and monai: {torch_reqs}"
    for req in torch_reqs:
        assert req.specifier.contains(torch_version, prereleases=True), (
            f"the base image's torch {torch_version} does not satisfy {req}: pip would replace the image's CUDA torch"
        )


def test_a_non_root_user_is_created_and_set_before_the_command(dockerfile):
    order = [i["instruction"] for i in dockerfile.structure]
    assert "CMD" in order or "ENTRYPOINT" in order, "no default command"
    first_cmd = min(order.index(x) for x in ("CMD", "ENTRYPOINT") if x in order)
    users = [i for i in dockerfile.structure[:first_cmd] if i["instruction"] == "USER"]
    assert users, "no USER before CMD/ENTRYPOINT: the container would run as root"
    user = users[-1]["value"].split(":")[0].strip()
    assert user not in ROOT_USERS, f"USER {user} is root"
    created = any(cmd[:1] == ["useradd"] and cmd[-1] == user for cmd in shell_commands(dockerfile))
    assert created, f"no `useradd ... {user}` in a RUN: USER {user} would not exist"
    assert not [
        i
        for i in dockerfile.structure[first_cmd:]
        if i["instruction"] == "USER" and i["value"].split(":")[0].strip() in ROOT_USERS
    ], "USER switches back to root after the command"


def test_the_default_command_is_wdm3d_info(dockerfile):
    (cmd,) = instructions(dockerfile, "CMD")
    assert json.loads(cmd["value"]) == ["wdm3d", "info"]


def test_data_and_output_folders_are_volumes(dockerfile):
    volumes = []
    for ins in instructions(dockerfile, "VOLUME"):
        value = ins["value"].strip()
        volumes += json.loads(value) if value.startswith("[") else value.split()
    assert {"/data", "/outputs"} <= set(volumes), f"VOLUME lists {volumes}"


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    rules = ignore_rules()
    copies = copy_sources(dockerfile)
    assert copies, "nothing is copied into the image"
    for ins, sources in copies:
        for src in sources:
            matches = list(CONTEXT.glob(src))
            assert matches, f"line {ins['startline'] + 1}: {src!r} does not exist in the build context {CONTEXT}"
            for m in matches:
                rel = m.relative_to(CONTEXT).as_posix()
                assert in_context(rel, rules), f"{rel} is copied but {IGNORE.name} leaves it out of the context"


def test_the_ignore_file_keeps_environments_data_and_outputs_out():
    rules = ignore_rules()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_docker.py",
        "mlruns/0/meta.yaml",
        "data/brats128/datalist.json",
        "wdm3d_demo/samples/sample_0000.nii.gz",
        "outputs/wdm3d_brats/models/checkpoint_epoch=1.pt",
        "bundles/wdm3d_brats/output/validation/epoch_0001.png",
        "bundles/wdm3d_brats/models/model.pt",
        "wdm3d/networks/resnet_50_23dataset.pth",
        "wdm3d/__pycache__/cli.cpython-311.pyc",
    ):
        assert not in_context(path, rules), f"{path} would be sent to the builder"
    # the matcher itself: the sources the image needs are in
    for path in ("pyproject.toml", "wdm3d/cli.py", "bundles/wdm3d_brats/configs/train.json"):
        assert in_context(path, rules), path


def is_pip_install(cmd):
    return cmd[:2] == ["pip", "install"] or cmd[1:4] == ["-m", "pip", "install"]


def test_the_project_is_installed_without_touching_torch(dockerfile):
    cmds = [c for c in shell_commands(dockerfile) if is_pip_install(c)]
    project = [c for c in cmds if "." in c]  # `pip install [-e] .`
    # the sources must be in the image before the (last) install of the project
    source_copies = [
        dockerfile.structure.index(ins)
        for ins, sources in copy_sources(dockerfile)
        if any(s.rstrip("/") == "wdm3d" for s in sources)
    ]
    assert source_copies, "the wdm3d package is never copied into the image"
    final = [c for c in shell_commands(dockerfile, after=max(source_copies)) if is_pip_install(c) and "." in c]
    assert final, "no `pip install .` / `pip install -e .` after the sources are copied"
    for c in cmds:
        names = {re.split(r"[<>=!~\[;@ ]", w, maxsplit=1)[0].lower() for w in c if re.match(r"^[A-Za-z]", w)}
        assert "torch" not in names, f"`{' '.join(c)}` installs torch over the base image's CUDA build"
    # the base image's torch is pinned as a constraint in every install that resolves dependencies
    pin = [c for c in shell_commands(dockerfile) if "import torch" in " ".join(c) and "torch==" in " ".join(c)]
    assert pin and ">" in pin[0], "the base torch version is not written to a constraints file"
    constraint = pin[0][pin[0].index(">") + 1]
    for c in project:
        assert "--no-deps" in c or ("-c" in c and c[c.index("-c") + 1] == constraint), (
            f"`{' '.join(c)}` may resolve torch without the constraint {constraint}"
        )


def test_the_bundle_configs_the_compose_command_uses_are_copied(dockerfile, compose):
    cmd = compose["services"]["trainer"]["command"]
    config = cmd[cmd.index("--config_file") + 1]
    assert (REPO / config).is_file(), config
    copied = [s for _, sources in copy_sources(dockerfile) for s in sources]
    assert any(config == s or config.startswith(s.rstrip("/") + "/") for s in copied), (
        f"{config} is not copied into the image ({copied})"
    )


# -- compose.yaml ----------------------------------------------------------------------------------------------------


def test_compose_builds_both_services_from_the_dockerfile(compose):
    services = compose["services"]
    assert {"mlflow", "trainer"} <= set(services)
    for name in ("mlflow", "trainer"):
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name}: no build section"
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == CONTEXT, f"{name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, f"{name}: dockerfile {build['dockerfile']}"


def test_the_trainer_reserves_one_nvidia_gpu(compose):
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia"]
    assert len(gpu) == 1, devices
    assert gpu[0].get("count") == 1 and "gpu" in gpu[0].get("capabilities", []), gpu[0]


def _flags(command):
    words = shlex.split(command) if isinstance(command, str) else list(command)
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            key, eq, value = w.partition("=")
            has_value = not eq and i + 1 < len(words) and not words[i + 1].startswith("--")
            out[key] = value if eq else (words[i + 1] if has_value else "")
    return words, out


def _mounts(service):
    """container path -> source (a named volume or a host path, possibly a `${VAR:-default}`)."""
    out = {}
    for v in service.get("volumes", []):
        m = re.match(r"^(\$\{[^}]*\}|[^:]+):([^:]+)(?::[a-z,]+)?$", v)
        assert m, f"cannot read the volume entry {v!r}"
        out[m[2]] = m[1]
    return out


def test_the_mlflow_server_is_reachable_by_the_trainer_and_keeps_its_data(compose):
    services = compose["services"]
    words, flags = _flags(services["mlflow"]["command"])
    assert words[:2] == ["mlflow", "server"], words
    assert flags["--host"] == "0.0.0.0", "the server would only listen inside its own container"
    port = flags.get("--port", "5000")
    assert f"{port}:{port}" in [str(p) for p in services["mlflow"].get("ports", [])]
    # the trainer talks to it by service name on that port, and only once it is up
    uri = services["trainer"]["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://mlflow:{port}", uri
    depends = services["trainer"]["depends_on"]
    assert "mlflow" in depends
    # MLflow >= 3 checks the Host header: the trainer's must be allowed
    allowed = flags["--allowed-hosts"].split(",")
    for host in (f"mlflow:{port}", f"localhost:{port}"):  # the trainer's requests, a browser on the GPU box
        assert any(fnmatch.fnmatchcase(host, a) if "*" in a else a == host for a in allowed), (host, allowed)
    # SQLite store and proxied artifacts on named volumes
    mounts, named = _mounts(services["mlflow"]), set(compose.get("volumes") or {})
    store = flags["--backend-store-uri"]
    assert store.startswith("sqlite:////"), store
    db_dir = str(Path(store[len("sqlite:///") :]).parent)
    assert mounts.get(db_dir) in named, f"the SQLite file's folder {db_dir} is not on a named volume ({mounts})"
    assert "--serve-artifacts" in flags and mounts.get(flags["--artifacts-destination"]) in named


def test_the_trainer_runs_the_bundle_on_the_mounted_folders(compose, dockerfile):
    trainer = compose["services"]["trainer"]
    words, flags = _flags(trainer["command"])
    assert words[:5] == ["python", "-m", "monai.bundle", "run", "training"], words
    volumes = set()
    for ins in instructions(dockerfile, "VOLUME"):
        volumes |= set(json.loads(ins["value"]))
    mounts = _mounts(trainer)
    for key in ("--dataset_dir", "--output_dir"):
        root = "/" + flags[key].strip("/").split("/")[0]
        assert root in mounts and root in volumes, f"{key} {flags[key]} is not under a mounted volume ({mounts})"
    train = json.loads((REPO / flags["--config_file"]).read_text())
    assert {"dataset_dir", "output_dir"} <= set(train), "the overrides are not keys of train.json"
