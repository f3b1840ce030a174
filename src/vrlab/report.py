"""Figures and tables of results: markdown tables, the AC law's plots and summary, the policy curves.

Library modules compute; this module draws and formats, so matplotlib is imported only when a plot is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vrlab.scores.law import FEATURE_SETS, design, term_names


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-style markdown table of `table`."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def law_surface(coefficients: Mapping[str, float], a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The fitted polynomial (any degree) evaluated on arrays of normalised A and C."""
    degree = next(d for d in range(1, 10) if math.comb(2 + d, d) == len(coefficients))
    names = ["1", *term_names(degree)]  # the fit's own term order, whatever order the JSON kept
    phi = np.c_[np.ones(a.size), design(np.c_[a.ravel(), c.ravel()], degree)]
    return (phi @ np.array([coefficients[k] for k in names])).reshape(a.shape)


def law_markdown(result: Mapping[str, Any]) -> str:
    """A markdown summary of an AC law fit: in-sample and leave-one-out R² per benchmark and feature set."""
    lines = [
        "| benchmark | n | R² AC | LOO R² AC | R² A | LOO R² A | R² C | LOO R² C |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, f in result["benchmarks"].items():
        lines.append(
            f"| {b} | {f['n']} | "
            + " | ".join(f"{f[k][s]:.3f}" for s in FEATURE_SETS for k in ("r2", "loo_r2"))
            + " |"
        )
    for key in ("mean", "summary"):
        if key in result:
            m = result[key]
            lines.append(
                f"| **{key}** ({len(m['over'])} benchmarks) | | "
                + " | ".join(f"{m[k][s]:.3f}" for s in FEATURE_SETS for k in ("r2", "loo_r2"))
                + " |"
            )
    return "\n".join(lines) + "\n"


def plot_fit(result: Mapping[str, Any], table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Predicted vs measured per benchmark, and the (A, C) plane with the fitted surface."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = result["benchmarks"]
    n = len(fits)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    paths = []
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (b, f) in zip(axes.flat, fits.items(), strict=False):
        ax.scatter(f["measured"], f["predicted"], label=f"in-sample R² {f['r2']['AC']:.2f}", s=18)
        ax.scatter(
            f["measured"], f["loo_predicted"], marker="x", label=f"LOO R² {f['loo_r2']['AC']:.2f}", s=18
        )
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set(title=b, xlabel="measured (normalised)", ylabel="predicted")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(out_dir / "predicted_vs_measured.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.4 * rows), squeeze=False)
    grid = np.linspace(0, 1, 60)
    ga, gc = np.meshgrid(grid, grid)
    for ax, (b, f) in zip(axes.flat, fits.items(), strict=False):
        surface = law_surface(f["coefficients"], ga, gc)
        cs = ax.contourf(ga, gc, surface, levels=12, cmap="viridis")
        ax.scatter(f["a"], f["c"], c=f["measured"], cmap="viridis", norm=cs.norm, edgecolors="white", s=30)
        fig.colorbar(cs, ax=ax, shrink=0.8)
        ax.set(title=f"{b}: fitted AC surface", xlabel="A (normalised)", ylabel="C (normalised)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(out_dir / "ac_plane.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_policy(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Recall@k success curves: fraction of trials that found the best within t trainings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for b, r in results.items():
        t = np.arange(1, r["n_candidates"] + 1)
        line = ax.plot(t, r["success_curve"]["AC"], label=f"{b} AC policy")[0]
        ax.plot(
            t,
            r["success_curve"]["random"],
            ls="--",
            color=line.get_color(),
            label=f"{b} random order (drew the best)",
        )
    budget = next(iter(results.values())).get("recall_within_budget", {}).get("budget")
    if budget:
        ax.axvline(budget, color="grey", lw=0.8, ls=":", label=f"budget of {budget} trainings")
    ax.set(
        xlabel="trainings",
        ylabel=f"P(best in predicted top {next(iter(results.values()))['k']})",
        title="AC policy vs random order",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_leaderboard(frame: pd.DataFrame, path: Path) -> Path:
    """The proxy leaderboard: mean leave-one-out R² and Spearman per proxy with their 95% bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = frame.iloc[::-1]  # best at the top
    y = np.arange(len(frame))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * len(frame) + 1.6), sharey=True)
    for ax, (col, low, high, label) in zip(
        axes,
        [
            ("mean_loo_r2", "loo_r2_low", "loo_r2_high", "mean leave-one-out R² (shown from −1)"),
            (
                "mean_spearman",
                "spearman_low",
                "spearman_high",
                "mean Spearman ρ of the leave-one-out predictions",
            ),
        ],
        strict=True,
    ):
        # R² has no lower bound; below −1 a bar stops at −1 and its value is written beside it
        mid, lo, hi = (np.clip(frame[c].to_numpy(float), -1, 1) for c in (col, low, high))
        err = np.abs(np.vstack([mid - lo, hi - mid]))
        ax.barh(y, mid, xerr=np.nan_to_num(err), color="tab:blue", alpha=0.75, capsize=2)
        for yi, raw in zip(y, frame[col].to_numpy(float), strict=True):
            if raw < -1:
                ax.text(-0.98, yi, f"{raw:.3g}", va="center", fontsize=7, color="darkred")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlim(-1.02, 1.02)
        ax.set_xlabel(label, fontsize=9)
    axes[0].set_yticks(y, frame["proxy"], fontsize=8)
    fig.suptitle(
        "Which proxy predicts the MLLM's score (bars: 95% bootstrap intervals over representations)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
