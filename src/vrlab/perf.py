"""`vrlab task=perf`: throughput of one encoder, written as a JSON report.

Three numbers on the same images and batch size (bare and end-to-end alternate over `runs` rounds and
report their best round):
  bare forward   the model alone on pre-made input tensors (the ceiling);
  end-to-end     `extract` from image files into a fresh EmbeddingStore (decode, resize, forward, write);
  naive          the published A-score workflow: batch size 1, decode in the main process, one `.pt` file
                 per image.
`efficiency` = end-to-end / bare forward; `speedup_vs_naive` = end-to-end / naive. Peak memory is the CUDA
allocator's peak on GPU, the process's peak RSS on the CPU.
"""

from __future__ import annotations

import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vrlab.data.images import decode_image
from vrlab.data.loaders import Item
from vrlab.encoders.base import VisionEncoder, autocast_context, collate_pixels, move_pixels
from vrlab.extract import extract
from vrlab.runtime import atomic_write_json, library_versions, slug

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.inference_mode()
def bare_forward(
    encoder: VisionEncoder, pixels: Any, device: torch.device, dtype: str, repeats: int
) -> float:
    """Seconds of the fastest of `repeats` forward passes on one pre-made batch already on the device."""
    times = []
    with autocast_context(device, dtype):
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            encoder(pixels)
            _sync(device)
            times.append(time.perf_counter() - start)
    return min(times)


def naive(encoder: VisionEncoder, items: list[Item], device: torch.device, folder: Path) -> float:
    """Images per second of batch-size-1 inference with one `.pt` file per image."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        for i, item in enumerate(items, 1):
            pixels = move_pixels(collate_pixels([encoder.transform(decode_image(item.path))]), device)
            torch.save(encoder(pixels).tokens.cpu(), folder / f"tensor_{i}.pt")
    _sync(device)
    return len(items) / (time.perf_counter() - start)


def measure(
    encoder: VisionEncoder,
    items: list[Item],
    *,
    batch_size: int,
    device: torch.device,
    dtype: str = "auto",
    num_workers: int = 2,
    warmup: int = 2,
    repeats: int = 5,
    runs: int = 2,
    naive_images: int = 64,
) -> dict[str, Any]:
    """All three throughputs and their ratios.

    Bare and end-to-end measurements alternate (`runs` rounds) and each reports its best round, so both see
    the same machine: on a shared 2-core machine consecutive timings drift by about 10%.
    """
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pixels = move_pixels(
        collate_pixels([encoder.transform(decode_image(it.path)) for it in items[:batch_size]]), device
    )
    tmp = Path(tempfile.mkdtemp(prefix="vrlab-perf-"))
    try:
        bare_forward(encoder, pixels, device, dtype, warmup)
        extract(
            encoder,
            items[:batch_size],
            tmp / "warm",
            {"perf": "warmup"},
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            dtype=dtype,
            progress=False,
        )
        bare_s, e2e_s = [], []
        for run in range(runs):
            bare_s.append(bare_forward(encoder, pixels, device, dtype, repeats))
            start = time.perf_counter()
            extract(
                encoder,
                items,
                tmp / f"store{run}",
                {"perf": True},
                batch_size=batch_size,
                shard_size=max(256, batch_size),
                num_workers=num_workers,
                device=device,
                dtype=dtype,
                progress=False,
            )
            _sync(device)
            e2e_s.append(time.perf_counter() - start)
        bare, end_to_end = batch_size / min(bare_s), len(items) / min(e2e_s)
        slow = naive(encoder, items[:naive_images], device, tmp / "naive")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "encoder": encoder.name,
        "device": str(device),
        "dtype": dtype,
        "batch_size": batch_size,
        "images": len(items),
        "num_workers": num_workers,
        "runs": runs,
        "bare_repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "tokens": [encoder.num_tokens, encoder.dim],
        "parameters_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
        "bare_forward_img_s": round(bare, 2),
        "end_to_end_img_s": round(end_to_end, 2),
        "naive_img_s": round(slow, 2),
        "efficiency": round(end_to_end / bare, 3),
        "speedup_vs_naive": round(end_to_end / slow, 2),
        "bare_runs_img_s": [round(batch_size / t, 2) for t in bare_s],
        "end_to_end_runs_img_s": [round(len(items) / t, 2) for t in e2e_s],
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "versions": library_versions(),
    }


def perf_task(cfg: Any) -> dict[str, Any]:
    """Measure `cfg.encoder` on `cfg.benchmark` (images cycled to `perf.images`) and write the JSON report."""
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.registry import Registry
    from vrlab.runtime import resolve_device, seed_everything, to_plain

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    benchmark = load_benchmark(
        cfg.benchmark, cfg.paths.data, to_plain(cfg.registry), to_plain(cfg.benchmark_args)
    )
    encoder = Registry.from_config(cfg.registry).build(
        cfg.encoder, to_plain(cfg.encoder_args), to_plain(cfg.compose)
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
    out = Path(cfg.perf.out or Path(cfg.paths.outputs) / "perf" / f"{slug(encoder.name)}.json")
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
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from vrlab.probes.linear import LinearProbe, average_precision

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
