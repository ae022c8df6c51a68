"""Small PNG plots drawn with PIL (matplotlib is not a dependency): overlaid histograms with a legend."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write_bytes

__all__ = ["plot_histograms", "histogram_counts"]

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def histogram_counts(values: Sequence[float], edges: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(np.asarray(values, float), edges[0], edges[-1]), bins=edges)[0]


def plot_histograms(
    path: str | os.PathLike,
    edges: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    vline: float | None = None,
    vline_label: str = "",
    density: bool = True,
    log: bool = False,
    size: tuple[int, int] = (640, 360),
) -> Path:
    """Step-line histograms over shared ``edges`` (``series``: label -> counts per bin), as a PNG.

    Args:
        path: output PNG.
        edges: ``(bins + 1,)`` bin edges.
        series: counts per bin for each label (normalised to densities when ``density``).
        title, xlabel: text.
        vline: optional x position of a dashed vertical line (e.g. a threshold), labelled ``vline_label``.
        density: normalise each series to sum 1.
        log: plot ``log10(1 + counts)`` (densities: ``log10(1 + 1e6 * density)``), for backgrounds that dominate.
    """
    edges = np.asarray(edges, float)
    if edges.ndim != 1 or len(edges) < 2 or not edges[-1] > edges[0]:
        raise ValueError("edges must be an increasing 1D sequence of at least 2 values.")
    w, h = size
    left, right, top, bottom = 60, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ys = {k: np.asarray(v, float) / (max(float(np.sum(v)), 1e-300) if density else 1.0) for k, v in series.items()}
    if log:
        ys = {k: np.log10(1 + (1e6 * v if density else v)) for k, v in ys.items()}
    ymax = max([float(v.max()) for v in ys.values() if len(v)] + [1e-12])
    x0, x1 = float(edges[0]), float(edges[-1])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - y / ymax * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in np.linspace(x0, x1, 5):
        draw.line([px(t), h - bottom, px(t), h - bottom + 4], fill="black")
        draw.text((px(t) - 15, h - bottom + 6), f"{t:.3g}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text((w // 2 - 40, h - 16), xlabel, fill="black", font=font)
    draw.text((4, top), ("log " if log else "") + ("density" if density else "count"), fill="black", font=font)
    for n, (label, y) in enumerate(ys.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        pts = []
        for i, v in enumerate(y):
            pts += [(px(edges[i]), py(v)), (px(edges[i + 1]), py(v))]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        draw.rectangle([w - right - 150, top + 8 + 14 * n, w - right - 140, top + 18 + 14 * n], fill=colour)
        draw.text((w - right - 135, top + 7 + 14 * n), str(label), fill="black", font=font)
    if vline is not None and x0 <= vline <= x1:
        for yy in range(top, h - bottom, 8):
            draw.line([px(vline), yy, px(vline), min(yy + 4, h - bottom)], fill=(90, 90, 90), width=1)
        if vline_label:
            draw.text(
                (px(vline) - 6 * len(vline_label) - 4, h - bottom - 14), vline_label, fill=(90, 90, 90), font=font
            )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
