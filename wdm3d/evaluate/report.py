"""The Markdown report of an evaluation (``report.md``): the metrics table, suspected copies, plots and costs."""

from __future__ import annotations

from typing import Any

from ..networks.medicalnet import medicalnet_weights_help

__all__ = ["report_markdown"]


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def report_markdown(results: dict) -> str:
    """``report.md`` for the ``results.json`` contents of :func:`wdm3d.evaluate.evaluate`.

    Args:
        results: what :func:`~wdm3d.evaluate.evaluate` wrote to ``results.json``.
    """
    r = results
    fid, div, mem = r["fid"], r["ms_ssim"], r["memorization"]
    lines = [
        "# wdm3d evaluation",
        "",
        f"- synthetic: `{r['fake']}` ({r['n_fake']} volumes); real: `{r['real']}` ({r['n_real']} volumes, split "
        f"`{r['split']}`); shape {r['shape']}",
        f"- intensity range {r['value_range']} ({r['value_range_source']}), FID input preset `{r['preset']}`",
        "",
        "| metric | synthetic | real | note |",
        "|---|---|---|---|",
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
