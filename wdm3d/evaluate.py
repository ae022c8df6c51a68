"""Evaluate synthetic volumes against real ones: 3D FID, MS-SSIM diversity, distribution checks, memorization audit.

Used by ``wdm3d evaluate`` and by the bundles' ``configs/evaluate.json``. Writes ``results.json``, ``report.md`` and
PNG plots to the output folder, and logs the metrics and the report to the MLflow run that generated the samples
(``mlflow_run_id`` of the inference ``manifest.json``; the tracking URI from the training output's
``mlflow_run.json``). See :func:`evaluate` for what each metric reports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .io import atomic_write_text, save_montage
from .metrics import (
    downsample_volumes,
    extract_features,
    fid_from_features,
    intensity_wasserstein,
    memorization_audit,
    mmd_rbf,
    ms_ssim_diversity,
    normalize_volumes,
)
from .metrics.plots import histogram_counts, plot_histograms
from .networks.medicalnet import (
    MedicalNetResNet50,
    RandomConv3dFeatures,
    medicalnet_resnet50,
    medicalnet_weights_help,
)

__all__ = ["load_volumes", "check_sample_folder", "build_feature_extractor", "find_run_info", "evaluate", "Evaluator",
           "FEATURE_EXTRACTORS"]

logger = logging.getLogger(__name__)
FEATURE_EXTRACTORS = ("auto", "medicalnet", "random_conv3d")
_NOT_COMPARABLE = "random_conv3d features: NOT comparable with published 3D FIDs (only with other runs of this project)"


# the volume names wdm3d inference writes (wdm3d.inference), which mark a folder as a run's output
_SAMPLE_NIFTI = re.compile(r"^sample_\d{4,}\.nii(?:\.gz)?$")


def check_sample_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder of synthetic volumes that is not exactly one complete wdm3d inference run.

    A folder that looks like an inference output (it has a ``manifest.json`` listing samples, or volumes named
    ``sample_NNNN.nii.gz``) must have a readable manifest that lists exactly the NIfTI volumes present: no manifest
    (an inference run was interrupted, or an older wdm3d removed it before writing), a listed volume that is missing,
    or a volume it does not list (another run's) would mix samples of different runs into one score. A plain folder
    of NIfTI volumes under other names and without a manifest (copied in by hand, from another tool) is accepted as it
    is; so is one whose ``manifest.json`` is some other JSON without a ``samples`` list, as long as no volume has a
    ``sample_NNNN`` name.

    Args:
        folder: the synthetic volumes' folder.

    Raises:
        ValueError: the folder mixes runs or its manifest is unreadable (the message names the folder and the problem).
        FileNotFoundError: the manifest lists volumes that are not in the folder.
    """
    folder = Path(folder)
    manifest = folder / "manifest.json"
    volumes = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                     and p.name.endswith((".nii.gz", ".nii")))
    named = [n for n in volumes if _SAMPLE_NIFTI.match(n)]
    fix = ("Run inference into the folder again (a run replaces the folder's samples only once it has finished), or "
           "copy the volumes to evaluate into a folder of their own.")
    if not manifest.exists():
        if named:
            raise ValueError(
                f"{folder} holds wdm3d samples ({len(named)} sample_NNNN volume(s), e.g. {named[0]}) but no "
                f"manifest.json: the inference run that wrote them did not finish, or the manifest was removed, so the "
                f"volumes may come from more than one run. {fix}"
            )
        return
    try:
        data = json.loads(manifest.read_text())
        samples = data.get("samples") if isinstance(data, dict) else None
        listed = None if samples is None else [str(s["nifti"]) for s in samples]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest} is not a readable wdm3d manifest ({type(err).__name__}: {err}); cannot tell which "
                         f"volumes in {folder} belong to one run. {fix}") from err
    if listed is None:
        if named:
            raise ValueError(f"{manifest} lists no samples, but {folder} holds {len(named)} sample_NNNN volume(s), e.g. "
                             f"{named[0]}: cannot tell which belong to one run. {fix}")
        return
    missing = [n for n in listed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{manifest} lists {len(missing)} volume(s) that are not in {folder}, e.g. "
                                f"{missing[0]}; the run that wrote it did not finish or files were moved. {fix}")
    extra = [n for n in volumes if n not in set(listed)]
    if extra:
        raise ValueError(f"{folder} holds {len(extra)} NIfTI volume(s) that {manifest} does not list, e.g. {extra[0]}: "
                         f"they are not of the run the manifest describes. {fix}")


def _volume_files(folder: Path) -> list[Path]:
    """The NIfTI volumes of a folder; for a folder of wdm3d samples (a ``manifest.json`` listing them), exactly the
    volumes of that run, so that files of another run in the folder are not mixed in."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            listed = [s["nifti"] for s in json.loads(manifest.read_text())["samples"]]
        except (ValueError, KeyError, TypeError):
            listed = None  # not a wdm3d sample manifest: read the folder
        if listed is not None:
            missing = [name for name in listed if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{manifest} lists {len(missing)} volume(s) that are not in {folder}, e.g. "
                                        f"{missing[0]}; the run that wrote it did not finish or files were moved.")
            if listed:
                return [folder / name for name in listed]
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (p.name.endswith(".nii.gz") or p.name.endswith(".nii")))
    if not files:
        raise FileNotFoundError(f"No NIfTI volumes (*.nii.gz, *.nii) in {folder}.")
    return files


def _datalist_files(path: Path, split: str, image_key: str | None) -> list[Path]:
    from .data import load_datalist, read_datalist

    data = read_datalist(path)
    if image_key is None:
        entries = data.get(split) or []
        first = entries[0] if entries and isinstance(entries[0], dict) else {}
        candidates = [k for k, v in first.items() if isinstance(v, str) and (v.endswith(".nii.gz") or v.endswith(".nii"))]
        if len(candidates) != 1:
            raise ValueError(f"Datalist {path}: say which image key to evaluate (--image-key / image_key); the entries of "
                             f"{split!r} have the NIfTI keys {candidates}.")
        image_key = candidates[0]
    return [Path(e[image_key]) for e in load_datalist(path, split, [image_key])]


def load_volumes(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "training",
    image_key: str | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read NIfTI volumes that share one shape.

    Args:
        source: a folder of ``*.nii.gz`` / ``*.nii`` files (sorted by name), a datalist JSON (with ``split`` and
            ``image_key``; the key is guessed when the entries have exactly one NIfTI path), or a list of files.
        split: the datalist split.
        image_key: the datalist key holding the volume (e.g. ``t1n``).
        limit: read at most this many (the first ones).

    Returns:
        ``(volumes (N, D, H, W) float32, file names, affine of the first volume)``.

    Raises:
        ValueError: a volume is not 3D, or its shape differs from the first one's (the file is named).
    """
    import nibabel as nib

    if isinstance(source, (list, tuple)):
        files = [Path(p) for p in source]
    else:
        src = Path(source)
        if src.is_dir():
            files = _volume_files(src)
        elif src.is_file() and src.suffix == ".json":
            files = _datalist_files(src, split, image_key)
        else:
            raise FileNotFoundError(f"{src} is neither a folder of NIfTI volumes nor a datalist JSON file.")
    if limit is not None:
        files = files[:limit]
    vols, shape, affine = [], None, None
    for f in files:
        img = nib.load(str(f))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"{f} holds a {data.ndim}D image of shape {data.shape}; evaluation needs 3D volumes.")
        if shape is None:
            shape, affine = data.shape, img.affine
        elif data.shape != shape:
            raise ValueError(f"{f} has shape {data.shape}, unlike {files[0]} ({shape}): all volumes must share one shape "
                             "(resample or crop them first, e.g. with data_prep).")
        vols.append(data)
    names = [f.name for f in files]
    if len(set(names)) < len(names):
        names = [str(f) for f in files]
    return np.stack(vols), names, np.asarray(affine)


def build_feature_extractor(features: str = "auto", weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The FID feature extractor: MedicalNet ResNet-50 (with ``weights``) or the weight-free random 3D conv net.

    Args:
        features: ``"medicalnet"`` (needs ``weights``), ``"random_conv3d"``, or ``"auto"``: MedicalNet when
            ``weights`` is given, else the random net (with a warning naming the weights file to get).
        weights: path to MedicalNet's ``resnet_50_23dataset.pth``.
    """
    if features not in FEATURE_EXTRACTORS:
        raise ValueError(f"features must be one of {FEATURE_EXTRACTORS}, got {features!r}.")
    if features == "medicalnet" or (features == "auto" and weights):
        return medicalnet_resnet50(weights)
    if features == "auto":
        warnings.warn("No MedicalNet weights: FID uses random_conv3d features, not comparable with papers. "
                      + medicalnet_weights_help(), UserWarning, stacklevel=2)
    return RandomConv3dFeatures(seed=0).eval()


def _extractor_name(extractor: torch.nn.Module) -> str:
    if isinstance(extractor, MedicalNetResNet50):
        return "medicalnet"
    if isinstance(extractor, RandomConv3dFeatures):
        return "random_conv3d"
    return type(extractor).__name__.lower()


def find_run_info(fake_dir: str | os.PathLike, mlflow_run_id: str | None = None,
                  tracking_uri: str | None = None) -> dict[str, str] | None:
    """The MLflow run that generated the samples in ``fake_dir``: ``{"run_id", "tracking_uri"}`` or None.

    Run id: ``mlflow_run_id``, else ``manifest.json``'s ``mlflow_run_id``. Tracking URI: ``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else the ``mlflow_run.json`` (written by training) in the samples folder, its parent, or
    the folder above the manifest's checkpoint (the one naming the same run first).
    """
    fake_dir = Path(fake_dir)
    manifest = {}
    if (fake_dir / "manifest.json").is_file():
        try:
            manifest = json.loads((fake_dir / "manifest.json").read_text())
        except json.JSONDecodeError:
            manifest = {}
    run_id = mlflow_run_id or manifest.get("mlflow_run_id")
    if not run_id:
        return None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        candidates = [fake_dir, fake_dir.parent]
        if manifest.get("checkpoint"):
            candidates.append(Path(manifest["checkpoint"]).parent.parent)
        found = []
        for folder in candidates:
            f = folder / "mlflow_run.json"
            if f.is_file():
                try:
                    info = json.loads(f.read_text())
                except json.JSONDecodeError:
                    continue
                found.append(info)
        same = [i for i in found if i.get("run_id") == run_id] or found
        uri = same[0].get("tracking_uri") if same else None
    if not uri:
        warnings.warn(f"Found MLflow run {run_id} but no tracking URI (no mlflow_run.json beside the samples); pass "
                      "--tracking-uri or set MLFLOW_TRACKING_URI to log the evaluation.", RuntimeWarning, stacklevel=2)
        return None
    return {"run_id": str(run_id), "tracking_uri": str(uri)}


def _value_range(value_range, fake_dir: Path, real, real_vols: np.ndarray) -> tuple[list[float], str]:
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        return [lo, hi], "given"
    manifest = fake_dir / "manifest.json"
    if manifest.is_file():
        try:
            r = json.loads(manifest.read_text()).get("intensity_range")
            if r and float(r[0]) < float(r[1]):
                return [float(r[0]), float(r[1])], "manifest.json intensity_range"
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    if isinstance(real, (str, os.PathLike)) and str(real).endswith(".json"):
        from .data import read_datalist

        r = read_datalist(real).get("intensity_range")
        if r:
            return [float(r[0]), float(r[1])], "datalist intensity_range"
    lo, hi = float(real_vols.min()), float(real_vols.max())
    if not hi > lo:
        hi = lo + 1.0
    return [lo, hi], "min/max of the real volumes"


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _report(results: dict) -> str:
    r = results
    fid, div, mem = r["fid"], r["ms_ssim"], r["memorization"]
    lines = [
        "# wdm3d evaluation", "",
        f"- synthetic: `{r['fake']}` ({r['n_fake']} volumes); real: `{r['real']}` ({r['n_real']} volumes, split "
        f"`{r['split']}`); shape {r['shape']}",
        f"- intensity range {r['value_range']} ({r['value_range_source']}), FID input preset `{r['preset']}`",
        "", "| metric | synthetic | real | note |", "|---|---|---|---|",
        f"| 3D FID ({fid['extractor']}) | {_fmt(fid['fid'])} |  | N = {fid['n_fake']} vs {fid['n_real']}; "
        f"{'comparable with papers' if fid['comparable_with_papers'] else 'NOT comparable with papers'} |",
        f"| MS-SSIM (diversity, lower = more diverse) | {_fmt(div['fake']['mean'])} "
        f"[{_fmt(div['fake']['ci_low'])}, {_fmt(div['fake']['ci_high'])}] | {_fmt(div['real']['mean'])} "
        f"[{_fmt(div['real']['ci_low'])}, {_fmt(div['real']['ci_high'])}] | {div['fake']['n_pairs']} / "
        f"{div['real']['n_pairs']} pairs, {int(div['fake']['confidence'] * 100)}% bootstrap CI"
        f"{'; ' + div['fake']['note'] if div['fake']['note'] else ''} |",
        f"| intensity Wasserstein-1 | {_fmt(r['wasserstein']['wasserstein'])} |  | intensity units |",
        f"| MMD (RBF, unbiased, {fid['extractor']} features) | {_fmt(r['mmd_features']['mmd'])} |  | "
        f"sigma {_fmt(r['mmd_features']['bandwidth'])}, permutation p {_fmt(r['mmd_features'].get('p_value'), 3)} |",
        f"| MMD (RBF, unbiased, voxels at {r['mmd_voxels']['size']}^3) | {_fmt(r['mmd_voxels']['mmd'])} |  | "
        f"sigma {_fmt(r['mmd_voxels']['bandwidth'])}, permutation p {_fmt(r['mmd_voxels'].get('p_value'), 3)} |",
        f"| nearest-neighbour NCC (median) | {_fmt(mem['fake_nn_ncc']['median'])} | "
        f"{_fmt(mem['real_nn_ncc']['median'])} | synthetic->training vs training->other training |",
        f"| suspected copies | {len(mem['suspected_copies'])} / {mem['n_fake']} |  | NCC >= {_fmt(mem['threshold'])} |",
        "",
    ]
    if mem["suspected_copies"]:
        lines += ["## Suspected copies", "", "| synthetic | nearest training volume | NCC |", "|---|---|---|"]
        lines += [f"| {c['fake']} | {c['train']} | {c['ncc']:.5f} |" for c in mem["suspected_copies"]]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in r["files"].items() if v.endswith(".png")]
    lines += ["", "## Cost", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["timings"].items()]
    if not fid["comparable_with_papers"]:
        lines += ["", "Note: " + medicalnet_weights_help("--weights PATH")]
    return "\n".join(lines) + "\n"


def evaluate(
    real: str | os.PathLike,
    fake: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    features: str = "auto",
    extractor: torch.nn.Module | None = None,
    preset: str = "wdm",
    pairs: int | str = 100,
    kernel_size: int = 7,
    ms_ssim_adapt: bool = True,
    split: str = "training",
    image_key: str | None = None,
    value_range: Sequence[float] | None = None,
    copy_threshold: float | None = None,
    ncc_downsample: int = 1,
    mmd_voxel_size: int = 16,
    max_real: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    seed: int = 0,
    mlflow: bool = True,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    montage_volumes: int = 4,
    progress: bool = True,
) -> dict:
    """Evaluate a folder of synthetic volumes against real ones; write results, report and plots; log to MLflow.

    Reported (``results.json``):

    - ``fid``: 3D FID (Fréchet distance of Gaussian fits to the features), ``n_real`` / ``n_fake`` it rests on, the
      extractor (``medicalnet``: comparable with papers when the protocol's N and preset are used; ``random_conv3d``:
      not), the input preset (``wdm`` [0, 1] / ``hagan`` [-1, 1]).
    - ``ms_ssim``: ``fake`` and ``real``: mean MS-SSIM over pairs with a bootstrap CI (lower = more diverse; the
      goal is the real set's value), pairs used, and the scales/kernel (adapted for small volumes, then stated).
    - ``wasserstein``: 1-Wasserstein distance of the voxel-intensity histograms (intensity units; HU for CT).
    - ``mmd_features`` / ``mmd_voxels``: RBF MMD on the FID features and on volumes downsampled to
      ``mmd_voxel_size``^3.
    - ``memorization``: nearest training volume of each synthetic one by NCC (and by feature cosine), the
      real-to-real NN NCC reference, the threshold and the suspected copies.
    - ``timings``: seconds per step.

    Args:
        real: folder of NIfTI volumes or datalist JSON (``split`` / ``image_key``): the reference (training) set.
        fake: folder of synthetic NIfTI volumes: an inference output folder, whose ``manifest.json`` must list exactly
            the volumes in it, or a plain folder of volumes that never had a manifest (see
            :func:`check_sample_folder`, which refuses a folder mixing two runs' samples).
        out_dir: where results go (default: ``<fake>/evaluation``).
        weights: MedicalNet's ``resnet_50_23dataset.pth`` (see :func:`build_feature_extractor`).
        features: ``"auto"``, ``"medicalnet"`` or ``"random_conv3d"``.
        extractor: a ready feature extractor (overrides ``features`` / ``weights``).
        preset: FID input normalisation, ``"wdm"`` or ``"hagan"``.
        pairs: MS-SSIM pairs per set (int), or ``"all"``.
        kernel_size: MS-SSIM kernel (the protocol: 7).
        ms_ssim_adapt: fewer scales / smaller kernel for small volumes (else an error naming the minimum size).
        split, image_key: for a datalist ``real``.
        value_range: data intensity range mapped to the preset (default: the manifest's / datalist's
            ``intensity_range``, else the real set's min/max).
        copy_threshold: NCC at or above which a sample is a suspected copy (default: automatic, see
            :mod:`wdm3d.metrics.memorization`).
        ncc_downsample: average-pool factor before the NCC.
        mmd_voxel_size: side of the downsampled volumes for the voxel MMD.
        max_real: use only the first ``max_real`` real volumes (memory: 8 MB per 128^3 volume).
        batch_size: volumes per feature-extraction pass.
        device: None: CUDA when present.
        num_threads: CPU threads for the MS-SSIM pairs (default: the number of cores).
        seed: pair sampling and bootstrap.
        mlflow: log metrics + report to the generating run (a failure only warns).
        mlflow_run_id, tracking_uri: override the run found from the manifest / ``mlflow_run.json``.
        montage_volumes: volumes in each sample montage.
        progress: progress output.
    """
    if preset not in ("wdm", "hagan"):
        raise ValueError(f"preset must be 'wdm' or 'hagan', got {preset!r}.")
    fake_dir = Path(fake)
    if not fake_dir.is_dir():
        raise FileNotFoundError(f"Synthetic volumes folder {fake_dir} does not exist (run inference first).")
    check_sample_folder(fake_dir)
    out = Path(out_dir) if out_dir is not None else fake_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)
        if progress:
            print(f"  {name}: {timings[name]:.2f} s", flush=True)

    t0 = time.perf_counter()
    fake_vols, fake_names, affine = load_volumes(fake_dir)
    real_vols, real_names, _ = load_volumes(real, split, image_key, limit=max_real)
    if fake_vols.shape[1:] != real_vols.shape[1:]:
        raise ValueError(f"Synthetic volumes are {fake_vols.shape[1:]} ({fake_dir / fake_names[0]}) but real ones are "
                         f"{real_vols.shape[1:]} ({real_names[0]}): evaluate at the same size.")
    for what, v in (("synthetic", fake_vols), ("real", real_vols)):
        if len(v) < 2:
            raise ValueError(f"Evaluation needs at least 2 {what} volumes, got {len(v)}.")
    vrange, vrange_source = _value_range(value_range, fake_dir, real, real_vols)
    tick("load", t0)
    if progress:
        print(f"Evaluating {len(fake_vols)} synthetic vs {len(real_vols)} real volumes of shape {fake_vols.shape[1:]} "
              f"on {device}", flush=True)

    t0 = time.perf_counter()
    if extractor is None:
        with warnings.catch_warnings():  # the note on random_conv3d goes into the results, the report and the output
            warnings.simplefilter("ignore", UserWarning)
            extractor = build_feature_extractor(features, weights)
    name = _extractor_name(extractor)
    real_feats = extract_features(extractor, real_vols, vrange, preset, batch_size, device)
    fake_feats = extract_features(extractor, fake_vols, vrange, preset, batch_size, device)
    fid = {**fid_from_features(real_feats, fake_feats), "extractor": name, "comparable_with_papers": name == "medicalnet",
           "preset": preset, "weights": str(weights) if weights and name == "medicalnet" else None}
    if name != "medicalnet":
        fid["note"] = _NOT_COMPARABLE
    tick("fid", t0)

    t0 = time.perf_counter()
    # [0, 1] copies for MS-SSIM (data_range 1) and the voxel MMD
    unit = {"fake": normalize_volumes(fake_vols, vrange, "wdm"), "real": normalize_volumes(real_vols, vrange, "wdm")}
    div = {s: ms_ssim_diversity(v, pairs, kernel_size, ms_ssim_adapt, seed=seed, num_threads=num_threads,
                                device=device) for s, v in unit.items()}
    tick("ms_ssim", t0)

    t0 = time.perf_counter()
    wass = intensity_wasserstein(real_vols, fake_vols, vrange)
    tick("wasserstein", t0)

    t0 = time.perf_counter()
    mmd_feat = mmd_rbf(real_feats, fake_feats)
    size = min(mmd_voxel_size, *fake_vols.shape[1:])
    mmd_vox = {**mmd_rbf(downsample_volumes(unit["real"], size), downsample_volumes(unit["fake"], size)), "size": size}
    del unit
    tick("mmd", t0)

    t0 = time.perf_counter()
    mem = memorization_audit(fake_vols, real_vols, fake_names, real_names, copy_threshold, downsample=ncc_downsample,
                             fake_embeddings=fake_feats, train_embeddings=real_feats, device=device)
    tick("memorization", t0)

    t0 = time.perf_counter()
    files: dict[str, str] = {}
    edges = np.asarray(wass["edges"])
    group = max(1, (len(edges) - 1) // 256)  # plot at most ~256 bins (the distance uses the fine histogram)
    if (len(edges) - 1) % group:
        group = 1
    counts = {k: np.asarray(wass[c]).reshape(-1, group).sum(1) for k, c in (("real", "real_counts"),
                                                                            ("synthetic", "fake_counts"))}
    files["intensity_histogram"] = plot_histograms(
        out / "intensity_histogram.png", edges[::group], counts,
        f"Voxel intensities (W1 = {wass['wasserstein']:.4g})", "intensity", log=True).name
    lo = min(min(mem["fake_nn_values"]), min(mem["real_nn_values"]), mem["threshold"]) - 0.01
    nn_edges = np.linspace(max(-1.0, lo), 1.0, 41)
    files["nn_ncc"] = plot_histograms(
        out / "nn_ncc.png", nn_edges, {"synthetic -> training": histogram_counts(mem["fake_nn_values"], nn_edges),
                                       "training -> training": histogram_counts(mem["real_nn_values"], nn_edges)},
        "Nearest-neighbour NCC", "NCC", vline=mem["threshold"], vline_label="copy threshold").name
    lo = min(min(div["fake"]["values"]), min(div["real"]["values"])) - 0.01
    ss_edges = np.linspace(max(0.0, lo), 1.0, 41)
    files["ms_ssim"] = plot_histograms(
        out / "ms_ssim.png", ss_edges, {"synthetic pairs": histogram_counts(div["fake"]["values"], ss_edges),
                                        "real pairs": histogram_counts(div["real"]["values"], ss_edges)},
        "Pairwise MS-SSIM (lower = more diverse)", "MS-SSIM").name
    files["montage_synthetic"] = save_montage(out / "montage_synthetic.png", list(fake_vols[:montage_volumes]),
                                              affine=affine, value_range=vrange).name
    files["montage_real"] = save_montage(out / "montage_real.png", list(real_vols[:montage_volumes]), affine=affine,
                                         value_range=vrange).name
    tick("report", t0)

    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wdm3d_version": __version__, "real": str(real), "fake": str(fake_dir), "split": split,
        "n_real": int(len(real_vols)), "n_fake": int(len(fake_vols)), "shape": list(fake_vols.shape[1:]),
        "value_range": vrange, "value_range_source": vrange_source, "preset": preset, "device": str(device),
        "fid": fid, "ms_ssim": div, "wasserstein": wass, "mmd_features": mmd_feat, "mmd_voxels": mmd_vox,
        "memorization": mem, "timings": timings, "files": {**files, "report": "report.md", "results": "results.json"},
    }
    metrics = {
        f"eval_fid_{name}": fid["fid"],
        "eval_ms_ssim_fake": div["fake"]["mean"], "eval_ms_ssim_real": div["real"]["mean"],
        "eval_wasserstein_intensity": wass["wasserstein"],
        "eval_mmd_features": mmd_feat["mmd"], "eval_mmd_voxels": mmd_vox["mmd"],
        "eval_nn_ncc_fake_median": mem["fake_nn_ncc"]["median"], "eval_nn_ncc_real_median": mem["real_nn_ncc"]["median"],
        "eval_copy_fraction": mem["copy_fraction"], "eval_n_fake": float(len(fake_vols)), "eval_n_real": float(len(real_vols)),
    }
    results["metrics"] = metrics
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "report.md", _report(results))
    results["mlflow_logged"] = False
    if mlflow:
        run_info = find_run_info(fake_dir, mlflow_run_id, tracking_uri)
        if run_info:
            from .tracking import log_to_run

            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            uploads = [out / "results.json", out / "report.md"] + [out / f for f in files.values()]
            results["mlflow_logged"] = log_to_run(run_info, uploads, f"evaluation/{stamp}", metrics)
            if results["mlflow_logged"] and progress:
                print(f"Logged the evaluation to MLflow run {run_info['run_id']} ({run_info['tracking_uri']})")
        results["mlflow_run"] = run_info
    if progress:
        print(f"FID ({name}) {fid['fid']:.4g}  MS-SSIM synthetic {div['fake']['mean']:.4f} / real {div['real']['mean']:.4f}"
              f"  W1 {wass['wasserstein']:.4g}  suspected copies {len(mem['suspected_copies'])}/{len(fake_vols)}")
        if name != "medicalnet":
            print("Note: " + _NOT_COMPARABLE + ". " + medicalnet_weights_help("--weights PATH"))
        print(f"Wrote results.json, report.md and plots to {out}")
    return results


class Evaluator:
    """Bundle wrapper: ``Evaluator(**kwargs).run()`` calls :func:`evaluate` (see it for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def run(self) -> dict:
        return evaluate(**self.kwargs)
