"""Which cheap measurement predicts an MLLM's score: every proxy, and every pair of proxies under the AC law's
degree-2 form, judged leave-one-out on a table of representations x benchmarks.

Per benchmark, exactly as the AC law is fitted (`vrlab.scores.law`): min-max normalise the proxies and the
score over the representations with a score, fit the degree-2 polynomial, predict each representation from
a fit without it. Reported per proxy (or pair) and benchmark: the leave-one-out R² and the Spearman
correlation of the leave-one-out predictions with the scores, and their means over benchmarks. Intervals
come from a bootstrap over representations of the (prediction, score) pairs: refitting on a resample would
leave a duplicate of the held-out representation in its own fit. The pair (A, C) is the AC law itself, so its
leave-one-out R² equals `task=law_fit`'s.

A proxy is a column of the table; `A` stands for each benchmark's own A column (`A_<benchmark>`, else `A`),
as in the law. Columns named `<proxy>@<layer>` form a layer sweep: the report names each proxy's best layer.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score

from vrlab.errors import VrlabError
from vrlab.scores.law import a_column, benchmarks_of, loo_predictions, minmax, n_parameters
from vrlab.scores.law import spearman as _spearman

log = logging.getLogger(__name__)


def proxy_column(table: pd.DataFrame, proxy: str, benchmark: str) -> str:
    """The table column a proxy reads for one benchmark (`A` -> that benchmark's A column)."""
    if proxy == "A":
        return a_column(table, benchmark)
    if proxy not in table.columns:
        raise VrlabError(f"proxy '{proxy}' is not a column of the table (columns: {list(table.columns)})")
    return proxy


def _interval(values: Sequence[float]) -> list[float]:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if not len(finite):
        return [math.nan, math.nan]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def fit_proxies(
    table: pd.DataFrame,
    proxies: Sequence[str],
    benchmarks: Sequence[str] | None = None,
    *,
    pairs: bool = True,
    degree: int = 2,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Leave-one-out R² and Spearman of every proxy and (with `pairs`) every pair, per benchmark and on average,
    with bootstrap intervals; `ranking` orders them by mean leave-one-out R²."""
    proxies = list(dict.fromkeys(proxies))
    if not proxies:
        raise VrlabError("proxy_fit needs at least one proxy (proxy.proxies=[A, C, ...])")
    benchmarks = list(benchmarks or [b for b in benchmarks_of(table) if b not in proxies])
    if not benchmarks:
        raise VrlabError("the table has no benchmark score columns to predict")
    plain = [p for p in proxies if "@" not in p]  # a layer sweep's columns are judged one by one
    candidates = [(p,) for p in proxies] + (list(itertools.combinations(plain, 2)) if pairs else [])
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for n_combo, combo in enumerate(candidates):
        name = "+".join(combo)
        rng = np.random.default_rng([seed, n_combo])  # one stream per candidate: its intervals are its own
        per_bench, boot_r2, boot_rho = {}, [], []
        for b in benchmarks:
            cols = [proxy_column(table, p, b) for p in combo]
            rows = table.dropna(subset=[b, *cols])
            need = n_parameters(len(combo), degree) + 1
            if len(rows) < need:
                skipped[name] = (
                    f"benchmark '{b}': {len(rows)} representations have '{name}' and a score; the degree-"
                    f"{degree} fit on {len(combo)} proxies needs at least {need} for leave-one-out"
                )
                break
            try:
                x = np.column_stack([minmax(rows[c].to_numpy(float), c) for c in cols])
                y = minmax(rows[b].to_numpy(float), b)
            except VrlabError as exc:  # a constant proxy (a saturated probe) or score predicts nothing
                skipped[name] = f"benchmark '{b}': {exc}"
                break
            pred = loo_predictions(x, y, degree)
            idx = rng.integers(0, len(y), size=(bootstrap, len(y)))
            r2s = [float(r2_score(y[i], pred[i])) if np.ptp(y[i]) > 0 else math.nan for i in idx]
            rhos = [_spearman(pred[i], y[i]) for i in idx]
            boot_r2.append(r2s)
            boot_rho.append(rhos)
            per_bench[b] = {
                "n": len(y),
                "loo_r2": float(r2_score(y, pred)),
                "loo_r2_interval": _interval(r2s),
                "spearman": _spearman(pred, y),
                "spearman_interval": _interval(rhos),
                "representations": rows["representation"].tolist(),
                "loo_predicted": pred.tolist(),
                "measured": y.tolist(),
            }
        if name in skipped:
            log.warning("proxy %s left out: %s", name, skipped[name])
            continue
        mean_r2 = np.nanmean(np.asarray(boot_r2, dtype=float), axis=0) if bootstrap else []
        mean_rho = np.nanmean(np.asarray(boot_rho, dtype=float), axis=0) if bootstrap else []
        results[name] = {
            "proxies": list(combo),
            "benchmarks": per_bench,
            "mean_loo_r2": float(np.mean([v["loo_r2"] for v in per_bench.values()])),
            "mean_loo_r2_interval": _interval(list(mean_r2)),
            "mean_spearman": float(np.nanmean([v["spearman"] for v in per_bench.values()])),
            "mean_spearman_interval": _interval(list(mean_rho)),
        }
    if not results:
        raise VrlabError(f"no proxy could be judged: {next(iter(skipped.values()))}")
    ranking = sorted(results, key=lambda k: (-results[k]["mean_loo_r2"], k))
    return {
        "degree": degree,
        "benchmarks": benchmarks,
        "bootstrap": bootstrap,
        "seed": seed,
        "results": results,
        "ranking": ranking,
        "skipped": skipped,
        "layers": best_layers(results),
        "normalisation": "min-max over the representations with a score, per benchmark (proxies and score)",
    }


def best_layers(results: dict[str, Any]) -> dict[str, Any]:
    """For proxies named `<proxy>@<layer>`: each layer's mean leave-one-out R² and the best layer."""
    sweep: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        if len(r["proxies"]) == 1 and "@" in name:
            base, layer = name.rsplit("@", 1)
            sweep.setdefault(base, {})[layer] = r["mean_loo_r2"]
    return {
        base: {"per_layer": layers, "best": max(layers, key=lambda k: (layers[k], k))}
        for base, layers in sweep.items()
    }


def ranking_frame(fit: dict[str, Any]) -> pd.DataFrame:
    """The leaderboard as a table: one row per proxy or pair, best first."""
    rows = []
    for rank, name in enumerate(fit["ranking"], 1):
        r = fit["results"][name]
        row = {
            "rank": rank,
            "proxy": name,
            "mean_loo_r2": r["mean_loo_r2"],
            "loo_r2_low": r["mean_loo_r2_interval"][0],
            "loo_r2_high": r["mean_loo_r2_interval"][1],
            "mean_spearman": r["mean_spearman"],
            "spearman_low": r["mean_spearman_interval"][0],
            "spearman_high": r["mean_spearman_interval"][1],
        }
        row.update({f"loo_r2:{b}": v["loo_r2"] for b, v in r["benchmarks"].items()})
        rows.append(row)
    return pd.DataFrame(rows)
