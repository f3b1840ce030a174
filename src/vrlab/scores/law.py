"""The AC law and the AC policy (law.md §5).

Per benchmark b, over the candidate representations: min-max normalise A_b, C and the score P_b, then fit
P ≈ w0 + w1·A + w2·C + w3·A² + w4·A·C + w5·C² by least squares (scikit-learn PolynomialFeatures +
LinearRegression, as the paper's code). Reported: in-sample R² (all the paper reports), leave-one-out R²
(refit without candidate i, predict i), coefficients, and the A-only and C-only degree-2 baselines.

The AC policy simulation samples candidates region by region in the normalised (A, C) square at finer and
finer grids, refits after each trained candidate, and stops when the true best is in the predicted top k;
many seeded trials against a random order give the distribution of trainings needed.
The recommender ranks untrained candidates by predicted score with a bootstrap interval.

Tasks: `law_table` (collect results into one table), `law_fit`, `law_policy`, `law_recommend`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.preprocessing import PolynomialFeatures

from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
FEATURE_SETS = {"AC": ("A", "C"), "A": ("A",), "C": ("C",)}


# --- the table -------------------------------------------------------------------------------------
def benchmarks_of(table: pd.DataFrame) -> list[str]:
    """Score columns: everything but representation, C, A and A_<benchmark>."""
    return [c for c in table.columns if c not in ("representation", "C", "A") and not c.startswith("A_")]


def a_column(table: pd.DataFrame, benchmark: str) -> str:
    if f"A_{benchmark}" in table.columns:
        return f"A_{benchmark}"
    if "A" in table.columns:
        return "A"
    raise VrlabError(f"law table has neither 'A_{benchmark}' nor 'A' (columns: {list(table.columns)})")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read and validate a law table (CSV)."""
    path = Path(path)
    if not path.exists():
        raise VrlabError(f"law table {path} does not exist; build one with vrlab task=law_table")
    table = pd.read_csv(path)
    for col in ("representation", "C"):
        if col not in table.columns:
            raise VrlabError(f"law table {path} lacks column '{col}' (columns: {list(table.columns)})")
    if table["representation"].duplicated().any():
        raise VrlabError(
            f"law table {path} lists a representation twice: {table['representation'][table['representation'].duplicated()].tolist()}"
        )
    if not benchmarks_of(table):
        raise VrlabError(f"law table {path} has no benchmark score columns")
    for b in benchmarks_of(table):
        a_column(table, b)
    return table


# --- the fit -----------------------------------------------------------------------------------------
def minmax(values: np.ndarray, name: str) -> np.ndarray:
    lo, hi = np.nanmin(values), np.nanmax(values)
    if not np.isfinite(lo) or hi - lo <= 0:
        raise VrlabError(
            f"column '{name}' is constant (or empty) over the candidates; min-max normalisation needs spread"
        )
    return (values - lo) / (hi - lo)


def design(x: np.ndarray, degree: int = 2) -> np.ndarray:
    """Polynomial features without the bias column (LinearRegression fits the intercept)."""
    return PolynomialFeatures(degree=degree, include_bias=False).fit_transform(x)


def n_parameters(n_features: int, degree: int = 2) -> int:
    return math.comb(n_features + degree, degree)


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 2) -> LinearRegression:
    return LinearRegression().fit(design(x, degree), y)


def loo_predictions(x: np.ndarray, y: np.ndarray, degree: int = 2) -> np.ndarray:
    """Leave-one-out predictions. Full-rank OLS uses the PRESS identity (e_i / (1 - h_ii)); otherwise refits."""
    phi = np.c_[np.ones(len(x)), design(x, degree)]
    if np.linalg.matrix_rank(phi) == phi.shape[1] and len(x) > phi.shape[1]:
        hat = phi @ np.linalg.pinv(phi)
        fitted = hat @ y
        leverage = np.diag(hat)
        if np.all(leverage < 1 - 1e-9):
            return y - (y - fitted) / (1 - leverage)
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        out[i] = fit_polynomial(x[keep], y[keep], degree).predict(design(x[i : i + 1], degree))[0]
    return out


@dataclass
class BenchmarkFit:
    benchmark: str
    n: int
    r2: dict[str, float]  # in-sample, per feature set
    loo_r2: dict[str, float]
    coefficients: dict[str, float]  # AC model, named terms, on normalised inputs
    predicted: list[float]  # in-sample AC predictions (normalised score)
    loo_predicted: list[float]
    measured: list[float]  # normalised score
    a: list[float]
    c: list[float]


def fit_benchmark(table: pd.DataFrame, benchmark: str, degree: int = 2) -> BenchmarkFit:
    """Fit the AC law and both single-variable baselines on one benchmark."""
    rows = table.dropna(subset=[benchmark])
    a_col = a_column(table, benchmark)
    need = n_parameters(2, degree) + 1
    if len(rows) < need:
        raise VrlabError(
            f"benchmark '{benchmark}' has {len(rows)} candidates with scores; the degree-{degree} AC fit has "
            f"{need - 1} parameters and leave-one-out needs at least {need}"
        )
    for col in (a_col, "C", benchmark):
        if rows[col].isna().any():
            raise VrlabError(
                f"column '{col}' is missing values for {rows['representation'][rows[col].isna()].tolist()}"
            )
    a = minmax(rows[a_col].to_numpy(float), a_col)
    c = minmax(rows["C"].to_numpy(float), "C")
    y = minmax(rows[benchmark].to_numpy(float), benchmark)
    inputs = {"AC": np.c_[a, c], "A": a[:, None], "C": c[:, None]}
    r2, loo = {}, {}
    for name, x in inputs.items():
        model = fit_polynomial(x, y, degree)
        r2[name] = float(r2_score(y, model.predict(design(x, degree))))
        loo[name] = float(r2_score(y, loo_predictions(x, y, degree)))
    model = fit_polynomial(inputs["AC"], y, degree)
    names = [
        "1",
        *PolynomialFeatures(degree=degree, include_bias=False)
        .fit(inputs["AC"])
        .get_feature_names_out(["A", "C"]),
    ]
    coefs = dict(zip(names, [float(model.intercept_), *map(float, model.coef_)], strict=True))
    return BenchmarkFit(
        benchmark,
        len(rows),
        r2,
        loo,
        coefs,
        model.predict(design(inputs["AC"], degree)).tolist(),
        loo_predictions(inputs["AC"], y, degree).tolist(),
        y.tolist(),
        a.tolist(),
        c.tolist(),
    )


def fit_law(
    table: pd.DataFrame,
    benchmarks: Sequence[str] | None = None,
    summary_benchmarks: Sequence[str] | None = None,
    degree: int = 2,
) -> dict[str, Any]:
    """Fit every benchmark; means over all and over `summary_benchmarks` (the paper's headline uses 4 of 8)."""
    benchmarks = list(benchmarks or benchmarks_of(table))
    missing = [b for b in benchmarks if b not in table.columns]
    if missing:
        raise VrlabError(f"law table lacks benchmark columns {missing} (has {benchmarks_of(table)})")
    fits = {b: fit_benchmark(table, b, degree) for b in benchmarks}

    def mean(bs: Sequence[str]) -> dict[str, dict[str, float]]:
        return {
            kind: {name: float(np.mean([getattr(fits[b], kind)[name] for b in bs])) for name in FEATURE_SETS}
            for kind in ("r2", "loo_r2")
        }

    out = {
        "degree": degree,
        "benchmarks": {b: vars(f) for b, f in fits.items()},
        "mean": {"over": benchmarks, **mean(benchmarks)},
        "representations": table["representation"].tolist(),
        "normalisation": "min-max over the candidates per benchmark (A, C and score)",
    }
    if summary_benchmarks:
        unknown = [b for b in summary_benchmarks if b not in fits]
        if unknown:
            raise VrlabError(
                f"law.summary_benchmarks {unknown} are not among the fitted benchmarks {benchmarks}"
            )
        out["summary"] = {"over": list(summary_benchmarks), **mean(summary_benchmarks)}
    return out


def markdown(result: Mapping[str, Any]) -> str:
    """A readable summary of a fit."""
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


# --- the AC policy -----------------------------------------------------------------------------------
def region_order(a: np.ndarray, c: np.ndarray, rng: np.random.Generator, max_level: int = 8) -> list[int]:
    """Training order by region sampling: at level l, a 2^l x 2^l grid over the unit square; visit the
    non-empty cells without a trained candidate in random order and train one random candidate of each."""
    trained: list[int] = []
    remaining = set(range(len(a)))
    for level in range(1, max_level + 1):
        n = 2**level
        cell = np.minimum((a * n).astype(int), n - 1) * n + np.minimum((c * n).astype(int), n - 1)
        occupied = {int(cell[i]) for i in trained}
        cells = sorted({int(cell[i]) for i in remaining} - occupied)
        for k in rng.permutation(len(cells)):
            members = sorted(i for i in remaining if cell[i] == cells[k])
            pick = int(rng.choice(members))
            trained.append(pick)
            remaining.discard(pick)
        if not remaining:
            break
    trained += sorted(remaining, key=lambda _: rng.random())
    return trained


def trainings_needed(
    order: Sequence[int], a: np.ndarray, c: np.ndarray, y: np.ndarray, k: int, degree: int = 2
) -> int:
    """Trainings until the true best is in the top k predicted by a fit on the trained candidates."""
    best = int(np.argmax(y))
    x = np.c_[a, c]
    for t in range(1, len(order) + 1):
        seen = list(order[:t])
        if t == 1:
            if seen[0] == best:
                return 1
            continue
        pred = fit_polynomial(x[seen], y[seen], degree).predict(design(x, degree))
        if best in np.argsort(-pred, kind="stable")[:k]:
            return t
    return len(order)


def simulate_policy(
    a: np.ndarray, c: np.ndarray, y: np.ndarray, k: int = 3, trials: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Distribution of trainings needed: AC policy (region sampling + refits) vs random order (draw the best)."""
    a, c, y = (minmax(np.asarray(v, float), n) for v, n in ((a, "A"), (c, "C"), (y, "score")))
    rng = np.random.default_rng(seed)
    best = int(np.argmax(y))
    ac, rand = [], []
    for _ in range(trials):
        ac.append(trainings_needed(region_order(a, c, rng), a, c, y, k))
        rand.append(int(np.where(rng.permutation(len(y)) == best)[0][0]) + 1)
    n = len(y)
    curve = {
        name: [float(np.mean(np.asarray(v) <= t)) for t in range(1, n + 1)]
        for name, v in (("AC", ac), ("random", rand))
    }
    return {
        "k": k,
        "trials": trials,
        "seed": seed,
        "n_candidates": n,
        "trainings_AC": ac,
        "trainings_random": rand,
        "mean_AC": float(np.mean(ac)),
        "mean_random": float(np.mean(rand)),
        "median_AC": float(np.median(ac)),
        "median_random": float(np.median(rand)),
        "success_curve": curve,
    }


# --- the recommender ----------------------------------------------------------------------------------
def recommend(
    table: pd.DataFrame,
    benchmark: str,
    n_bootstrap: int = 500,
    seed: int = 0,
    interval: float = 0.9,
    degree: int = 2,
) -> pd.DataFrame:
    """Rank candidates without a score by the AC law fitted on those with one, with bootstrap intervals.

    Predictions are in the benchmark's own units (A and C are normalised over all candidates; the score
    model is fitted on the measured ones)."""
    a_col = a_column(table, benchmark)
    incomplete = table[a_col].isna() | table["C"].isna()
    if incomplete.any():
        log.warning(
            "skipping candidates without %s or C: %s", a_col, table["representation"][incomplete].tolist()
        )
        table = table[~incomplete]
    a = minmax(table[a_col].to_numpy(float), a_col)
    c = minmax(table["C"].to_numpy(float), "C")
    y = table[benchmark].to_numpy(float)
    known, unknown = np.where(~np.isnan(y))[0], np.where(np.isnan(y))[0]
    if len(unknown) == 0:
        raise VrlabError(f"every candidate already has a '{benchmark}' score; nothing to recommend")
    if len(known) < n_parameters(2, degree):
        raise VrlabError(
            f"only {len(known)} candidates have a '{benchmark}' score; the AC fit needs at least "
            f"{n_parameters(2, degree)}"
        )
    x = np.c_[a, c]
    point = fit_polynomial(x[known], y[known], degree).predict(design(x[unknown], degree))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_bootstrap):
        sample = rng.choice(known, size=len(known), replace=True)
        if len(np.unique(sample)) < 3:
            continue
        boots.append(fit_polynomial(x[sample], y[sample], degree).predict(design(x[unknown], degree)))
    lo, hi = np.quantile(np.array(boots), [(1 - interval) / 2, (1 + interval) / 2], axis=0)
    out = pd.DataFrame(
        {
            "representation": table["representation"].to_numpy()[unknown],
            "predicted": point,
            "low": lo,
            "high": hi,
            "A": table[a_col].to_numpy()[unknown],
            "C": table["C"].to_numpy()[unknown],
        }
    )
    return out.sort_values("predicted", ascending=False).reset_index(drop=True)


# --- plots ---------------------------------------------------------------------------------------------
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
        names = list(f["coefficients"])
        terms = {"1": np.ones_like(ga), "A": ga, "C": gc, "A^2": ga**2, "A C": ga * gc, "C^2": gc**2}
        surface = sum(f["coefficients"][k] * terms[k] for k in names)
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


# --- tasks ---------------------------------------------------------------------------------------------
def collect_table(
    alignment_files: Sequence[Path],
    correspondence_files: Sequence[Path],
    scores: pd.DataFrame | None,
    protocol: str | None = None,
) -> pd.DataFrame:
    """One row per representation from alignment.json / correspondence.json results and a scores table.

    With `protocol`, only C results of that protocol count; two C results for one representation are an error.
    """
    rows: dict[str, dict[str, Any]] = {}
    c_source: dict[str, Path] = {}
    for path in correspondence_files:
        rec = json.loads(Path(path).read_text())
        if protocol and rec["settings"]["protocol"] != protocol:
            continue
        name = rec["representation"]
        if name in c_source:
            raise VrlabError(
                f"two C results for '{name}': {c_source[name]} and {path}; set law.protocol or remove one"
            )
        c_source[name] = Path(path)
        rows.setdefault(name, {})["C"] = rec["C"]
    for path in alignment_files:
        rec = json.loads(Path(path).read_text())
        for bench, value in rec["A"].items():
            rows.setdefault(rec["representation"], {})[f"A_{bench}"] = value
    if scores is not None:
        if "representation" not in scores.columns:
            raise VrlabError("the scores table needs a 'representation' column")
        for _, r in scores.iterrows():
            rows.setdefault(r["representation"], {}).update(
                {k: v for k, v in r.items() if k != "representation"}
            )
    if not rows:
        raise VrlabError("no alignment, correspondence or score results found to build a law table")
    return pd.DataFrame([{"representation": k, **v} for k, v in sorted(rows.items())])


def law_table_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_table`: gather A and C results (globs) and a scores CSV into one table."""
    from glob import glob

    lcfg = cfg.law
    a_files = sorted(Path(p) for g in lcfg.alignment for p in glob(g, recursive=True))
    c_files = sorted(Path(p) for g in lcfg.correspondence for p in glob(g, recursive=True))
    scores = pd.read_csv(lcfg.scores) if lcfg.scores else None
    table = collect_table(a_files, c_files, scores, lcfg.protocol)
    out = Path(lcfg.out or Path(cfg.paths.outputs) / "law" / "table.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)
    log.info("law table with %d representations and columns %s -> %s", len(table), list(table.columns), out)
    return {"table": str(out), "rows": len(table), "columns": list(table.columns)}


def _out_dir(cfg: Any, name: str) -> Path:
    from vrlab.runtime import run_dir

    return run_dir(cfg.paths.outputs, "law", name, {"table": str(cfg.law.table), "law": str(cfg.law)})


def law_fit_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_fit law.table=<csv>`: fit, write law_fit.json, law_fit.md and plots."""
    from vrlab.runtime import atomic_write_bytes, atomic_write_json, to_plain

    table = read_table(cfg.law.table)
    result = fit_law(
        table, to_plain(cfg.law.benchmarks), to_plain(cfg.law.summary_benchmarks), cfg.law.degree
    )
    out = _out_dir(cfg, "fit")
    atomic_write_json(out / "law_fit.json", result)
    atomic_write_bytes(out / "law_fit.md", markdown(result).encode())
    plots = plot_fit(result, table, out)
    print(markdown(result))
    log.info("law fit -> %s (plots: %s)", out / "law_fit.json", ", ".join(p.name for p in plots))
    return {"output": str(out / "law_fit.json"), **result}


def law_policy_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_policy law.table=<csv>`: simulate the AC policy against random order per benchmark."""
    from vrlab.runtime import atomic_write_json, to_plain

    table = read_table(cfg.law.table)
    results = {}
    for b in to_plain(cfg.law.benchmarks) or benchmarks_of(table):
        rows = table.dropna(subset=[b])
        r = simulate_policy(
            rows[a_column(table, b)].to_numpy(float),
            rows["C"].to_numpy(float),
            rows[b].to_numpy(float),
            k=cfg.law.top_k,
            trials=cfg.law.trials,
            seed=cfg.seed,
        )
        results[b] = r
        log.info(
            "%s: trainings to find the best in the top %d: AC policy mean %.2f (median %.1f), random %.2f",
            b,
            r["k"],
            r["mean_AC"],
            r["median_AC"],
            r["mean_random"],
        )
    out = _out_dir(cfg, "policy")
    atomic_write_json(out / "law_policy.json", results)
    plot_policy(results, out / "recall_at_k.png")
    return {"output": str(out / "law_policy.json"), "results": results}


def law_recommend_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_recommend law.table=<csv>`: which untrained candidate to train next, per benchmark."""
    from rich.console import Console
    from rich.table import Table

    from vrlab.runtime import to_plain

    table = read_table(cfg.law.table)
    out = {}
    for b in to_plain(cfg.law.benchmarks) or benchmarks_of(table):
        if table[b].notna().all():
            continue
        ranked = recommend(table, b, cfg.law.bootstrap, cfg.seed)
        out[b] = ranked.to_dict("records")
        view = Table(title=f"{b}: train next (predicted {b}, 90% bootstrap interval)")
        for col in ("rank", "representation", "predicted", "interval", "A", "C"):
            view.add_column(col)
        for i, r in ranked.iterrows():
            view.add_row(
                str(i + 1),
                r["representation"],
                f"{r['predicted']:.2f}",
                f"[{r['low']:.2f}, {r['high']:.2f}]",
                f"{r['A']:.4f}",
                f"{r['C']:.2f}",
            )
        Console(width=160).print(view)
    if not out:
        raise VrlabError(f"every candidate in {cfg.law.table} has every score; nothing to recommend")
    return out
