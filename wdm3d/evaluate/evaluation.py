"""One evaluation: load both sets, compute every metric, write ``results.json``, ``report.md`` and the plots, and log
them to the generating MLflow run."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data import read_datalist
from ..io import atomic_write_text, save_montage
from ..metrics import (
    downsample_volumes,
    extract_features,
    fid_from_features,
    intensity_wasserstein,
    memorization_audit,
    mmd_rbf,
    ms_ssim_diversity,
    normalize_volumes,
)
from ..metrics.plots import histogram_counts, plot_histograms
from ..networks.medicalnet import medicalnet_weights_help
from ..tracking import log_to_run
from .features import NOT_COMPARABLE, build_feature_extractor, extractor_name
from .report import report_markdown
from .run_info import find_run_info
from .samples import check_sample_folder, load_volumes

__all__ = ["Evaluator", "evaluate"]


def _value_range(
    value_range: Sequence[float] | None, fake_dir: Path, real: Any, real_vols: np.ndarray
) -> tuple[list[float], str]:
    # the intensity range the volumes span, and where it came from: given, the manifest, the datalist, the data
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        return [lo, hi], "given"
    manifest = fake_dir / "manifest.json"
    if manifest.is_file():
        try:
            r = json.loads(manifest.read_text()).get("intensity_range")
            if r and float(r[0]) < float(r[1]):
                return [float(r[0]), float(r[1])], "manifest.json intensity_range"
        except (json.JSONDecodeError, TypeError, ValueError):  # an unreadable manifest: try the datalist's range
            pass
    if isinstance(real, (str, os.PathLike)) and str(real).endswith(".json"):
        r = read_datalist(real).get("intensity_range")
        if r:
            return [float(r[0]), float(r[1])], "datalist intensity_range"
    lo, hi = float(real_vols.min()), float(real_vols.max())
    if not hi > lo:
        hi = lo + 1.0
    return [lo, hi], "min/max of the real volumes"


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
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    timings: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)
        if progress:
            print(f"  {name}: {timings[name]:.2f} s", flush=True)

    t0 = time.perf_counter()
    fake_vols, fake_names, affine = load_volumes(fake_dir)
    real_vols, real_names, _ = load_volumes(real, split, image_key, limit=max_real)
    if fake_vols.shape[1:] != real_vols.shape[1:]:
        raise ValueError(
            f"Synthetic volumes are {fake_vols.shape[1:]} ({fake_dir / fake_names[0]}) but real ones are "
            f"{real_vols.shape[1:]} ({real_names[0]}): evaluate at the same size."
        )
    for what, v in (("synthetic", fake_vols), ("real", real_vols)):
        if len(v) < 2:
            raise ValueError(f"Evaluation needs at least 2 {what} volumes, got {len(v)}.")
    vrange, vrange_source = _value_range(value_range, fake_dir, real, real_vols)
    tick("load", t0)
    if progress:
        print(
            f"Evaluating {len(fake_vols)} synthetic vs {len(real_vols)} real volumes of shape {fake_vols.shape[1:]} "
            f"on {device}",
            flush=True,
        )

    t0 = time.perf_counter()
    if extractor is None:
        with warnings.catch_warnings():  # the note on random_conv3d goes into the results, the report and the output
            warnings.simplefilter("ignore", UserWarning)
            extractor = build_feature_extractor(features, weights)
    name = extractor_name(extractor)
    real_feats = extract_features(extractor, real_vols, vrange, preset, batch_size, device)
    fake_feats = extract_features(extractor, fake_vols, vrange, preset, batch_size, device)
    fid = {
        **fid_from_features(real_feats, fake_feats),
        "extractor": name,
        "comparable_with_papers": name == "medicalnet",
        "preset": preset,
        "weights": str(weights) if weights and name == "medicalnet" else None,
    }
    if name != "medicalnet":
        fid["note"] = NOT_COMPARABLE
    tick("fid", t0)

    t0 = time.perf_counter()
    # [0, 1] copies for MS-SSIM (data_range 1) and the voxel MMD
    unit = {"fake": normalize_volumes(fake_vols, vrange, "wdm"), "real": normalize_volumes(real_vols, vrange, "wdm")}
    div = {
        s: ms_ssim_diversity(v, pairs, kernel_size, ms_ssim_adapt, seed=seed, num_threads=num_threads, device=device)
        for s, v in unit.items()
    }
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
    mem = memorization_audit(
        fake_vols,
        real_vols,
        fake_names,
        real_names,
        copy_threshold,
        downsample=ncc_downsample,
        fake_embeddings=fake_feats,
        train_embeddings=real_feats,
        device=device,
    )
    tick("memorization", t0)

    t0 = time.perf_counter()
    files: dict[str, str] = {}
    edges = np.asarray(wass["edges"])
    group = max(1, (len(edges) - 1) // 256)  # plot at most ~256 bins (the distance uses the fine histogram)
    if (len(edges) - 1) % group:
        group = 1
    counts = {
        k: np.asarray(wass[c]).reshape(-1, group).sum(1)
        for k, c in (("real", "real_counts"), ("synthetic", "fake_counts"))
    }
    files["intensity_histogram"] = plot_histograms(
        out / "intensity_histogram.png",
        edges[::group],
        counts,
        f"Voxel intensities (W1 = {wass['wasserstein']:.4g})",
        "intensity",
        log=True,
    ).name
    lo = min(min(mem["fake_nn_values"]), min(mem["real_nn_values"]), mem["threshold"]) - 0.01
    nn_edges = np.linspace(max(-1.0, lo), 1.0, 41)
    files["nn_ncc"] = plot_histograms(
        out / "nn_ncc.png",
        nn_edges,
        {
            "synthetic -> training": histogram_counts(mem["fake_nn_values"], nn_edges),
            "training -> training": histogram_counts(mem["real_nn_values"], nn_edges),
        },
        "Nearest-neighbour NCC",
        "NCC",
        vline=mem["threshold"],
        vline_label="copy threshold",
    ).name
    lo = min(min(div["fake"]["values"]), min(div["real"]["values"])) - 0.01
    ss_edges = np.linspace(max(0.0, lo), 1.0, 41)
    files["ms_ssim"] = plot_histograms(
        out / "ms_ssim.png",
        ss_edges,
        {
            "synthetic pairs": histogram_counts(div["fake"]["values"], ss_edges),
            "real pairs": histogram_counts(div["real"]["values"], ss_edges),
        },
        "Pairwise MS-SSIM (lower = more diverse)",
        "MS-SSIM",
    ).name
    files["montage_synthetic"] = save_montage(
        out / "montage_synthetic.png", list(fake_vols[:montage_volumes]), affine=affine, value_range=vrange
    ).name
    files["montage_real"] = save_montage(
        out / "montage_real.png", list(real_vols[:montage_volumes]), affine=affine, value_range=vrange
    ).name
    tick("report", t0)

    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wdm3d_version": __version__,
        "real": str(real),
        "fake": str(fake_dir),
        "split": split,
        "n_real": int(len(real_vols)),
        "n_fake": int(len(fake_vols)),
        "shape": list(fake_vols.shape[1:]),
        "value_range": vrange,
        "value_range_source": vrange_source,
        "preset": preset,
        "device": str(device),
        "fid": fid,
        "ms_ssim": div,
        "wasserstein": wass,
        "mmd_features": mmd_feat,
        "mmd_voxels": mmd_vox,
        "memorization": mem,
        "timings": timings,
        "files": {**files, "report": "report.md", "results": "results.json"},
    }
    metrics = {
        f"eval_fid_{name}": fid["fid"],
        "eval_ms_ssim_fake": div["fake"]["mean"],
        "eval_ms_ssim_real": div["real"]["mean"],
        "eval_wasserstein_intensity": wass["wasserstein"],
        "eval_mmd_features": mmd_feat["mmd"],
        "eval_mmd_voxels": mmd_vox["mmd"],
        "eval_nn_ncc_fake_median": mem["fake_nn_ncc"]["median"],
        "eval_nn_ncc_real_median": mem["real_nn_ncc"]["median"],
        "eval_copy_fraction": mem["copy_fraction"],
        "eval_n_fake": float(len(fake_vols)),
        "eval_n_real": float(len(real_vols)),
    }
    results["metrics"] = metrics
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "report.md", report_markdown(results))
    results["mlflow_logged"] = False
    if mlflow:
        run_info = find_run_info(fake_dir, mlflow_run_id, tracking_uri)
        if run_info:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            uploads = [out / "results.json", out / "report.md"] + [out / f for f in files.values()]
            results["mlflow_logged"] = log_to_run(run_info, uploads, f"evaluation/{stamp}", metrics)
            if results["mlflow_logged"] and progress:
                print(f"Logged the evaluation to MLflow run {run_info['run_id']} ({run_info['tracking_uri']})")
        results["mlflow_run"] = run_info
    if progress:
        print(
            f"FID ({name}) {fid['fid']:.4g}  MS-SSIM synthetic {div['fake']['mean']:.4f} / real {div['real']['mean']:.4f}"
            f"  W1 {wass['wasserstein']:.4g}  suspected copies {len(mem['suspected_copies'])}/{len(fake_vols)}"
        )
        if name != "medicalnet":
            print("Note: " + NOT_COMPARABLE + ". " + medicalnet_weights_help("--weights PATH"))
        print(f"Wrote results.json, report.md and plots to {out}")
    return results


class Evaluator:
    """Bundle wrapper: ``Evaluator(**kwargs).run()`` calls :func:`evaluate` (see it for the arguments)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def run(self) -> dict:
        return evaluate(**self.kwargs)
