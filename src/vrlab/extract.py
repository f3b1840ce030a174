"""`vrlab task=extract`: run an encoder (optionally followed by a stage-1 projector) over a benchmark into an
EmbeddingStore.

DataLoader workers decode and resize; the model runs batched under `inference_mode` (bf16 autocast and SDPA
on GPU); finished shards go to a background writer thread, so the model does not wait on the disk. Batches
never straddle shards, a rerun skips the shards already on disk, and under `torchrun`/`accelerate launch` each
rank extracts a contiguous slice of shards; rank 0 completes the manifest once every rank is done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vrlab.data.images import decode_image
from vrlab.data.loaders import Item
from vrlab.encoders.base import VisionEncoder, autocast_context, collate_pixels, move_pixels
from vrlab.errors import ImageDecodeError, VrlabError
from vrlab.store import EmbeddingStore, StoreWriter, store_key

log = logging.getLogger(__name__)


class EncodedImages(Dataset):
    """Decode and transform benchmark images in DataLoader workers; unreadable images raise or are skipped."""

    def __init__(
        self, items: Sequence[Item], transform: torch.nn.Module, on_bad_image: str = "error"
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise VrlabError(f"data.on_bad_image='{on_bad_image}' must be 'error' or 'skip'")
        self.items, self.transform, self.on_bad_image = items, transform, on_bad_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        try:
            return index, self.transform(decode_image(self.items[index].path))
        except ImageDecodeError:
            if self.on_bad_image == "skip":
                return index, None
            raise


def collate(batch: Sequence[tuple[int, Any]]) -> tuple[torch.Tensor, Any, list[int]]:
    good = [(i, p) for i, p in batch if p is not None]
    bad = [i for i, p in batch if p is None]
    pixels = collate_pixels([p for _, p in good]) if good else None
    return torch.tensor([i for i, _ in good], dtype=torch.long), pixels, bad


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_shards(num_shards: int, rank: int, world: int) -> list[int]:
    """A contiguous slice of shard indices for `rank`."""
    per, extra = divmod(num_shards, world)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (1 if rank < extra else 0)))


@torch.inference_mode()
def extract(
    encoder: VisionEncoder,
    items: Sequence[Item],
    path: str | Path,
    settings: Mapping[str, Any],
    *,
    batch_size: int = 32,
    shard_size: int = 256,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    store_dtype: str = "float32",
    on_bad_image: str = "error",
    projector: torch.nn.Module | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> EmbeddingStore | None:
    """Extract into the store at `path`; returns the store on rank 0 once complete (None on other ranks)."""
    if not items:
        raise VrlabError("nothing to extract: the benchmark has no items")
    device = torch.device(device)
    writer = StoreWriter(path, settings, [it.id for it in items], shard_size, store_dtype)
    mine = [s for s in rank_shards(writer.num_shards, rank, world) if not writer.done(s)]
    batches = [
        list(r[i : i + batch_size])
        for s in mine
        for r in [writer.shard_range(s)]
        for i in range(0, len(r), batch_size)
    ]
    if mine:
        log.info(
            "rank %d: extracting %d shards (%d skipped as done) into %s",
            rank,
            len(mine),
            len(rank_shards(writer.num_shards, rank, world)) - len(mine),
            path,
        )
        loader = DataLoader(
            EncodedImages(items, encoder.transform, on_bad_image),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )
        pending: dict[int, dict[str, list]] = {
            s: {"index": [], "tokens": [], "pooled": [], "skipped": []} for s in mine
        }
        futures: list[Future] = []
        total = sum(len(writer.shard_range(s)) for s in mine)
        bar = tqdm(total=total, unit="img", desc=f"extract {encoder.name}", disable=not progress or rank != 0)
        with ThreadPoolExecutor(max_workers=1) as pool:
            for index, pixels, bad in loader:
                shard = int((index[0] if len(index) else bad[0]) // shard_size)
                acc = pending[shard]
                acc["skipped"] += [items[i].id for i in bad]
                if pixels is not None:
                    with autocast_context(device, dtype):
                        out = encoder(move_pixels(pixels, device)).check_finite(encoder.name)
                        tokens = projector(out.tokens) if projector is not None else out.tokens
                    acc["index"].append(index)
                    acc["tokens"].append(tokens.float().cpu())
                    acc["pooled"].append(
                        None if out.pooled is None or projector is not None else out.pooled.float().cpu()
                    )
                bar.update(len(index) + len(bad))
                if sum(len(i) for i in acc["index"]) + len(acc["skipped"]) == len(writer.shard_range(shard)):
                    futures.append(pool.submit(_write, writer, shard, pending.pop(shard)))
                    for f in [f for f in futures if f.done()]:
                        f.result()  # surface writer errors early
            for f in futures:
                f.result()
        bar.close()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    return writer.finalize(
        {"encoder": encoder.name, "grid": list(encoder.grid), "image_size": list(encoder.image_size)}
    )


def _write(writer: StoreWriter, shard: int, acc: dict[str, list]) -> None:
    if acc["index"]:
        index = torch.cat(acc["index"])
        tokens = torch.cat(acc["tokens"])
        pooled = torch.cat(acc["pooled"]) if all(p is not None for p in acc["pooled"]) else None
    else:  # every image of the shard was skipped
        index, tokens, pooled = torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, 0), None
    writer.write_shard(shard, index, tokens, pooled, acc["skipped"])


def extraction_settings(
    encoder: VisionEncoder,
    benchmark: Any,
    device: torch.device,
    dtype: str,
    projector: Mapping[str, Any] | None,
    seed: int,
) -> dict[str, Any]:
    """Everything that changes the stored numbers (the data root is left out: moving the data keeps the store)."""
    spec = {k: v for k, v in benchmark.card.spec.items() if k != "root"}
    compute = "bf16" if device.type == "cuda" and dtype in ("auto", "bfloat16", "bf16") else "fp32"
    return {
        "encoder": encoder.settings(),
        "benchmark": {"name": benchmark.card.name, "spec": spec},
        "compute": compute,
        "projector": projector,
        "seed": seed,
    }


def extract_store(
    cfg: Any,
    encoder_name: str,
    benchmark_name: str,
    projector_path: str | None = None,
    *,
    limit: int | None = None,
    encoder_args: Mapping[str, Any] | None = None,
    compose: Mapping[str, Any] | None = None,
    benchmark_args: Mapping[str, Any] | None = None,
    distributed: bool = False,
) -> EmbeddingStore | None:
    """Extract (or reuse) the store of `encoder_name` on `benchmark_name` with the config's settings.

    `limit` keeps the first N items (the A score uses the first 100 images of each benchmark). The store
    folder is `<outputs>/stores/<benchmark>/<encoder>-<key>` unless `extract.out` is set. Returns None on
    ranks other than 0.
    """
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.mllm.adapters import file_digest, load_projector
    from vrlab.registry import Registry
    from vrlab.runtime import resolve_device, slug, to_plain

    rank, world = distributed_context() if distributed else (0, 1)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    benchmark = load_benchmark(
        benchmark_name,
        cfg.paths.data,
        to_plain(cfg.registry),
        to_plain(benchmark_args if benchmark_args is not None else cfg.benchmark_args),
    )
    registry = Registry.from_config(to_plain(cfg.registry))
    encoder = (
        registry.build(
            encoder_name,
            to_plain(encoder_args if encoder_args is not None else cfg.encoder_args),
            to_plain(compose if compose is not None else cfg.compose),
        )
        .to(device)
        .eval()
    )
    projector, projector_info = None, None
    if projector_path:
        projector, pcfg = load_projector(projector_path, expect_in_dim=encoder.dim, encoder=encoder.name)
        projector = projector.to(device)
        if pcfg.get("encoder") and pcfg["encoder"] != encoder.name:
            log.warning(
                "projector %s was trained on '%s', not '%s'", projector_path, pcfg["encoder"], encoder.name
            )
        projector_info = {"config": pcfg, "weights": file_digest(projector_path)}
    items = benchmark.items[:limit] if limit else benchmark.items
    settings = extraction_settings(encoder, benchmark, device, cfg.dtype, projector_info, cfg.seed)
    key = store_key(
        {
            "settings": settings,
            "ids": [it.id for it in items],
            "shard_size": cfg.extract.shard_size,
            "dtype": cfg.extract.store_dtype,
        }
    )
    default = (
        Path(cfg.paths.outputs) / "stores" / slug(benchmark.card.name) / f"{slug(encoder.name)}-{key[:12]}"
    )
    path = Path(cfg.extract.out or default)
    store = extract(
        encoder,
        items,
        path,
        settings,
        batch_size=cfg.extract.batch_size,
        shard_size=cfg.extract.shard_size,
        num_workers=cfg.extract.num_workers,
        device=device,
        dtype=cfg.dtype,
        store_dtype=cfg.extract.store_dtype,
        on_bad_image=cfg.data.on_bad_image,
        projector=projector,
        rank=rank,
        world=world,
    )
    if store is not None:
        log.info(
            "store %s: %d items, tokens %s, %d skipped",
            path,
            len(store),
            store.manifest["shapes"]["tokens"],
            len(store.skipped),
        )
    return store


def extract_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=extract`; under torchrun/accelerate each rank extracts its slice of shards."""
    from vrlab.runtime import seed_everything

    seed_everything(cfg.seed)
    rank, world = distributed_context()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        store = extract_store(
            cfg, cfg.encoder, cfg.benchmark, cfg.extract.projector, limit=cfg.extract.limit, distributed=True
        )
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if store is None:
        return {"rank": rank}
    return {
        "path": str(store.path),
        "items": len(store),
        "skipped": store.skipped,
        "shapes": store.manifest["shapes"],
    }
