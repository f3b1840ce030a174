"""Linear probes in torch: logistic regression (softmax cross-entropy for single-label, per-class sigmoid for
multi-label) on standardised features, full-batch L-BFGS, weight decay chosen on a seeded validation split of
the training set (warm-started along the grid), then refit on the whole training set. Runs on GPU when there
is one.

Metrics: top-1 accuracy, mean per-class accuracy, mAP (per-class average precision as scikit-learn's
`average_precision_score` defines it, ties included, averaged over classes with at least one positive) and
VOC07 11-point AP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --- metrics ----------------------------------------------------------------------------------------------
def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP by scikit-learn's `average_precision_score` (ties included); NaN for classes with no
    positives, which mAP then skips."""
    from sklearn.metrics import average_precision_score

    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for c in range(scores.shape[1]):
        t = targets[:, c].double().cpu().numpy()
        if t.sum() > 0:
            out[c] = float(average_precision_score(t, scores[:, c].double().cpu().numpy()))
    return out


def voc07_ap(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class VOC2007 11-point AP: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for c in range(scores.shape[1]):
        t = targets[:, c].double()
        if t.sum() == 0:
            continue
        order = torch.argsort(scores[:, c], descending=True, stable=True)
        t = t[order]
        tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
        recall, precision = tp / t.sum(), tp / (tp + fp)
        out[c] = (
            sum(
                (precision[recall >= r].max() if (recall >= r).any() else torch.tensor(0.0))
                for r in torch.linspace(0, 1, 11, dtype=torch.float64)
            )
            / 11
        )
    return out


def metrics(
    scores: torch.Tensor, targets: torch.Tensor, multilabel: bool, voc07: bool = True
) -> dict[str, float]:
    """Accuracy and mean per-class accuracy (single-label) or mAP and VOC07 11-point mAP (multi-label), in %."""
    if multilabel:
        ap = average_precision(scores, targets)
        out = {
            "mAP": 100 * float(np.nanmean(ap.numpy())),
            "classes_with_positives": int((~torch.isnan(ap)).sum()),
        }
        if voc07:
            out["mAP_voc07"] = 100 * float(np.nanmean(voc07_ap(scores, targets).numpy()))
        return out
    pred = scores.argmax(dim=1)
    correct = (pred == targets).double()
    per_class = [correct[targets == c].mean().item() for c in torch.unique(targets)]
    return {
        "accuracy": 100 * correct.mean().item(),
        "mean_per_class_accuracy": 100 * float(np.mean(per_class)),
    }


# --- the probe ---------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    weight_decay: float
    validation: dict[str, float]  # weight decay -> validation metric
    train_metrics: dict[str, float]
    test_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class LinearProbe:
    """Standardise, fit a linear classifier by L-BFGS, choose the weight decay on a validation split."""

    def __init__(
        self,
        multilabel: bool,
        weight_decays: Sequence[float] = DEFAULT_GRID,
        val_fraction: float = 0.2,
        max_iter: int = 100,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self.multilabel, self.grid, self.val_fraction = multilabel, tuple(weight_decays), val_fraction
        self.max_iter, self.seed = max_iter, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _logits(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits of standardised features without materialising them: ((x - m) / s) W + b = x (W / s) + b - (m / s) W."""
        scaled = w / self.std.T
        return x @ scaled + (b - self.mean @ scaled)

    def _fit(
        self, x: torch.Tensor, y: torch.Tensor, wd: float, init: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = x.shape
        c = y.shape[1] if self.multilabel else self.n_classes
        w = init[0].clone() if init else torch.zeros(d, c, device=self.device)
        b = init[1].clone() if init else torch.zeros(c, device=self.device)
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1,
            max_iter=self.max_iter,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-4,  # like scikit-learn's default tol; the probe's mAP is settled well before
            tolerance_change=1e-5,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = self._logits(x, w, b)
            if self.multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
            else:
                loss = F.cross_entropy(logits, y)
            loss = loss + 0.5 * wd * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def _score(self, x: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> float:
        m = metrics(self._logits(x, *params).cpu(), y.cpu(), self.multilabel, voc07=False)
        return m["mAP"] if self.multilabel else m["accuracy"]

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> ProbeResult:
        """Choose the weight decay on a seeded validation split, then refit on all training data."""
        import time

        start = time.perf_counter()
        finite_features(features, "training features")
        x = features.float().to(self.device)
        y = labels.to(self.device)
        y = y.float() if self.multilabel else y.long()
        if len(x) < 5:
            raise VrlabError(f"a linear probe needs at least 5 training samples, got {len(x)}")
        self.n_classes = int(y.max()) + 1 if not self.multilabel else y.shape[1]
        var, self.mean = torch.var_mean(x, dim=0, keepdim=True)
        self.std = var.sqrt().clamp_min(1e-6)
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(x), generator=gen).to(self.device)
        n_val = max(1, round(self.val_fraction * len(x)))
        val, tr = perm[:n_val], perm[n_val:]
        scores, params = {}, None
        if len(self.grid) > 1:
            for wd in sorted(self.grid, reverse=True):  # strong to weak decay, warm-started
                params = self._fit(x[tr], y[tr], wd, params)
                scores[wd] = self._score(x[val], y[val], params)
        best = (
            max(scores, key=lambda k: (scores[k], k)) if scores else self.grid[0]
        )  # ties: the stronger decay
        self.weight, self.bias = self._fit(x, y, best, None)
        train_m = metrics(
            self._logits(x, self.weight, self.bias).cpu(), labels.cpu(), self.multilabel, voc07=False
        )
        return ProbeResult(
            best, {str(k): v for k, v in scores.items()}, train_m, seconds=time.perf_counter() - start
        )

    @torch.no_grad()
    def decision(self, features: torch.Tensor) -> torch.Tensor:
        """Logits `[N, C]`."""
        finite_features(features, "features")
        return self._logits(features.float().to(self.device), self.weight, self.bias)

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return metrics(self.decision(features).cpu(), labels.cpu(), self.multilabel)


def finite_features(features: torch.Tensor, what: str, ids: Sequence[Any] | None = None) -> None:
    """Refuse NaN or infinite features, naming the rows (or their ids): they would overflow the fit or score
    silently low."""
    bad = (~torch.isfinite(features.reshape(len(features), -1))).any(dim=1).nonzero().flatten().tolist()
    if bad:
        names = [ids[i] for i in bad] if ids is not None else bad
        raise VrlabError(f"{what} hold NaN or inf values in {len(bad)} rows: {names[:10]}")


def multi_hot(labels: Sequence[Sequence[int]], n_classes: int) -> torch.Tensor:
    out = torch.zeros(len(labels), n_classes)
    for i, ls in enumerate(labels):
        out[i, list(ls)] = 1
    return out


def fit_and_evaluate(
    train_x: torch.Tensor,
    train_labels: Sequence[Any],
    test_sets: dict[str, tuple[torch.Tensor, Sequence[Any]]],
    n_classes: int,
    multilabel: bool,
    **kw: Any,
) -> dict[str, Any]:
    """Fit on one set, evaluate on several (the domain-shift and robustness experiments test on many)."""
    to_y = (lambda ls: multi_hot(ls, n_classes)) if multilabel else (lambda ls: torch.tensor(list(ls)))
    probe = LinearProbe(multilabel, **kw)
    result = probe.fit(train_x, to_y(train_labels))
    result.test_metrics = {name: probe.evaluate(x, to_y(ls)) for name, (x, ls) in test_sets.items()}
    return {
        "weight_decay": result.weight_decay,
        "validation": result.validation,
        "train": result.train_metrics,
        "test": result.test_metrics,
        "seconds": result.seconds,
    }


def robustness_summary(tests: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per-corruption and per-category (noise, blur, weather, digital) mean accuracy over severities."""
    from vrlab.data.loaders import IMAGENET_C_CATEGORIES

    per_corruption: dict[str, list[float]] = {}
    for key, m in tests.items():
        parts = key.split("/")
        if len(parts) >= 3:
            per_corruption.setdefault(parts[-2], []).append(m["accuracy"])
    corr = {c: float(np.mean(v)) for c, v in per_corruption.items()}
    cats = {
        cat: float(np.mean([corr[c] for c in names if c in corr]))
        for cat, names in IMAGENET_C_CATEGORIES.items()
        if any(c in corr for c in names)
    }
    return {
        "per_corruption": corr,
        "per_category": cats,
        "mean": float(np.mean(list(corr.values()))) if corr else None,
    }


def corruption_groups(
    name: str, features: torch.Tensor, labels: Sequence[Any], items: Sequence[Any]
) -> dict[str, tuple[torch.Tensor, list[Any]]]:
    """One test set per corruption and severity for ImageNet-C items (`<name>/<corruption>/<severity>`);
    any other benchmark stays one test set."""
    if not items or "corruption" not in items[0].meta:
        return {name: (features, list(labels))}
    keys = [(it.meta["corruption"], it.meta["severity"]) for it in items]
    groups = {}
    for key in sorted(set(keys)):
        sel = [k for k, other in enumerate(keys) if other == key]
        groups[f"{name}/{key[0]}/{key[1]}"] = (features[sel], [labels[k] for k in sel])
    return groups


def attribute_probes(
    train_x: torch.Tensor,
    train_attrs: Sequence[dict[str, int | None]],
    tests: dict[str, tuple[torch.Tensor, Sequence[dict[str, int | None]]]],
    values: dict[str, Sequence[str]],
    groups: dict[str, Sequence[str]],
    **kw: Any,
) -> dict[str, Any]:
    """One multi-class probe per attribute (DeepFashion-MultiModal), on the rows where the attribute is known:
    NA rows are left out of its training and test sets and counted. Each group's score is the mean accuracy
    over its attributes; an attribute with fewer than two values among its training rows is not probed (it
    would score a constant) and is listed under `skipped`."""
    per: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for attr, names in values.items():
        keep = [i for i, a in enumerate(train_attrs) if a[attr] is not None]
        labels = [train_attrs[i][attr] for i in keep]
        if len(set(labels)) < 2 or len(keep) < 5:
            skipped[attr] = f"{len(keep)} known training rows with {len(set(labels))} distinct values"
            continue
        test_sets, counts = {}, {}
        for name, (x, attrs) in tests.items():
            sel = [i for i, a in enumerate(attrs) if a[attr] is not None]
            counts[name] = {"n": len(sel), "na_excluded": len(attrs) - len(sel)}
            if sel:
                test_sets[name] = (x[sel], [attrs[i][attr] for i in sel])
        res = fit_and_evaluate(train_x[keep], labels, test_sets, len(names), False, **kw)
        per[attr] = {
            "weight_decay": res["weight_decay"],
            "train": {**res["train"], "n": len(keep), "na_excluded": len(train_attrs) - len(keep)},
            "test": {name: {**res["test"].get(name, {}), **counts[name]} for name in tests},
        }
    summary = {
        name: {
            group: float(np.mean(scores))
            for group, attrs in groups.items()
            if (
                scores := [
                    per[a]["test"][name]["accuracy"]
                    for a in attrs
                    if "accuracy" in per.get(a, {}).get("test", {}).get(name, {})
                ]
            )
        }
        for name in tests
    }
    return {
        "test": summary,
        "attributes": per,
        "skipped": skipped,
        "groups": {g: list(a) for g, a in groups.items()},
    }
