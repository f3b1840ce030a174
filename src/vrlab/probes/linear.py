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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --- metrics ----------------------------------------------------------------------------------------------
def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP `[C]` for scores and binary targets `[N, C]`; NaN for a class without positives.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds (tied scores form one threshold)."""
    scores, targets = scores.double(), targets.double()
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for c in range(scores.shape[1]):
        s, t = scores[:, c], targets[:, c]
        n_pos = t.sum()
        if n_pos == 0:
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s, t = s[order], t[order]
        tp, fp = torch.cumsum(t, 0), torch.cumsum(1 - t, 0)
        last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # end of each run of equal scores
        precision = tp[last] / (tp[last] + fp[last])
        recall = tp[last] / n_pos
        out[c] = torch.sum(torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64)) * precision)
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
        return self._logits(features.float().to(self.device), self.weight, self.bias)

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return metrics(self.decision(features).cpu(), labels.cpu(), self.multilabel)


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


# --- tasks -------------------------------------------------------------------------------------------------
def _features(cfg: Any, benchmark: str, kind: str, row: str) -> tuple[torch.Tensor, list[Any], Any]:
    """Features `[N, D]` of one benchmark for `kind` (llm | encoder | adapter) and a row name, plus labels."""
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.probes.lmvr import lmvr_stores
    from vrlab.runtime import to_plain

    bench = load_benchmark(benchmark, cfg.paths.data, to_plain(cfg.registry))
    out, stores = lmvr_stores(cfg, bench)
    store = stores[kind]
    rows = store.manifest["rows"]
    if row not in rows:
        raise VrlabError(f"feature row '{row}' is not in {out / kind} (rows: {', '.join(rows)})")
    feats = store.load()[:, rows.index(row)]
    labels = {it.id: it.label for it in bench.items}
    return feats, [labels[i] for i in store.ids], bench


def probe_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=probe checkpoint=... probe.train=<bench> probe.test=[...] probe.features=llm probe.row=...`."""
    from vrlab.runtime import atomic_write_json, run_dir, to_plain

    pcfg = cfg.probe
    if not cfg.checkpoint:
        raise VrlabError("task=probe needs checkpoint=<a stage-2 model folder>")
    row = pcfg.row or (
        f"{pcfg.moment}/{pcfg.token_set}/{pcfg.pooling}/layer{pcfg.layer}"
        if pcfg.features == "llm"
        else f"{pcfg.features}/mean"
    )
    if row.startswith("before/generated"):
        raise VrlabError("token set 'generated' does not exist before generation; use probe.moment=after")
    train_x, train_y, bench = _features(cfg, pcfg.train, pcfg.features, row)
    multilabel = bench.task == "multilabel"
    tests = {}
    for name in to_plain(pcfg.test):
        x, y, tb = _features(cfg, name, pcfg.features, row)
        if tb.classes != bench.classes:
            raise VrlabError(
                f"test benchmark '{name}' has classes {tb.classes}, training '{pcfg.train}' has {bench.classes}"
            )
        groups = {name: (x, y)}
        if (
            tb.items and "corruption" in tb.items[0].meta
        ):  # ImageNet-C: one test set per corruption and severity
            groups = {}
            meta = {it.id: it.meta for it in tb.items}
            ids = [it.id for it in tb.items]
            for key in sorted({(meta[i]["corruption"], meta[i]["severity"]) for i in ids}):
                sel = [k for k, i in enumerate(ids) if (meta[i]["corruption"], meta[i]["severity"]) == key]
                groups[f"{name}/{key[0]}/{key[1]}"] = (x[sel], [y[k] for k in sel])
        tests.update(groups)
    result = fit_and_evaluate(
        train_x,
        train_y,
        tests,
        len(bench.classes),
        multilabel,
        weight_decays=to_plain(pcfg.weight_decays),
        val_fraction=pcfg.val_fraction,
        seed=cfg.seed,
    )
    result.update(
        features=pcfg.features,
        row=row,
        train=pcfg.train,
        label=pcfg.label or f"{pcfg.features}:{row}",
        protocol={
            "classifier": "logistic regression, L-BFGS, standardised features",
            "selection": f"weight decay on a seeded {pcfg.val_fraction:.0%} validation split, then refit",
            "metric": "mAP (sklearn AP definition)" if multilabel else "top-1 accuracy",
        },
    )
    if any("/" in k for k in result["test"]):
        result["robustness"] = robustness_summary(result["test"])
    out = run_dir(
        cfg.paths.outputs,
        "probe",
        pcfg.train,
        {
            "row": row,
            "features": pcfg.features,
            "test": to_plain(pcfg.test),
            "checkpoint": str(cfg.checkpoint),
            "wd": to_plain(pcfg.weight_decays),
        },
    )
    atomic_write_json(out / "probe.json", result)
    log.info(
        "probe %s [%s] trained on %s: %s",
        pcfg.features,
        row,
        pcfg.train,
        {k: {m: round(v, 2) for m, v in r.items()} for k, r in result["test"].items() if k.count("/") < 2},
    )
    result["output"] = str(out / "probe.json")
    return result


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


def probe_table_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=probe_table`: every probe.json under outputs/probe as one table (CSV and markdown)."""
    import json
    from glob import glob

    import pandas as pd

    rows = []
    for path in sorted(glob(str(Path(cfg.paths.outputs) / "probe" / "*" / "probe.json"))):
        r = json.loads(Path(path).read_text())
        row = {
            "features": r["features"],
            "row": r["row"],
            "train": r["train"],
            "weight_decay": r["weight_decay"],
        }
        for test, m in r["test"].items():
            if test.count("/") < 2:
                row.update({f"{test}:{k}": round(v, 2) for k, v in m.items() if isinstance(v, float)})
        if r.get("robustness"):
            row.update({f"corruption-{k}": round(v, 2) for k, v in r["robustness"]["per_category"].items()})
        rows.append(row)
    if not rows:
        raise VrlabError(
            f"no probe results under {Path(cfg.paths.outputs) / 'probe'}; run vrlab task=probe first"
        )
    table = pd.DataFrame(rows).sort_values(["features", "row"])
    out = Path(cfg.paths.outputs) / "probe" / "table.csv"
    table.to_csv(out, index=False)
    from vrlab.report import markdown_table

    out.with_suffix(".md").write_text(markdown_table(table))
    print(table.to_string(index=False))
    return {"table": str(out), "rows": len(table)}
