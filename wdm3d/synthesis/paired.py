"""Paired cross-modality synthesis: for each case, the target modality generated from its reference volume, written
on the reference's grid, with PSNR / SSIM / MAE against the true target where the case has one."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..engine.seeding import derive_seed
from ..io import save_montage
from ..metrics import reconstruction_metrics, summarize_cases
from .grid import reference_grid

if TYPE_CHECKING:  # for the annotation only: conditional.py imports this module
    from .conditional import ConditionalSynthesis

__all__ = ["run_paired"]

logger = logging.getLogger(__name__)


def run_paired(job: ConditionalSynthesis, cases: list[dict]) -> dict[str, Any]:
    """Generate ``job.target_modality`` for every case, write it and measure it against the truth.

    A case that fails is reported in ``failures`` and the rest go on.

    Args:
        job: the loaded run (its settings, sampler and writers).
        cases: the split's entries, each with its ``case`` name and absolute paths.

    Returns:
        ``{"manifest": {"cases", "failures"}, "metrics": ..., "files": [written NIfTI and PNG]}``.

    Raises:
        RuntimeError: no case could be synthesised.
    """
    rows, failures, metric_rows, files = [], [], [], []
    tgt = job.target_modality
    for i, entry in enumerate(cases):
        name = str(entry["case"])
        try:
            if "error" in entry:
                raise ValueError(entry["error"])
            ref_path = entry.get(job.reference_modality)
            if not isinstance(ref_path, str):
                raise KeyError(f"case {name} has no reference {job.reference_modality!r} (keys {sorted(entry)}).")
            reference = job.load_volume(ref_path)
            t_case = time.perf_counter()
            seed = derive_seed(job.seed, i)
            synth = job.generate(reference, tgt, seed)[0]
            seconds = time.perf_counter() - t_case
            nii = job.write_volume(
                synth,
                ref_path,
                job.output_dir / f"{name}_{tgt}.nii.gz",
                f"synthetic {tgt} from {job.reference_modality} (wdm3d {job.method})",
            )
            row: dict[str, Any] = {
                "case": name,
                "index": i,
                "seed": seed,
                "reference": ref_path,
                "nifti": nii.name,
                "seconds": round(seconds, 2),
            }
            shown = [reference[0, 0], synth[0]]
            truth_path = entry.get(tgt)
            if isinstance(truth_path, str) and os.path.isfile(truth_path):
                truth = job.load_volume(truth_path)
                values = reconstruction_metrics(synth[None], truth, (-1.0, 1.0))[0]
                row.update(truth=truth_path, **values)
                metric_rows.append({"case": name, **values})
                shown.append(truth[0, 0])
            png = save_montage(
                job.output_dir / f"{name}_{tgt}.png",
                [v.cpu() for v in shown],
                affine=reference_grid(ref_path)[0],
                value_range=(-1.0, 1.0),
            )
            row["png"] = png.name
            files += [nii, png]
            rows.append(row)
            logger.info(
                "Case %s: %s%s",
                name,
                nii,
                ""
                if "psnr" not in row
                else f" (PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, MAE {row['mae']:.4f})",
            )
        except Exception as err:  # one bad case must not end the run: report it and go on
            logger.error("Case %s failed: %s: %s", name, type(err).__name__, err)
            failures.append(
                {"case": name, "file": str(entry.get(job.reference_modality)), "error": f"{type(err).__name__}: {err}"}
            )
    if not rows:
        raise RuntimeError(
            f"No case of split {job.split!r} in {job.datalist} could be synthesised; failures: {failures}"
        )
    summary = (
        summarize_cases([{k: v for k, v in r.items() if k != "case"} for r in metric_rows]) if metric_rows else None
    )
    metrics = {
        "mode": "paired",
        "method": job.method,
        "target_modality": tgt,
        "reference_modality": job.reference_modality,
        "ip_scale": job.ip_scale,
        "guidance_scale": job.guidance_scale,
        "value_range": [-1.0, 1.0],
        "summary": summary,
        "cases": metric_rows,
        "failures": failures,
    }
    if summary:
        print(
            f"{job.method} {job.reference_modality}->{tgt} on {summary['num_cases']} case(s): PSNR "
            f"{summary['psnr_mean']:.2f} dB, SSIM {summary['ssim_mean']:.4f}, MAE {summary['mae_mean']:.4f}"
        )
    return {"manifest": {"cases": rows, "failures": failures}, "metrics": metrics, "files": files}
