"""The verdict on the AC law from a controlled study: law tables of the same candidates under several MLLM seeds,
judged leave-one-out per benchmark, with the A-only and C-only baselines, the spread over seeds and over
drop-one subsets of the candidates, and the study's targets checked on the numbers themselves.

Every number comes from `vrlab.scores.law.fit_law` (min-max normalisation, the degree-2 law, leave-one-out by
refitting); this module only arranges them. A benchmark is *judged* when its raw scores span at least
`min_span` across the candidates at the default seed: below that the scores hold too little signal to rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vrlab.errors import VrlabError
from vrlab.scores.law import FEATURE_SETS, fit_law

MEASURES = ("r2", "loo_r2", "loo_spearman")


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(np.mean(finite)), "min": min(finite), "max": max(finite), "n": len(finite)}


def _measures(fit: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each feature set's measures from one benchmark's fit."""
    return {s: {m: float(fit[m][s]) for m in MEASURES} for s in FEATURE_SETS}


def _try(table: pd.DataFrame, benchmark: str, degree: int) -> dict[str, dict[str, float]]:
    """Each feature set's measures on `benchmark`; NaN where the table admits no fit (a constant column)."""
    try:
        return _measures(fit_law(table, [benchmark], degree=degree)["benchmarks"][benchmark])
    except VrlabError:
        return {s: dict.fromkeys(MEASURES, math.nan) for s in FEATURE_SETS}


def judge(
    tables: Mapping[int, pd.DataFrame],
    benchmarks: Sequence[str],
    default_seed: int,
    *,
    degree: int = 2,
    min_span: float = 0.20,
    targets: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Per benchmark: the law and its baselines at the default seed, their spread over seeds and over the
    subsets that drop one candidate, the score span, and whether the targets (`loo_spearman`, `loo_r2` of the
    AC law, at the default seed and at every seed) hold; `verdict` sums it up in words."""
    if default_seed not in tables:
        raise VrlabError(f"no law table for the default seed {default_seed} (seeds: {sorted(tables)})")
    targets = dict(targets or {"loo_spearman": 0.6, "loo_r2": 0.3})
    base = tables[default_seed]
    out: dict[str, Any] = {}
    for b in benchmarks:
        raw = base[b].dropna().to_numpy(float)
        span = float(raw.max() - raw.min()) if len(raw) else 0.0
        try:
            fit = fit_law(base, [b], degree=degree)["benchmarks"][b]
        except VrlabError as exc:  # a constant column (scores at chance for all, a saturated A) fits nothing
            out[b] = {
                "span": span,
                "judged": False,
                "unfit": str(exc),
                "targets_met": None,
                "verdict": f"{b}: no fit ({exc})",
            }
            continue
        # the default seed's fit is the one above; only the other seeds are fitted here
        seeds = {
            seed: _measures(fit) if seed == default_seed else _try(t, b, degree) for seed, t in tables.items()
        }
        drops = {
            name: _try(base[base["representation"] != name].reset_index(drop=True), b, degree)
            for name in base["representation"]
        }
        at_default = seeds[default_seed]
        over = {
            kind: {
                s: {m: _spread([v[s][m] for v in values.values()]) for m in MEASURES} for s in FEATURE_SETS
            }
            for kind, values in (("seeds", seeds), ("drop_one", drops))
        }
        judged = span >= min_span
        met = {
            m: bool(
                at_default["AC"][m] >= t
                and all(v["AC"][m] >= t for v in seeds.values())  # a seed without a fit (NaN) misses
            )
            for m, t in targets.items()
        }
        best = max(FEATURE_SETS, key=lambda s: (at_default[s]["loo_r2"], s == "AC"))
        finite = {n: v["AC"]["loo_r2"] for n, v in drops.items() if math.isfinite(v["AC"]["loo_r2"])}
        # the encoder whose absence moves the law's leave-one-out R² the most
        swing = max(finite, key=lambda n: abs(finite[n] - at_default["AC"]["loo_r2"])) if finite else None
        out[b] = {
            "span": span,
            "judged": judged,
            "default_seed": at_default,
            "seeds": {str(k): v for k, v in seeds.items()},
            "spread": over,
            "drop_one": drops,
            "fit": fit,
            "most_influential": swing and {"encoder": swing, "loo_r2_without": finite[swing]},
            "targets_met": met if judged else None,
            "best_loo_r2": best,
            "verdict": _words(b, judged, span, min_span, met, best, at_default),
        }
    judged = [b for b in benchmarks if out[b]["judged"]]
    return {
        "benchmarks": out,
        "judged": judged,
        "targets": targets,
        "min_span": min_span,
        "seeds": sorted(tables),
        "default_seed": default_seed,
        "all_targets_met": bool(judged) and all(all(out[b]["targets_met"].values()) for b in judged),
        "law_beats_a_only": {
            b: out[b]["default_seed"]["AC"]["loo_r2"] > out[b]["default_seed"]["A"]["loo_r2"] for b in judged
        },
    }


def _words(
    b: str,
    judged: bool,
    span: float,
    min_span: float,
    met: Mapping[str, bool],
    best: str,
    at: Mapping[str, Mapping[str, float]],
) -> str:
    ac = at["AC"]
    head = f"{b}: LOO R² {ac['loo_r2']:.2f}, LOO Spearman {ac['loo_spearman']:.2f}"
    if not judged:
        return f"{head}; not judged: the scores span {100 * span:.0f} of 100 points (< {100 * min_span:.0f})"
    if best != "AC":
        lead = f"the {best}-only fit predicts better out of sample (LOO R² {at[best]['loo_r2']:.2f})"
    else:
        lead = "the AC law predicts best of the three fits out of sample"
    verdict = (
        "targets met"
        if all(met.values())
        else "targets missed: " + ", ".join(k for k, v in met.items() if not v)
    )
    return f"{head}; {lead}; {verdict}"
