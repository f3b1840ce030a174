"""The report's figures as inline SVG, drawn with matplotlib. Every point is its own SVG group (`gid`), and
its hover text goes into a tooltip map that the page's script reads. Output is byte-stable: a fixed hash salt
for matplotlib's ids and no date in the metadata.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF boilerplate with namespace URIs
    return text[text.index("<svg") :]  # inline: no XML prolog or doctype


def _figure(width: float = 5.2, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.hashsalt": "vrlab-report",
            "svg.fonttype": "none",
            "font.size": 10,
            "font.family": "DejaVu Sans",
        }
    )
    return plt.subplots(figsize=(width, height))


def _labelled_points(
    ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str], prefix: str, colours: Any = None
) -> list[str]:
    """One marker per point, each named by its `gid`, with its label beside it; labels alternate above and
    below, so neighbours in x do not print over each other."""
    gids = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        gid = f"{prefix}-{i}"
        colour = colours[i] if colours is not None else "#1f5fa8"
        ax.plot([x], [y], "o", ms=8, color=colour, mec="black", mew=0.6, gid=gid)
        gids.append(gid)
    ax.margins(0.18)
    _place_labels(ax, xs, ys, names)
    return gids


def _place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str]) -> None:
    """Each label beside its point: the first of a few nearby spots (right, then left, stepping up and down)
    where it overlaps no label placed before it and stays inside the axes; points that coincide, such as two
    encoders with the same A and C, get labels on either side or stacked."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox

    # the markers count as taken, so no label is printed over a point
    placed: list[Any] = [
        Bbox.from_bounds(px - 6, py - 6, 12, 12) for px, py in ax.transData.transform(np.c_[xs, ys])
    ]
    spots = [(dx, dy) for dy in (3, 14, -9, 25, -20, 36, -31) for dx in (7, -7)]
    for k in sorted(range(len(names)), key=lambda i: (-ys[i], xs[i])):
        for n, (dx, dy) in enumerate(spots):
            text = ax.annotate(
                names[k],
                (xs[k], ys[k]),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=8.5,
                ha="left" if dx > 0 else "right",
            )
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside and not any(box.overlaps(other) for other in placed)) or n == len(spots) - 1:
                placed.append(box)
                break
            text.remove()


def ac_plane(
    rows: Sequence[dict[str, Any]], benchmark: str, prefix: str, a_label: str
) -> tuple[str, dict[str, str]]:
    """The (A, C) plane of one benchmark, points coloured by the measured score."""
    import matplotlib.cm as cm

    fig, ax = _figure()
    scores = np.array([r["score"] if r["score"] is not None else np.nan for r in rows], float)
    finite = scores[np.isfinite(scores)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    norm = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    colours = [cm.viridis(v) if np.isfinite(v) else (0.8, 0.8, 0.8, 1) for v in norm]
    gids = _labelled_points(
        ax, [r["A"] for r in rows], [r["C"] for r in rows], [r["name"] for r in rows], prefix, colours
    )
    ax.set_xlabel(a_label)
    ax.set_ylabel("C: visual correspondence (PCK, %)")
    ax.set_title(f"{benchmark}: colour = measured score ({lo:.2f} to {hi:.2f})", fontsize=10)
    ax.grid(alpha=0.3)
    tips = {
        g: f"{r['name']} · A {r['A']:.3f} · C {r['C']:.1f}% · {benchmark} {r['score'] if r['score'] is None else round(r['score'], 3)}"
        for g, r in zip(gids, rows, strict=True)
    }
    return _svg(fig), tips


def predicted_vs_measured(
    fit: dict[str, Any], names: Sequence[str], prefix: str
) -> tuple[str, dict[str, str]]:
    """Measured against leave-one-out predicted scores of one benchmark (both min-max normalised)."""
    fig, ax = _figure(4.6, 4.0)
    measured, loo = fit["measured"], fit["loo_predicted"]
    span = [min([*measured, *loo, 0.0]), max([*measured, *loo, 1.0])]
    ax.plot(span, span, "--", color="grey", lw=1)
    gids = _labelled_points(ax, measured, loo, names, prefix)
    ax.set_xlabel("measured score (min-max normalised over the candidates)")
    ax.set_ylabel("leave-one-out prediction of the AC law (same units)")
    r2 = fit["loo_r2"].get("AC")
    ax.set_title(f"{fit['benchmark']}: LOO R² {r2:.2f}" if r2 is not None else fit["benchmark"], fontsize=10)
    ax.grid(alpha=0.3)
    tips = {
        g: f"{n} · measured {m:.2f} · in-sample {p:.2f} · leave-one-out {q:.2f}"
        for g, n, m, p, q in zip(gids, names, measured, fit["predicted"], loo, strict=True)
    }
    return _svg(fig), tips


def perf_bars(rows: Sequence[dict[str, Any]]) -> str:
    """End-to-end and bare-forward throughput per encoder (a missing measurement draws no bar)."""
    rows = [
        {**r, "end_to_end_img_s": r["end_to_end_img_s"] or 0, "bare_img_s": r["bare_img_s"] or 0}
        for r in rows
    ]
    fig, ax = _figure(5.6, 0.5 + 0.45 * len(rows))
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r["end_to_end_img_s"] for r in rows], 0.4, label="end to end (files to store)")
    ax.barh(y - 0.2, [r["bare_img_s"] for r in rows], 0.4, label="bare forward")
    ax.set_yticks(y, [r["encoder"] for r in rows])
    ax.set_xlabel("throughput (images/s)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)
