"""Reference-guided generation: new volumes of a reference's modality at each image prompt strength lambda, with
the same seeds at every lambda, measured against the reference, the split's other cases and each other."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..engine.seeding import derive_seed
from ..io import save_montage
from ..metrics.reconstruction import psnr, ssim3d
from .grid import reference_grid

if TYPE_CHECKING:  # for the annotation only: conditional.py imports this module
    from .conditional import ConditionalSynthesis

__all__ = ["run_reference_guided"]

logger = logging.getLogger(__name__)


def _pairwise(metric: Callable[[torch.Tensor, torch.Tensor], float], vols: Sequence[torch.Tensor]) -> float | None:
    vals = [metric(vols[i], vols[j]) for i in range(len(vols)) for j in range(i + 1, len(vols))]
    return float(np.mean(vals)) if vals else None


def run_reference_guided(job: ConditionalSynthesis, cases: list[dict]) -> dict[str, Any]:
    """Sample ``job.num_samples`` volumes per reference at each lambda of ``job.ip_scales`` and measure them.

    Sample ``j`` uses the same seed for every reference and lambda; lambda = 0 (the base model, which ignores the
    reference) is sampled once and shared. A reference or lambda that fails is reported and the rest go on.

    Args:
        job: the loaded run (its settings, sampler and writers).
        cases: the split's entries, each with its ``case`` name and absolute paths.

    Returns:
        ``{"manifest": {"cases", "samples", "failures"}, "metrics": ..., "files": [written NIfTI and PNG]}``.

    Raises:
        RuntimeError: no reference could be read, or generation failed for every one.
    """
    mod = job.reference_modality
    refs: dict[str, tuple[str, torch.Tensor]] = {}
    failures = []
    for entry in cases:
        name = str(entry["case"])
        try:
            if "error" in entry:
                raise ValueError(entry["error"])
            path = entry.get(mod)
            if not isinstance(path, str):
                raise KeyError(f"case {name} has no reference {mod!r} (keys {sorted(entry)}).")
            refs[name] = (path, job.load_volume(path).cpu())
        except Exception as err:
            logger.error("Case %s failed: %s: %s", name, type(err).__name__, err)
            failures.append({"case": name, "file": str(entry.get(mod)), "error": f"{type(err).__name__}: {err}"})
    if not refs:
        raise RuntimeError(f"No reference of split {job.split!r} in {job.datalist} could be read: {failures}")

    def ssim(a, b):
        return float(ssim3d(a, b, 2.0)[0])

    def psnr_(a, b):
        return float(psnr(a, b, 2.0)[0])

    seeds = [derive_seed(job.seed, j) for j in range(job.num_samples)]  # sample j: one seed for every reference
    rows, files, cache = [], [], {}
    for name, (path, ref) in refs.items():
        others = [v for n, (_, v) in refs.items() if n != name]
        for scale in job.ip_scales:
            try:
                key = ("unconditional", job.seed) if scale == 0.0 else None  # lambda 0 is the base: same for all
                t_case = time.perf_counter()
                if key in cache:
                    vols = cache[key]
                else:
                    vols = torch.cat(
                        [job.generate(ref.to(job.device), mod, seeds[j], scale).cpu() for j in range(job.num_samples)]
                    )
                    if key is not None:
                        cache[key] = vols
                seconds = time.perf_counter() - t_case
                folder = job.output_dir / name / f"lambda_{scale:g}"
                for j in range(job.num_samples):
                    v = vols[j : j + 1]
                    nii = job.write_volume(
                        v[0],
                        path,
                        folder / f"sample_{j:02d}.nii.gz",
                        f"reference-guided {mod} lambda {scale:g} (wdm3d)",
                    )
                    files.append(nii)
                    rows.append(
                        {
                            "case": name,
                            "ip_scale": scale,
                            "sample": j,
                            "seed": seeds[j],
                            "nifti": str(nii.relative_to(job.output_dir)),
                            "ssim_to_reference": ssim(v, ref),
                            "psnr_to_reference": psnr_(v, ref),
                            "ssim_to_others": float(np.mean([ssim(v, o) for o in others])) if others else None,
                            "psnr_to_others": float(np.mean([psnr_(v, o) for o in others])) if others else None,
                            "seconds": round(seconds / job.num_samples, 2),
                        }
                    )
                png = save_montage(
                    folder / "montage.png",
                    [ref[0, 0]] + [vols[j, 0] for j in range(len(vols))],
                    affine=reference_grid(path)[0],
                    value_range=(-1.0, 1.0),
                )
                files.append(png)
                rows[-1]["ssim_between_samples"] = _pairwise(ssim, [vols[j : j + 1] for j in range(len(vols))])
            except Exception as err:
                logger.error("Case %s (lambda %g) failed: %s: %s", name, scale, type(err).__name__, err)
                failures.append({"case": name, "ip_scale": scale, "error": f"{type(err).__name__}: {err}"})
    if not rows:
        raise RuntimeError(f"Reference-guided generation failed for every reference: {failures}")
    summary = {}
    for scale in job.ip_scales:
        sel = [r for r in rows if r["ip_scale"] == scale]
        if not sel:
            continue

        def mean(key, sel=sel):
            vals = [r[key] for r in sel if isinstance(r.get(key), (int, float))]
            return float(np.mean(vals)) if vals else None

        s = {
            k: mean(k)
            for k in (
                "ssim_to_reference",
                "ssim_to_others",
                "psnr_to_reference",
                "psnr_to_others",
                "ssim_between_samples",
            )
        }
        s["ssim_margin"] = s["ssim_to_reference"] - s["ssim_to_others"] if s["ssim_to_others"] is not None else None
        s["num_volumes"] = len(sel)
        summary[f"{scale:g}"] = s
        print(
            f"reference-guided {mod}, lambda {scale:g}: SSIM to reference {s['ssim_to_reference']:.4f}"
            + (f", to other cases {s['ssim_to_others']:.4f}" if s["ssim_to_others"] is not None else "")
        )
    metrics = {
        "mode": "reference_guided",
        "method": job.method,
        "modality": mod,
        "ip_scales": job.ip_scales,
        "num_samples": job.num_samples,
        "guidance_scale": job.guidance_scale,
        "value_range": [-1.0, 1.0],
        "summary": summary,
        "samples": rows,
        "failures": failures,
    }
    cases_out = sorted({r["case"] for r in rows})
    return {"manifest": {"cases": cases_out, "samples": rows, "failures": failures}, "metrics": metrics, "files": files}
