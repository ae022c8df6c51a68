"""The MONAI model zoo's checks on every bundle, offline.

What the zoo's CI (``ci/verify_bundle.py`` and its helpers in Project-MONAI/model-zoo) and its contribution guide
ask of a bundle, written here as checks that each return the problems they find:

- files: ``configs/metadata.json`` and ``LICENSE`` (necessary), ``configs/inference.json`` (preferred),
  ``models/model.pt`` in the bundle or listed in ``large_files.yml`` (preferred), ``docs/README.md``, and
  ``docs/data_license.txt`` (asked for when the data have license conditions; all of ours do);
- metadata: valid against MONAI's schema (``monai.bundle.verify_metadata`` with the copy of the schema in
  ``tests/data``, so nothing is downloaded), ``version`` in ``changelog``, and the versions it pins (the zoo's CI
  pip-installs exactly these before testing) equal to the ones installed here, i.e. the ones these tests ran with;
- ``large_files.yml``: the entries the zoo's downloader reads (``path``, ``url``, optional ``hash_val`` /
  ``hash_type``), with ``models/model.pt`` among them;
- config keys (after parsing with ``ConfigParser``): inference configs define ``bundle_root``, ``device``,
  ``network_def``, ``inferer``, ``output_dir``; training configs ``bundle_root``, ``device``, ``dataset_dir``,
  ``output_dir``, ``train#trainer``, ``train#trainer#max_epochs``, ``train#dataset``, ``train#dataset#data``,
  ``train#handlers``, and with a ``validate`` section ``validate#evaluator``, ``validate#handlers``,
  ``validate#dataset``, ``validate#dataset#data``; ``val_interval`` where a ``ValidationHandler`` is used;
- ``docs/README.md`` has the sections of the zoo's bundle READMEs.

Each check is also run on a broken copy (or a broken config) to show that it can fail.
"""

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import monai
import numpy
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))
NAMES = [b.name for b in BUNDLES]
SCHEMA = REPO / "tests" / "data" / "monai_meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # tests/data/monai_meta_schema_20240725.SOURCE.txt
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "References",
    "License",
)
HASH_TYPES = {"", "md5", "sha1", "sha256", "sha512"}  # the zoo's SUPPORTED_HASH_TYPES, or none
INFERENCE_KEYS = ("bundle_root", "device", "network_def", "inferer", "output_dir")
TRAIN_KEYS = (
    "bundle_root",
    "device",
    "dataset_dir",
    "output_dir",
    "train#trainer",
    "train#trainer#max_epochs",
    "train#dataset",
    "train#dataset#data",
    "train#handlers",
)
VALIDATE_KEYS = ("validate#evaluator", "validate#handlers", "validate#dataset", "validate#dataset#data")


# ----------------------------------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------------------------------


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in ("json", "yaml", "yml"):
        if (folder / f"{stem}.{suffix}").is_file():
            return folder / f"{stem}.{suffix}"
    return None


def _large_files(bundle: Path) -> list[dict]:
    path = _find(bundle, "large_files")
    if path is None:
        return []
    parser = ConfigParser()
    parser.read_config(str(path))
    return list(parser.get("large_files") or [])


def file_problems(bundle: Path) -> list[str]:
    """Necessary and preferred files (verify_bundle_directory), plus the README and data license the guide asks for."""
    problems = [
        f"no {name}"
        for name in ("configs/metadata.json", "LICENSE", "docs/README.md", "docs/data_license.txt")
        if not (bundle / name).is_file()
    ]
    if (bundle / "configs").is_dir() and _find(bundle / "configs", "inference") is None:
        problems.append("no configs/inference.json (.yaml, .yml)")
    listed = {entry.get("path") for entry in _large_files(bundle)}
    if not (bundle / "models" / "model.pt").is_file() and "models/model.pt" not in listed:
        problems.append("models/model.pt is neither in the bundle nor listed in large_files.yml")
    license_file = bundle / "LICENSE"
    if license_file.is_file() and "Apache License" not in license_file.read_text():
        problems.append("LICENSE is not the Apache License the metadata's copyright and the README name")
    data_license = bundle / "docs" / "data_license.txt"
    if data_license.is_file():
        text, source = data_license.read_text(), json.loads((bundle / "configs" / "metadata.json").read_text())
        for named, needed in (("BraTS", "BraTS"), ("LIDC", "LIDC-IDRI"), ("demo", "MNI")):
            if named in source.get("data_source", "") and needed not in text:
                problems.append(
                    f"the metadata's data_source names {named} but docs/data_license.txt says nothing about {needed}"
                )
    return problems


def metadata_problems(meta_file: Path, schema: Path = SCHEMA) -> list[str]:
    """verify_version_changes' own-bundle part and verify_metadata_format (the schema, read from ``schema``)."""
    meta = json.loads(meta_file.read_text())
    problems = []
    if "version" not in meta or "changelog" not in meta:
        problems.append("'version' or 'changelog' is missing")
    elif meta["version"] not in meta["changelog"]:
        problems.append(f"version {meta['version']} is not in the changelog")
    if meta.get("schema") != SCHEMA_URL:
        problems.append(f"schema is {meta.get('schema')!r}, not the one tested ({SCHEMA_URL})")
    try:  # the file exists and its hash is given, so verify_metadata checks it and downloads nothing
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_MD5, hash_type="md5")
    except (ValueError, RuntimeError) as err:
        problems.append(f"verify_metadata: {err}")
    return problems


def _installed(package: str) -> str:
    return importlib_metadata.version(package)


def version_problems(meta: dict) -> list[str]:
    """The versions the zoo's CI installs before testing (get_bundle_requirements) against the ones installed here."""
    installed = {
        "monai_version": monai.__version__,
        "pytorch_version": Version(torch.__version__).public,
        "numpy_version": numpy.__version__,
    }
    problems = [
        f"{key} {meta.get(key)!r} but {value} is installed"
        for key, value in installed.items()
        if meta.get(key) != value
    ]
    for field in ("required_packages_version", "optional_packages_version"):
        for package, pinned in (meta.get(field) or {}).items():
            try:
                found = _installed(package)
            except importlib_metadata.PackageNotFoundError:
                problems.append(f"{field}: {package} {pinned} is not installed")
                continue
            if Version(found).public != Version(pinned).public:
                problems.append(f"{field}: {package} {pinned} but {found} is installed")
    return problems


def large_file_problems(bundle: Path) -> list[str]:
    """``large_files.yml`` as the zoo's downloader reads it (download_url(**entry) with path -> filepath)."""
    if _find(bundle, "large_files") is None:
        return ["no large_files.yml (.yaml, .json)"]
    entries = _large_files(bundle)
    problems = []
    if "models/model.pt" not in {e.get("path") for e in entries}:
        problems.append("large_files does not list models/model.pt")
    for entry in entries:
        what = entry.get("path", "an entry")
        if not {"path", "url"} <= set(entry):
            problems.append(f"{what}: needs path and url")
        extra = sorted(set(entry) - {"path", "url", "hash_val", "hash_type"})
        if extra:
            problems.append(f"{what}: keys the downloader does not take: {extra}")
        if entry.get("hash_type", "") not in HASH_TYPES:
            problems.append(f"{what}: hash_type {entry['hash_type']!r} is none of {sorted(HASH_TYPES - {''})}")
        url = entry.get("url", "")
        if url and not url.startswith("https://"):
            problems.append(f"{what}: url {url!r} is not an https address")
        if not url and (entry.get("hash_val") or entry.get("hash_type")):
            problems.append(f"{what}: a hash without a url (a hash is only given for a file that is hosted)")
        if bool(entry.get("hash_val")) != bool(entry.get("hash_type")):
            problems.append(f"{what}: hash_val and hash_type go together")
    return problems


def _parser(files: list[Path]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


def _has(parser: ConfigParser, key: str) -> bool:
    try:
        return parser.get(key) is not None
    except (KeyError, IndexError, TypeError, ValueError):
        return False


def inference_key_problems(parser: ConfigParser) -> list[str]:
    """The inference config's keys, and an inferer that is something."""
    problems = [f"no {key}" for key in INFERENCE_KEYS if not _has(parser, key)]
    if not problems and parser.get_parsed_content("inferer") is None:
        problems.append("inferer is null")
    return problems


def train_key_problems(parser: ConfigParser) -> list[str]:
    """The training config's keys; validate#... with a validate section; val_interval with a ValidationHandler."""
    keys = TRAIN_KEYS + (VALIDATE_KEYS if _has(parser, "validate") else ())
    problems = [f"no {key}" for key in keys if not _has(parser, key)]
    text = json.dumps(parser.get())
    if "ValidationHandler" in text and not _has(parser, "val_interval"):
        problems.append("a ValidationHandler without val_interval")
    return problems


def readme_problems(readme: Path) -> list[str]:
    headings = {m.strip().lower() for m in re.findall(r"^#+\s*\**(.+?)\**\s*$", readme.read_text(), re.MULTILINE)}
    return [f"no section {name!r}" for name in README_SECTIONS if name.lower() not in headings]


def _configs_with(bundle: Path, run_id: str) -> list[Path]:
    # the stand-alone configs (with imports) that define this run
    return [
        p
        for p in sorted((bundle / "configs").glob("*.json"))
        if p.name != "metadata.json" and run_id in (data := json.loads(p.read_text())) and "imports" in data
    ]


# ----------------------------------------------------------------------------------------------------------------------
# every bundle passes
# ----------------------------------------------------------------------------------------------------------------------


def test_the_schema_copy_is_the_one_its_source_note_names():
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    assert SCHEMA_MD5 in SCHEMA.with_suffix(".SOURCE.txt").read_text()
    assert set(NAMES) == {"ip_adapter_brats", "wavelet_vae", "wdm3d_brats", "wdm3d_lidc", "wfvae"}


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_necessary_and_preferred_files(bundle):
    assert file_problems(bundle) == []


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_metadata_is_valid_against_monai_schema(bundle):
    assert metadata_problems(bundle / "configs" / "metadata.json") == []


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_metadata_versions_are_the_installed_ones(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert version_problems(meta) == []
    assert "wdm3d" in meta["required_packages_version"]  # the configs name its classes


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_large_files_list_the_model(bundle):
    assert large_file_problems(bundle) == []


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_inference_configs_have_the_zoo_keys(bundle):
    configs = _configs_with(bundle, "inference")
    assert bundle / "configs" / "inference.json" in configs
    for config in configs:
        assert inference_key_problems(_parser([config])) == [], config.name


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_training_configs_have_the_zoo_keys(bundle):
    configs = _configs_with(bundle, "training")
    assert configs, f"{bundle.name} has no training config"
    multi_gpu = bundle / "configs" / "multi_gpu_train.json"
    overlays = [multi_gpu] if multi_gpu.is_file() else []
    for files in [[c] for c in configs] + [[c, *overlays] for c in configs if overlays]:
        parser = _parser(files)
        assert train_key_problems(parser) == [], [f.name for f in files]
        # bad-sample skipping survives the zoo's layout: the loader (and sampler) read train#dataset through it
        safe = parser.get("train#safe_dataset")
        assert safe["_target_"] == "wdm3d.data.SkipBadSamples" and safe["dataset"] == "@train#dataset"
        assert parser.get("train#dataloader#dataset") == "@train#safe_dataset"
        assert parser.get("train#sampler#dataset") == "@train#safe_dataset"
        assert parser.get("train#dataset#transform") == "@train#preprocessing"
        assert parser.get("train#preprocessing#skip_bad") is True


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b.name in ("wfvae", "wavelet_vae")], ids=lambda b: b.name)
def test_vae_validation_is_validate_evaluator_run_by_the_trainer(bundle):
    parser = _parser([bundle / "configs" / "train.json"])
    assert parser.get("validate#evaluator#_target_") == "wdm3d.engine.ReconstructionValidator"
    assert parser.get("validate#evaluator#interval") == "@val_interval"
    assert parser.get("validate#evaluator#callbacks") == "@validate#handlers"
    assert {"_target_": "wdm3d.bundle.named", "component": "@validate#evaluator"} in parser.get("train#handlers")


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_readme_follows_the_zoo_template(bundle):
    assert readme_problems(bundle / "docs" / "README.md") == []


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b.name.startswith("wdm3d_")], ids=lambda b: b.name)
def test_wdm_readmes_say_how_to_use_wdm_released_weights(bundle):
    text = (bundle / "docs" / "README.md").read_text()
    section = text[text.index("## Using WDM's released weights") : text.index("# References")]
    for needed in (
        "wdm3d import-wdm CKPT --preset wdm_128 --out DIR",
        "--preset wdm_256",
        "configs/wdm_paper.json']\"",
        "--sampler ddim --num_steps 50",
    ):  # WDM's recipe pinned, a fast sampler
        assert needed in section, needed


def test_the_vae_inferer_is_the_chunked_mean_reconstruction(tmp_path):
    from wdm3d.autoencoder import ReconstructionInferer, reconstruct, reconstruct_dataset
    from wdm3d.networks import WFVAE3D

    torch.manual_seed(0)
    net = WFVAE3D(in_channels=1, latent_channels=4, levels=2, base_channels=8, num_res_blocks=1, num_mid_blocks=1)
    net.eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    inferer = _parser([REPO / "bundles" / "wfvae" / "configs" / "inference.json"])
    inferer["chunk"], inferer["latent_chunk"] = 8, 2
    inferer = inferer.get_parsed_content("inferer")
    assert isinstance(inferer, ReconstructionInferer) and (inferer.chunk, inferer.latent_chunk) == (8, 2)
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, net), reconstruct(net, x), atol=1e-5, rtol=0)  # chunked == whole
    with pytest.raises(ValueError, match="chunk must be a positive number of slices"):
        ReconstructionInferer(chunk=0)
    with pytest.raises(ValueError, match="not to both"):
        reconstruct_dataset(
            net, tmp_path / "a.pt", tmp_path / "datalist.json", "t1n", tmp_path, [16] * 3, chunk=8, inferer=inferer
        )


def test_verify_metadata_on_the_command_line_needs_no_download(tmp_path):
    meta = REPO / "bundles" / "wdm3d_brats" / "configs" / "metadata.json"
    cmd = [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta), "--filepath", str(SCHEMA)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "skipped downloading" in out and "metadata is verified with no error" in out


# ----------------------------------------------------------------------------------------------------------------------
# the configs written from bundles/families (wdm3d.bundle.build_configs): what bundles share is written once
# ----------------------------------------------------------------------------------------------------------------------

FAMILIES = REPO / "bundles" / "families"
HANDLER_INDEX = re.compile(r"handlers#\d")  # a handler found by its place in the list


def _flat(config, prefix=""):
    out = {}
    for k, v in config.items() if isinstance(config, dict) else enumerate(config):
        key = f"{prefix}#{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, (dict, list)) and v else {key: v})
    return out


def test_the_committed_configs_are_the_ones_the_family_sources_give():
    from wdm3d.bundle import build_configs, family_configs

    assert build_configs(check=True) == [], "edit bundles/families/ and run: python -m wdm3d.bundle build-configs"
    written = {p.relative_to(REPO / "bundles").as_posix() for p in family_configs()}
    for name in ("wdm3d_brats", "wdm3d_lidc", "wfvae", "wavelet_vae"):
        assert {f"{name}/configs/train.json", f"{name}/configs/inference.json"} <= written
    assert {
        "ip_adapter_brats/configs/train_base.json",
        "ip_adapter_brats/configs/train.json",
        "ip_adapter_brats/configs/inference.json",
    } <= written


def test_a_generated_config_is_monai_list_form_of_its_sources():
    # what `--config_file "['base.json','train.json','lidc.json']"` merges, but for the bundle file's keys the
    # training does not use (the DICOM modality is inference's)
    listed = ConfigParser.load_config_files(
        [str(FAMILIES / "wdm3d" / f) for f in ("base.json", "train.json", "lidc.json")]
    )
    written = json.loads((REPO / "bundles" / "wdm3d_lidc" / "configs" / "train.json").read_text())
    assert set(listed) - set(written) == {"dicom_modality"}
    listed.pop("dicom_modality")
    assert _flat(listed) == _flat(written)


def test_brats_and_lidc_differ_only_in_their_data():
    sources = {name: json.loads((FAMILIES / "wdm3d" / f"{name}.json").read_text()) for name in ("brats", "lidc")}
    assert (
        set(sources["brats"])
        == set(sources["lidc"])
        == {"bundle_root", "image_key", "experiment_name", "dicom_modality"}
    )
    for config in ("train.json", "inference.json"):
        a, b = (
            _flat(json.loads((REPO / "bundles" / n / "configs" / config).read_text()))
            for n in ("wdm3d_brats", "wdm3d_lidc")
        )
        assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= set(sources["brats"]), config
    for overlay in json.loads((FAMILIES / "wdm3d" / "recipe.json").read_text())["overlays"]:
        assert (REPO / "bundles" / "wdm3d_brats" / "configs" / overlay).read_text() == (
            REPO / "bundles" / "wdm3d_lidc" / "configs" / overlay
        ).read_text(), overlay


@pytest.mark.parametrize("family", sorted(p.name for p in FAMILIES.iterdir() if p.is_dir()))
def test_inference_sources_do_not_restate_the_network_or_the_process(family):
    inference = json.loads((FAMILIES / family / "inference.json").read_text())
    assert not {"network_def", "diffusion"} & set(inference)
    base = json.loads((FAMILIES / family / "base.json").read_text())
    assert "network_def" in base


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_handlers_are_found_by_name(bundle):
    for path in sorted((bundle / "configs").glob("*.json")):
        text = path.read_text()
        assert not HANDLER_INDEX.search(text), f"{path.name} finds a handler by its index"
        handlers = json.loads(text).get("train", {}).get("handlers")
        if handlers is not None:
            # each entry the named component itself, written as a component (what MONAI's check_properties reads
            # each entry as)
            assert all(h == {"_target_": "wdm3d.bundle.named", "component": h.get("component")} for h in handlers)
            named = [h["component"] for h in handlers]
            assert all(re.fullmatch(r"@(train|validate)#\w+", n) for n in named), path.name
            assert "@train#tracker" in named and "@train#checkpoints" in named, path.name


@pytest.mark.parametrize("bundle", BUNDLES, ids=NAMES)
def test_mlflow_params_are_the_settings_not_a_hand_list(bundle):
    for config in _configs_with(bundle, "training"):
        parser = _parser([config])
        tracker = parser.get("train#tracker")
        assert tracker["settings"] == "$wdm3d.tracking.bundle_settings()", config.name
        # what params a tracker still names are values of objects (the adapter's trainable parameters), or a
        # setting given another meaning (the base's reference: none unless concat); never a setting as it is
        for key, value in (tracker.get("params") or {}).items():
            assert value != f"@{key}", (config.name, key)


def test_a_bundle_file_key_that_fits_no_config_is_refused(tmp_path):
    from wdm3d.bundle import family_configs

    shutil.copytree(REPO / "bundles" / "families", tmp_path / "families")
    path = tmp_path / "families" / "wdm3d" / "lidc.json"
    variant = json.loads(path.read_text())
    variant["imge_key"] = "ct"  # referred to by no config
    path.write_text(json.dumps(variant))
    with pytest.raises(ValueError, match=r"\['imge_key'\] fit none of"):
        family_configs(tmp_path)


def test_an_edited_generated_config_is_reported_and_rewritten(tmp_path):
    from wdm3d.bundle import build_configs, main

    shutil.copytree(REPO / "bundles", tmp_path / "bundles", ignore=shutil.ignore_patterns("output", "data", "models"))
    config = tmp_path / "bundles" / "wfvae" / "configs" / "train.json"
    config.write_text(config.read_text().replace('"max_epochs": 500', '"max_epochs": 5'))
    assert build_configs(tmp_path / "bundles", check=True) == [config]
    assert main(["build-configs", "--check", "--bundles", str(tmp_path / "bundles")]) == 1
    assert build_configs(tmp_path / "bundles") == [config]
    assert config.read_text() == (REPO / "bundles" / "wfvae" / "configs" / "train.json").read_text()
    assert main(["build-configs", "--check", "--bundles", str(tmp_path / "bundles")]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# every check can fail
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path):
    """A copy of the wfvae bundle to break."""
    dst = tmp_path / "wfvae"
    shutil.copytree(REPO / "bundles" / "wfvae", dst, ignore=shutil.ignore_patterns("output", "models"))
    return dst


def test_missing_files_are_reported(broken):
    (broken / "LICENSE").unlink()
    (broken / "docs" / "data_license.txt").unlink()
    (broken / "configs" / "inference.json").rename(broken / "configs" / "infer.json")
    (broken / "large_files.yml").write_text("large_files: []\n")
    assert file_problems(broken) == [
        "no LICENSE",
        "no docs/data_license.txt",
        "no configs/inference.json (.yaml, .yml)",
        "models/model.pt is neither in the bundle nor listed in large_files.yml",
    ]
    (broken / "models").mkdir()
    (broken / "models" / "model.pt").write_bytes(b"")  # a model in the bundle does instead of a listed one
    assert "models/model.pt is neither in the bundle nor listed in large_files.yml" not in file_problems(broken)


def test_a_data_license_that_leaves_out_a_data_source_is_reported(broken):
    path = broken / "docs" / "data_license.txt"
    path.write_text(path.read_text().replace("LIDC-IDRI", "LIDC"))
    assert file_problems(broken) == [
        "the metadata's data_source names LIDC but docs/data_license.txt says nothing about LIDC-IDRI"
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda m: m["network_data_format"].pop("outputs"), "verify_metadata"),
        (lambda m: m.update(task=5), "verify_metadata"),
        (lambda m: m.pop("required_packages_version"), "verify_metadata"),
        (lambda m: m["changelog"].pop(m["version"]), "is not in the changelog"),
        (lambda m: m.pop("changelog"), "'version' or 'changelog' is missing"),
        (lambda m: m.update(schema=SCHEMA_URL.replace("20240725", "20220324")), "not the one tested"),
    ],
    ids=[
        "no outputs",
        "task not a string",
        "no required packages",
        "version not in changelog",
        "no changelog",
        "another schema",
    ],
)
def test_broken_metadata_is_rejected(broken, change, expected):
    path = broken / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    problems = metadata_problems(path)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_schema_that_is_not_the_copy_named_is_refused(broken, tmp_path):
    schema = tmp_path / "schema.json"
    data = json.loads(SCHEMA.read_text())
    data["required"] = []  # a laxer schema would pass anything
    schema.write_text(json.dumps(data))
    problems = metadata_problems(broken / "configs" / "metadata.json", schema)
    assert len(problems) == 1 and "hash check of existing file failed" in problems[0], problems


def test_versions_other_than_the_installed_ones_are_reported():
    meta = json.loads((REPO / "bundles" / "wfvae" / "configs" / "metadata.json").read_text())
    wrong = copy.deepcopy(meta)
    wrong["required_packages_version"]["nibabel"] = "5.3.2"
    wrong["pytorch_version"] = "2.0.0"
    wrong["optional_packages_version"] = {"no-such-package-wdm3d": "1.0"}
    assert version_problems(wrong) == [
        f"pytorch_version '2.0.0' but {Version(torch.__version__).public} is installed",
        f"required_packages_version: nibabel 5.3.2 but {_installed('nibabel')} is installed",
        "optional_packages_version: no-such-package-wdm3d 1.0 is not installed",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("large_files: []\n", ["large_files does not list models/model.pt"]),
        (
            'large_files:\n  - path: "models/model.pt"\n    url: ""\n    hash_val: "abc"\n    hash_type: "md5"\n',
            ["models/model.pt: a hash without a url (a hash is only given for a file that is hosted)"],
        ),
        (
            'large_files:\n  - path: "models/model.pt"\n    url: "http://example.org/model.pt"\n    hash_type: "crc32"\n',
            [
                "models/model.pt: hash_type 'crc32' is none of ['md5', 'sha1', 'sha256', 'sha512']",
                "models/model.pt: url 'http://example.org/model.pt' is not an https address",
                "models/model.pt: hash_val and hash_type go together",
            ],
        ),
        ('large_files:\n  - path: "models/model.pt"\n', ["models/model.pt: needs path and url"]),
    ],
    ids=["empty", "hash of nothing", "bad hash type and url", "no url"],
)
def test_a_broken_large_files_list_is_reported(broken, text, expected):
    (broken / "large_files.yml").write_text(text)
    assert large_file_problems(broken) == expected


def test_configs_without_the_zoo_keys_are_reported():
    inference = _parser([REPO / "bundles" / "wfvae" / "configs" / "inference.json"])
    inference["inferer"] = None
    assert inference_key_problems(inference) == ["no inferer"]
    config = _parser([REPO / "bundles" / "wfvae" / "configs" / "inference.json"]).get()
    config.pop("output_dir")
    assert inference_key_problems(ConfigParser(config)) == ["no output_dir"]

    train = _parser([REPO / "bundles" / "wfvae" / "configs" / "train.json"])
    old = copy.deepcopy(train.get())
    # the layout before the zoo's: SkipBadSamples as train#dataset hid the data; the validator among the handlers
    old["train"]["dataset"] = {"_target_": "wdm3d.data.SkipBadSamples", "dataset": old["train"]["dataset"]}
    old["train"]["handlers"][-1] = old["validate"].pop("evaluator")
    old["validate"].pop("handlers")
    old["train"]["trainer"].pop("max_epochs")
    parser = ConfigParser(old)
    assert train_key_problems(parser) == [
        "no train#trainer#max_epochs",
        "no train#dataset#data",
        "no validate#evaluator",
        "no validate#handlers",
    ]
    old["train"]["handlers"].append({"_target_": "ValidationHandler", "interval": 5})
    old.pop("val_interval")
    assert "a ValidationHandler without val_interval" in train_key_problems(ConfigParser(old))


def test_a_readme_without_the_template_sections_is_reported(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# wfvae\n\n## 1. Data\n\n## 2. Train\n\n## Performance\n\n## References\n")
    assert readme_problems(readme) == [
        "no section 'Model Overview'",
        "no section 'Data'",  # (a numbered one is not)
        "no section 'Training configuration'",
        "no section 'MONAI Bundle Commands'",
        "no section 'License'",
    ]
