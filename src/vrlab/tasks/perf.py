"""`vrlab task=perf` (extraction throughput: bare forward, end to end, naive) and `task=probe_perf` (the
torch linear probe against scikit-learn), each written as a JSON report under `<outputs>/perf`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from vrlab.data.loaders import Item
from vrlab.encoders.factory import load_encoder
from vrlab.perf import measure
from vrlab.probes.linear import LinearProbe, average_precision
from vrlab.runtime import atomic_write_json, resolve_device, seed_everything, slug, to_plain
from vrlab.tasks.config import benchmark_from_cfg, registry_cfg

log = logging.getLogger(__name__)


def perf_task(cfg: Any) -> dict[str, Any]:
    """Measure `cfg.encoder` on `cfg.benchmark` (images cycled to `perf.images`) and write the JSON report."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    benchmark = benchmark_from_cfg(cfg)
    encoder = load_encoder(
        cfg.encoder, to_plain(cfg.encoder_args), to_plain(cfg.compose), registry=registry_cfg(cfg)
    )
    n = cfg.perf.images
    items = [Item(f"{i:06d}", benchmark.items[i % len(benchmark)].path) for i in range(n)]
    report = measure(
        encoder,
        items,
        batch_size=cfg.perf.batch_size,
        device=device,
        dtype=cfg.dtype,
        num_workers=cfg.extract.num_workers,
        warmup=cfg.perf.warmup,
        repeats=cfg.perf.repeats,
        runs=cfg.perf.runs,
    )
    report["benchmark"] = benchmark.card.name
    strategy = report["resolution"]
    name = slug(encoder.name) + ("" if strategy == "fixed" else f"-{strategy}")
    out = Path(cfg.perf.out or Path(cfg.paths.outputs) / "perf" / f"{name}.json")
    atomic_write_json(out, report)
    log.info(
        "perf %s: bare %.1f img/s, end-to-end %.1f img/s (efficiency %.3f), naive %.1f img/s (x%.2f) -> %s",
        encoder.name,
        report["bare_forward_img_s"],
        report["end_to_end_img_s"],
        report["efficiency"],
        report["naive_img_s"],
        report["speedup_vs_naive"],
        out,
    )
    return report


def probe_perf_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=probe_perf`: the torch linear probe against scikit-learn on a synthetic multi-label problem.

    Features `[n, d]` are Gaussian; labels come from a random linear model plus noise. Both fit at the same
    regularisation (ours: mean BCE + wd/2 |W|^2; scikit-learn: C = 1 / (wd * n_train) per label, lbfgs).
    scikit-learn fits one label at a time, so `probe_perf.sklearn_labels` of them are timed and the total is
    extrapolated linearly (each label is an independent fit), and mAP is compared on those labels.
    """
    p = cfg.probe_perf
    rng = np.random.default_rng(cfg.seed)
    n, d, c = p.samples, p.dim, p.labels
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((d, c), dtype=np.float32) / np.sqrt(d)
    y = ((x @ w + 0.5 * rng.standard_normal((n, c), dtype=np.float32)) > 1.0).astype(np.float32)
    n_train = int(0.8 * n)
    xt, yt, xv, yv = (
        torch.from_numpy(x[:n_train]),
        torch.from_numpy(y[:n_train]),
        torch.from_numpy(x[n_train:]),
        torch.from_numpy(y[n_train:]),
    )
    start = time.perf_counter()
    probe = LinearProbe(True, weight_decays=[p.weight_decay], max_iter=p.max_iter, seed=cfg.seed)
    probe.fit(xt, yt)
    ours_s = time.perf_counter() - start
    ours_scores = probe.decision(xv).cpu()
    labels = list(range(p.sklearn_labels))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0, ddof=1)
    xs, xvs = (x[:n_train] - mean) / std, (x[n_train:] - mean) / std
    sk_scores, start = [], time.perf_counter()
    for j in labels:
        model = LogisticRegression(C=1 / (p.weight_decay * n_train), max_iter=1000).fit(xs, y[:n_train, j])
        sk_scores.append(model.decision_function(xvs))
    sk_s = (time.perf_counter() - start) * c / len(labels)
    ap_ours = average_precision(ours_scores[:, labels], yv[:, labels]).numpy()
    ap_sk = average_precision(torch.tensor(np.stack(sk_scores, 1)), yv[:, labels]).numpy()
    report = {
        "samples": n,
        "dim": d,
        "labels": c,
        "weight_decay": p.weight_decay,
        "device": str(probe.device),
        "torch_threads": torch.get_num_threads(),
        "ours_seconds": round(ours_s, 2),
        "sklearn_seconds_extrapolated": round(sk_s, 2),
        "sklearn_labels_timed": len(labels),
        "speedup": round(sk_s / ours_s, 2),
        "mAP_ours_on_timed_labels": round(100 * float(np.nanmean(ap_ours)), 2),
        "mAP_sklearn_on_timed_labels": round(100 * float(np.nanmean(ap_sk)), 2),
        "note": "ours: one fit of all labels at one weight decay (the grid search multiplies both sides alike)",
    }
    out = Path(cfg.probe_perf.out or Path(cfg.paths.outputs) / "perf" / "probe.json")
    atomic_write_json(out, report)
    log.info(
        "probe perf: ours %.1f s, scikit-learn %.1f s (extrapolated from %d labels): x%.1f; mAP %.2f vs %.2f -> %s",
        ours_s,
        sk_s,
        len(labels),
        report["speedup"],
        report["mAP_ours_on_timed_labels"],
        report["mAP_sklearn_on_timed_labels"],
        out,
    )
    return report
