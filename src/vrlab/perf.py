"""`vrlab task=perf`: throughput of one encoder, written as a JSON report.

Three numbers on the same images and batch size (bare and end-to-end alternate over `runs` rounds and
report their best round):
  bare forward   the model alone on pre-made input tensors (the ceiling);
  end-to-end     `extract` from image files into a fresh EmbeddingStore (decode, resize, forward, write);
  naive          the published A-score workflow: batch size 1, decode in the main process, one `.pt` file
                 per image.
`efficiency` = end-to-end / bare forward; `speedup_vs_naive` = end-to-end / naive. `tokens_per_image` counts the
stored tokens (they differ per image under the anyres and native resolution strategies). Peak memory is the CUDA
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
from vrlab.runtime import library_versions

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
            store = extract(
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
        counts = [len(store.tokens(i)) for i in range(len(store))]  # anyres and native: per image
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
        "resolution": getattr(encoder, "strategy", "fixed"),
        "tokens_per_image": {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts)},
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
