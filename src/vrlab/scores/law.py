"""The AC law: the results table, the fit and leave-one-out validation.

Per benchmark b, over the candidate representations: min-max normalise A_b, C and the score P_b, then fit
P ≈ w0 + w1·A + w2·C + w3·A² + w4·A·C + w5·C² by least squares (scikit-learn PolynomialFeatures +
LinearRegression, as the paper's code). Reported: in-sample R² (all the paper reports), leave-one-out R²
(refit without candidate i, predict i), the Spearman correlation of the leave-one-out predictions with the
scores, coefficients, and the A-only and C-only degree-2 baselines.

The AC policy and the recommender are `vrlab.scores.policy`; plots and markdown are `vrlab.report`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.preprocessing import PolynomialFeatures

from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
FEATURE_SETS = {"AC": ("A", "C"), "A": ("A",), "C": ("C",)}


# --- the table -------------------------------------------------------------------------------------
# 1 where stage 2 trained the representation's tower: the Law paper states the AC law for frozen towers
TUNED_COLUMN = "tuned_tower"


def benchmarks_of(table: pd.DataFrame) -> list[str]:
    """Score columns: everything but representation, C, A, A_<benchmark> and the tuned-tower mark."""
    meta = ("representation", "C", "A", TUNED_COLUMN)
    return [c for c in table.columns if c not in meta and not c.startswith("A_")]


def a_column(table: pd.DataFrame, benchmark: str) -> str:
    if f"A_{benchmark}" in table.columns:
        return f"A_{benchmark}"
    if "A" in table.columns:
        return "A"
    raise VrlabError(f"law table has neither 'A_{benchmark}' nor 'A' (columns: {list(table.columns)})")


def read_table(path: str | Path, check_a: bool = True) -> pd.DataFrame:
    """Read and validate a law table (CSV); `check_a=False` allows score columns without an A column (a proxy
    table's extra columns)."""
    path = Path(path)
    if not path.exists():
        raise VrlabError(f"law table {path} does not exist; build one with vrlab task=law_table")
    try:
        table = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise VrlabError(f"law table {path} is not a readable CSV: {str(exc).splitlines()[0]}") from exc
    if table.empty:
        raise VrlabError(f"law table {path} has no rows")
    for col in ("representation", "C"):
        if col not in table.columns:
            raise VrlabError(f"law table {path} lacks column '{col}' (columns: {list(table.columns)})")
    if table["representation"].duplicated().any():
        raise VrlabError(
            f"law table {path} lists a representation twice: {table['representation'][table['representation'].duplicated()].tolist()}"
        )
    if not benchmarks_of(table):
        raise VrlabError(f"law table {path} has no benchmark score columns")
    for col in [c for c in table.columns if c != "representation"]:
        values = pd.to_numeric(table[col], errors="coerce")
        bad = table[col].notna() & (values.isna() | ~np.isfinite(values.fillna(0)))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise VrlabError(
                f"law table {path}, column '{col}', row {row + 2} ({table['representation'].iloc[row]}): "
                f"{table[col].iloc[row]!r} is not a finite number"
            )
        table[col] = values
    for b in benchmarks_of(table) if check_a else ():
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


def term_names(degree: int = 2) -> list[str]:
    """Names of the polynomial terms of (A, C) in design-column order: A, C, A^2, A C, C^2, ..."""
    return list(
        PolynomialFeatures(degree=degree, include_bias=False)
        .fit(np.zeros((1, 2)))
        .get_feature_names_out(["A", "C"])
    )


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


def spearman(pred: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation, NaN where either side is constant (no ranking to compare)."""
    if np.ptp(pred) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(pred, y).statistic)


@dataclass
class BenchmarkFit:
    benchmark: str
    n: int
    r2: dict[str, float]  # in-sample, per feature set
    loo_r2: dict[str, float]
    loo_spearman: dict[str, float]  # of the leave-one-out predictions with the scores, per feature set
    coefficients: dict[str, float]  # AC model, named terms, on normalised inputs
    predicted: list[float]  # in-sample AC predictions (normalised score)
    loo_predicted: list[float]
    measured: list[float]  # normalised score
    a: list[float]
    c: list[float]
    representations: list[str] = field(default_factory=list)  # the candidates fitted, in the lists' order


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
    r2, loo, rho, held_out = {}, {}, {}, {}
    for name, x in inputs.items():
        model = fit_polynomial(x, y, degree)
        r2[name] = float(r2_score(y, model.predict(design(x, degree))))
        held_out[name] = loo_predictions(x, y, degree)
        loo[name] = float(r2_score(y, held_out[name]))
        rho[name] = spearman(held_out[name], y)
    model = fit_polynomial(inputs["AC"], y, degree)
    names = ["1", *term_names(degree)]
    coefs = dict(zip(names, [float(model.intercept_), *map(float, model.coef_)], strict=True))
    return BenchmarkFit(
        benchmark,
        len(rows),
        r2,
        loo,
        rho,
        coefs,
        model.predict(design(inputs["AC"], degree)).tolist(),
        held_out["AC"].tolist(),
        y.tolist(),
        a.tolist(),
        c.tolist(),
        rows["representation"].tolist(),
    )


def fit_law(
    table: pd.DataFrame,
    benchmarks: Sequence[str] | None = None,
    summary_benchmarks: Sequence[str] | None = None,
    degree: int = 2,
) -> dict[str, Any]:
    """Fit every benchmark; means over all and over `summary_benchmarks` (the paper's headline uses 4 of 8)."""
    benchmarks = list(benchmarks or benchmarks_of(table))
    if TUNED_COLUMN in table.columns and table[TUNED_COLUMN].fillna(0).astype(bool).any():
        log.warning(
            "the law table holds representations whose tower stage 2 trained (%s); the AC law is stated for "
            "frozen towers, so their fit is an extrapolation",
            table["representation"][table[TUNED_COLUMN].fillna(0).astype(bool)].tolist(),
        )
    missing = [b for b in benchmarks if b not in table.columns]
    if missing:
        raise VrlabError(f"law table lacks benchmark columns {missing} (has {benchmarks_of(table)})")
    fits = {b: fit_benchmark(table, b, degree) for b in benchmarks}

    def mean(bs: Sequence[str]) -> dict[str, dict[str, float]]:
        return {
            kind: {
                name: float(np.nanmean([getattr(fits[b], kind)[name] for b in bs])) for name in FEATURE_SETS
            }
            for kind in ("r2", "loo_r2", "loo_spearman")
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


def _same(kind: str, key: str, seen: dict[str, tuple[Any, Path]], value: Any, path: Path) -> None:
    """Refuse a table whose results for one column were computed with different settings."""
    first = seen.setdefault(key, (value, path))
    if first[0] != value:
        raise VrlabError(
            f"the law table would mix {kind} settings for '{key}': {first[1]} has {first[0]} but {path} has "
            f"{value}; rerun one of them with the other's settings or leave it out of the globs"
        )


def bench_column(benchmark: str) -> str:
    """`lmms:<task>` images score the benchmark `<task>`: A on them is column `A_<task>`."""
    return benchmark.removeprefix("lmms:")


def collect_table(
    alignment_files: Sequence[Path],
    correspondence_files: Sequence[Path],
    scores: pd.DataFrame | None,
    protocol: str | None = None,
    eval_files: Sequence[Path] = (),
    score_metrics: Mapping[str, str] | None = None,
    duplicates: str = "error",
    alignment_protocol: str | None = None,
) -> pd.DataFrame:
    """One row per representation from alignment.json, correspondence.json and eval.json results (vrlab's own
    runs) and, optionally, a scores table.

    With `protocol`, only C results of that protocol count; with `alignment_protocol`, only A results of that
    protocol, and A results of two protocols are an error. Caption-likelihood A gives one column `A` shared by
    every benchmark; reference-cosine A one column `A_<benchmark>` per benchmark. Two results for one cell are an error (with
    `duplicates="newest"`, the most recently written wins and the others are named in a warning), and so is
    a column whose values were computed with different settings (C protocol; A's image count, dtype and
    references per benchmark, or its caption set, pair sample and template; an eval task's limit, generation overrides, task version and sample count).
    """
    rows: dict[str, dict[str, Any]] = {}
    source: dict[tuple[str, str], Path] = {}
    settings: dict[str, tuple[Any, Path]] = {}
    tuned: set[str] = set()

    def put(name: str, column: str, value: Any, path: Path) -> None:
        if (name, column) in source:
            older = source[name, column]
            if duplicates != "newest" or not older.exists() or not Path(path).exists():
                raise VrlabError(
                    f"two results for '{name}', column '{column}': {older} and {path}; remove one "
                    "(or set law.protocol for C, or law.duplicates=newest to keep the most recent)"
                )
            if older.stat().st_mtime_ns > Path(path).stat().st_mtime_ns:
                log.warning("%s, %s: kept %s, ignored the older %s", name, column, older, path)
                return
            log.warning("%s, %s: kept %s, ignored the older %s", name, column, path, older)
        source[name, column] = Path(path)
        rows.setdefault(name, {})[column] = value

    for path in correspondence_files:
        rec = json.loads(Path(path).read_text())
        if protocol and rec["settings"]["protocol"] != protocol:
            continue
        _same("C", "C", settings, rec["settings"]["protocol"], Path(path))
        put(rec["representation"], "C", rec["C"], Path(path))
        if rec.get("tuned_tower"):
            tuned.add(rec["representation"])
    protocols: dict[str, Path] = {}
    for path in alignment_files:
        rec = json.loads(Path(path).read_text())
        kind = rec.get("protocol", "reference_cosine")  # results from before protocols existed: the default
        if alignment_protocol and kind != alignment_protocol:
            continue
        protocols.setdefault(kind, Path(path))
        if len(protocols) > 1:
            (a, pa), (b, pb) = protocols.items()
            raise VrlabError(
                f"the law table would mix A protocols: {pa} is {a} but {pb} is {b}; A must mean one thing across "
                "representations: choose one with law.alignment_protocol=reference_cosine|caption_likelihood"
            )
        if kind == "caption_likelihood":  # one A per representation, shared by every benchmark
            s = rec.get("settings", {})
            used = (s.get("captions"), s.get("n_pairs"), s.get("template"), s.get("pairs_digest"))
            _same("A", "A", settings, used, Path(path))
            put(rec["representation"], "A", rec["A"], Path(path))
            if rec.get("tuned_tower"):
                tuned.add(rec["representation"])
            continue
        for bench, value in rec["A"].items():
            s = rec.get("results", {}).get(bench, {})
            used = (
                s.get("settings", {}).get("n_images"),
                s.get("settings", {}).get("dtype"),
                sorted(s.get("references", {})),
            )
            _same("A", f"A_{bench_column(bench)}", settings, used, Path(path))
            put(rec["representation"], f"A_{bench_column(bench)}", value, Path(path))
        if rec.get("tuned_tower"):
            tuned.add(rec["representation"])
    for path in eval_files:
        rec = json.loads(Path(path).read_text())
        if rec.get("tuned_tower"):
            tuned.add(rec["representation"])
        for task in rec.get("tasks", {}).values():
            for name, r in task["results"].items():
                if not isinstance(r.get("score"), int | float):
                    continue
                used = (
                    rec.get("limit"),
                    rec.get("gen_kwargs"),
                    task.get("versions", {}).get(name),
                    r["n_samples"],
                )
                _same("eval", name, settings, used, Path(path))
                put(rec["representation"], name, float(r["score"]), Path(path))
                for column, where in (score_metrics or {}).items():
                    sub, _, metric = where.partition("/")
                    value = r.get("metrics", {}).get(f"{metric},none") if sub == name else None
                    if isinstance(value, int | float):
                        _same("eval", column, settings, used, Path(path))
                        put(rec["representation"], column, float(value), Path(path))
    if scores is not None:
        if "representation" not in scores.columns:
            raise VrlabError("the scores table needs a 'representation' column")
        for _, r in scores.iterrows():
            for k, v in r.items():
                if k != "representation":
                    put(r["representation"], str(k), v, Path("law.scores"))
    if not rows:
        raise VrlabError("no alignment, correspondence, eval or score results found to build a law table")
    return pd.DataFrame(
        [{"representation": k, **v, TUNED_COLUMN: int(k in tuned)} for k, v in sorted(rows.items())]
    )
