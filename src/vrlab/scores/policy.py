"""The AC policy (the Law paper, §5) and the recommender, on a law table.

The policy simulation samples candidates region by region in the normalised (A, C) square at finer and finer
grids, refits after each trained candidate, and stops when the true best is in the predicted top k; many
seeded trials against a random order give the distribution of trainings needed. The published version of
the paper (v3) reports the policy as Recall@k within a budget of k' trainings: the probability that, after
k' trainings chosen by region sampling, the fit on them ranks the true best in its top k. Region sampling
makes finitely many random choices before k' picks, so that probability is computed exactly by enumerating
them (`recall_within_budget`), against the random baseline k'/N (k' random trainings include the best).
The recommender ranks untrained candidates by predicted score with a bootstrap interval.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from vrlab.errors import VrlabError
from vrlab.scores.law import a_column, design, fit_polynomial, minmax, n_parameters

log = logging.getLogger(__name__)


def region_order(a: np.ndarray, c: np.ndarray, rng: np.random.Generator, max_level: int = 8) -> list[int]:
    """Training order by region sampling: at level l, a 2^l x 2^l grid over the unit square; visit the
    non-empty cells without a trained candidate in random order and train one random candidate of each."""
    trained: list[int] = []
    remaining = set(range(len(a)))
    for level in range(1, max_level + 1):
        cell = _cells(a, c, level)
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


def _cells(a: np.ndarray, c: np.ndarray, level: int) -> np.ndarray:
    n = 2**level
    return np.minimum((a * n).astype(int), n - 1) * n + np.minimum((c * n).astype(int), n - 1)


def best_in_top_k(
    seen: Sequence[int], a: np.ndarray, c: np.ndarray, y: np.ndarray, k: int, degree: int = 2
) -> bool:
    """Whether a fit on the trained candidates `seen` ranks the true best among its top k (one trained
    candidate: only if it is the best)."""
    best = int(np.argmax(y))
    seen = list(seen)
    if len(seen) == 1:
        return seen[0] == best
    x = np.c_[a, c]
    pred = fit_polynomial(x[seen], y[seen], degree).predict(design(x, degree))
    return best in np.argsort(-pred, kind="stable")[:k]


def trainings_needed(
    order: Sequence[int], a: np.ndarray, c: np.ndarray, y: np.ndarray, k: int, degree: int = 2
) -> int:
    """Trainings until the true best is in the top k predicted by a fit on the trained candidates."""
    for t in range(1, len(order) + 1):
        if best_in_top_k(order[:t], a, c, y, k, degree):
            return t
    return len(order)


def first_picks(
    a: np.ndarray, c: np.ndarray, budget: int, max_level: int = 8
) -> dict[frozenset[int], Fraction]:
    """Every set of the first `budget` candidates `region_order` can train, with its exact probability.

    Mirrors region_order's choices: at each level a uniformly random not-yet-visited cell (a random
    permutation, taken one cell at a time), then a uniformly random candidate of it; past the last level a
    uniformly random remaining candidate."""
    n_total = len(a)
    cells = {level: _cells(a, c, level) for level in range(1, max_level + 1)}
    out: dict[frozenset[int], Fraction] = defaultdict(Fraction)

    def level_cells(level: int, trained: tuple[int, ...]) -> list[int]:
        occupied = {int(cells[level][i]) for i in trained}
        return sorted({int(cells[level][i]) for i in range(n_total) if i not in trained} - occupied)

    def walk(trained: tuple[int, ...], level: int, todo: tuple[int, ...], p: Fraction) -> None:
        if len(trained) == min(budget, n_total):
            out[frozenset(trained)] += p
            return
        while not todo and level < max_level:
            level += 1
            todo = tuple(level_cells(level, trained))
        if not todo:  # past the last level: the rest in random order
            rest = [i for i in range(n_total) if i not in trained]
            for i in rest:
                walk((*trained, i), level, (), p / len(rest))
            return
        for cell in todo:
            members = [i for i in range(n_total) if i not in trained and cells[level][i] == cell]
            left = tuple(x for x in todo if x != cell)
            for i in members:
                walk((*trained, i), level, left, p / (len(todo) * len(members)))

    walk((), 1, tuple(level_cells(1, ())), Fraction(1))
    return dict(out)


def recall_within_budget(
    a: np.ndarray,
    c: np.ndarray,
    y: np.ndarray,
    k: int = 3,
    budget: int = 4,
    degree: int = 2,
    normalise: bool = True,
) -> dict[str, Any]:
    """Recall@k within a budget of `budget` trainings, exactly: the probability over region sampling's
    choices that the fit on the first `budget` trained candidates ranks the true best in its top k; and
    the random baseline budget/N."""
    if normalise:
        a, c, y = (minmax(np.asarray(v, float), n) for v, n in ((a, "A"), (c, "C"), (y, "score")))
    n = len(y)
    if not 1 <= budget <= n:
        raise VrlabError(f"law.budget={budget} must be between 1 and the number of candidates ({n})")
    picks = first_picks(a, c, budget)
    recall = sum(p for s, p in picks.items() if best_in_top_k(sorted(s), a, c, y, k, degree))
    return {
        "k": k,
        "budget": budget,
        "n_candidates": n,
        "AC": float(recall),
        "random": budget / n,
        "subsets": len(picks),
    }


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
