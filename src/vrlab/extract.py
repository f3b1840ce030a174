"""Extraction: run an encoder (optionally followed by a stage-1 adapter) over a benchmark into an EmbeddingStore.

`run_extraction(ExtractionRequest(...))` is the whole job by names (it reuses a finished store with the same
key); `extract(encoder, items, path, settings)` is the loop itself for an encoder already built.

DataLoader workers decode and resize; the model runs batched under `inference_mode` (bf16 autocast and SDPA
on GPU); finished shards go to a background writer thread, so the model does not wait on the disk. Batches
never straddle shards, a rerun skips the shards already on disk, and under `torchrun`/`accelerate launch` each
rank extracts a contiguous slice of shards; rank 0 completes the manifest once every rank is done.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vrlab.adapters import QFormerAdapter
from vrlab.data.images import DEFAULT_MAX_PIXELS, decode_image
from vrlab.data.loaders import Item
from vrlab.encoders.base import VisionEncoder, autocast_context, check_finite, collate_pixels, move_pixels
from vrlab.errors import ImageDecodeError, VrlabError
from vrlab.fingerprint import card_fingerprint, items_fingerprint
from vrlab.runtime import distributed_context, rank_device, resolve_device, slug, to_plain
from vrlab.settings import check_count
from vrlab.store import EmbeddingStore, StoreWriter, store_key

log = logging.getLogger(__name__)


class EncodedImages(Dataset):
    """Decode and transform benchmark images in DataLoader workers.

    An unreadable image comes back as its error message instead of pixels, so the main process (not the
    worker, whose traceback would bury the file name) raises it, or skips the image under `skip`.
    """

    def __init__(
        self,
        items: Sequence[Item],
        transform: torch.nn.Module,
        on_bad_image: str = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise VrlabError(f"data.on_bad_image='{on_bad_image}' must be 'error' or 'skip'")
        self.items, self.transform, self.on_bad_image = items, transform, on_bad_image
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            return index, self.transform(decode_image(self.items[index].path, self.max_pixels)), None
        except ImageDecodeError as exc:
            return index, None, str(exc)


def collate(batch: Sequence[tuple[int, Any, str | None]]) -> tuple[torch.Tensor, Any, list[int], list[str]]:
    good = [(i, p) for i, p, _ in batch if p is not None]
    bad = [i for i, p, _ in batch if p is None]
    errors = [e for _, p, e in batch if p is None and e]
    pixels = collate_pixels([p for _, p in good]) if good else None
    return torch.tensor([i for i, _ in good], dtype=torch.long), pixels, bad, errors


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    adapter: torch.nn.Module | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    layer_views: Mapping[str, Any] | None = None,
) -> EmbeddingStore | None:
    """Extract into the store at `path`; returns the store on rank 0 once complete (None on other ranks).

    With `encoder.record_layers` set, each of those hidden layers is stored too, read back with
    `store.view(layer)`; `layer_views` records each view's own key and settings (`layer_settings`)."""
    if not items:
        raise VrlabError("nothing to extract: the benchmark has no items")
    if on_bad_image not in ("error", "skip"):
        raise VrlabError(f"data.on_bad_image='{on_bad_image}' must be 'error' or 'skip'")
    device = torch.device(device)
    ragged = getattr(encoder, "strategy", "fixed") != "fixed"  # anyres, native: a token count per image
    if ragged and adapter is not None and isinstance(getattr(adapter, "adapter", adapter), QFormerAdapter):
        raise VrlabError(
            f"a Q-Former adapter cannot follow '{encoder.name}' under resolution={encoder.strategy}: its "
            "queries expect one grid; use a linear or mlp2x_gelu adapter"
        )
    layers = list(getattr(encoder, "record_layers", None) or [])
    if layers and (ragged or adapter is not None):
        raise VrlabError(
            "extract.layers records a fixed-grid tower's own layers: not with an adapter or resolution="
            f"{getattr(encoder, 'strategy', 'fixed')}"
        )
    writer = StoreWriter(path, settings, [it.id for it in items], shard_size, store_dtype, ragged=ragged)
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
            EncodedImages(items, encoder.transform, on_bad_image, max_pixels),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )
        pending: dict[int, dict[str, list]] = {
            s: {"index": [], "tokens": [], "pooled": [], "skipped": [], "layouts": [], "layers": []}
            for s in mine
        }
        futures: list[Future] = []
        total = sum(len(writer.shard_range(s)) for s in mine)
        bar = tqdm(total=total, unit="img", desc=f"extract {encoder.name}", disable=not progress or rank != 0)
        with ThreadPoolExecutor(max_workers=1) as pool:
            for index, pixels, bad, errors in loader:
                if errors and on_bad_image == "error":
                    raise ImageDecodeError(f"{errors[0]} (data.on_bad_image=skip skips unreadable images)")
                shard = int((index[0] if len(index) else bad[0]) // shard_size)
                acc = pending[shard]
                acc["skipped"] += [items[i].id for i in bad]
                if pixels is not None:
                    with autocast_context(device, dtype):
                        out = encoder(move_pixels(pixels, device)).check_finite(encoder.name)
                        tokens = out.tokens
                        if adapter is not None:
                            tokens = adapter(tokens)
                            check_finite(
                                tokens,
                                f"the adapter after '{encoder.name}' produced non-finite tokens",
                                "its weights hold NaN or inf values; retrain or replace the adapter",
                            )
                    acc["index"].append(index)
                    if ragged:  # each image's own tokens, unpadded
                        tokens = tokens.float().cpu()
                        acc["tokens"] += [t[:n] for t, n in zip(tokens, out.lengths, strict=True)]
                        acc["layouts"] += [lay.to_dict() for lay in out.layouts]
                    else:
                        acc["tokens"].append(tokens.float().cpu())
                    if layers:
                        acc["layers"].append({k: t.float().cpu() for k, t in out.layers.items()})
                    acc["pooled"].append(
                        None if out.pooled is None or adapter is not None else out.pooled.float().cpu()
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
        {
            "layer_views": dict(layer_views or {}),
            "encoder": encoder.name,
            "grid": list(encoder.grid),
            "image_size": list(encoder.image_size),
            "resolution": getattr(encoder, "strategy", "fixed"),
        }
    )


def _write(writer: StoreWriter, shard: int, acc: dict[str, list]) -> None:
    layouts = acc["layouts"] if writer.ragged else None
    if acc["index"]:
        index = torch.cat(acc["index"])
        tokens = acc["tokens"] if writer.ragged else torch.cat(acc["tokens"])
        pooled = torch.cat(acc["pooled"]) if all(p is not None for p in acc["pooled"]) else None
        layers = (
            {k: torch.cat([b[k] for b in acc["layers"]]) for k in acc["layers"][0]} if acc["layers"] else None
        )
    else:  # every image of the shard was skipped
        index, tokens, pooled, layers = torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, 0), None, None
        tokens = [] if writer.ragged else tokens
    writer.write_shard(shard, index, tokens, pooled, acc["skipped"], layouts, layers)


def layer_settings(settings: Mapping[str, Any], encoder: VisionEncoder, layer: int) -> dict[str, Any]:
    """The settings a single-layer extraction at `layer` would have: a multi-layer store's view of that layer
    carries them, and their key, so results computed from the view are those of that extraction."""
    out = copy.deepcopy(to_plain(dict(settings)))
    out.pop("layers", None)
    out["encoder"]["card"] = encoder.card.with_overrides({"layer": layer}).to_dict()
    out["encoder"]["backend"]["layer"] = layer
    return out


def extraction_settings(
    encoder: VisionEncoder,
    benchmark: Any,
    items: Sequence[Item],
    device: torch.device,
    dtype: str,
    adapter: Mapping[str, Any] | None,
    seed: int,
) -> dict[str, Any]:
    """Everything that changes the stored numbers. The data root itself is left out (moving the data keeps the
    store), but each image's size and modification time are in, so changed data never reuses a store."""
    spec = {k: v for k, v in benchmark.card.spec.items() if k != "root"}
    compute = "bf16" if device.type == "cuda" and dtype in ("auto", "bfloat16", "bf16") else "fp32"
    settings = encoder.settings()
    return {
        "encoder": settings,
        "benchmark": {"name": benchmark.card.name, "spec": spec},
        "compute": compute,
        "projector": adapter,  # the key's old name, kept so existing stores keep their keys
        "seed": seed,
        # what the numbers come from beyond the settings: weight files and image files (size, mtime)
        "fingerprint": {
            "weights": card_fingerprint(settings["card"] or {}),
            "images": items_fingerprint([it.path for it in items]),
        },
    }


@dataclass(frozen=True)
class ExtractionRequest:
    """What to extract and how: names, overrides and the settings of the extraction loop.

    `registry` is the `registry` config section (`encoder_dirs`, `benchmark_dirs`, `builtin`); `out`
    defaults to `<outputs>/stores/<benchmark>/<encoder>-<key>`; `limit` keeps the first N items (the A
    score uses the first 100 images of each benchmark).
    """

    encoder: str
    benchmark: str
    adapter: str | None = None
    encoder_weights: str | None = None  # a tuned tower (model folder or file); an adapter may name its own
    limit: int | None = None
    encoder_args: Mapping[str, Any] = field(default_factory=dict)
    compose: Mapping[str, Any] = field(default_factory=dict)
    benchmark_args: Mapping[str, Any] = field(default_factory=dict)
    registry: Mapping[str, Any] = field(default_factory=dict)
    data_root: str = "data"
    outputs: str = "outputs"
    out: str | None = None
    batch_size: int = 32
    shard_size: int = 256
    num_workers: int = 2
    store_dtype: str = "float32"
    on_bad_image: str = "error"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    layers: Any = None  # extract.layers: [-1, -2, 12] or "all": those hidden layers too, each a store view
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for key, minimum, nullable in (
            ("batch_size", 1, False),
            ("shard_size", 1, False),
            ("num_workers", 0, False),
            ("limit", 1, True),
            ("max_pixels", 1, True),
        ):
            check_count(
                f"extract.{key}" if key != "max_pixels" else "data.max_pixels",
                getattr(self, key),
                minimum,
                nullable,
            )
        if self.on_bad_image not in ("error", "skip"):
            raise VrlabError(f"data.on_bad_image='{self.on_bad_image}' must be 'error' or 'skip'")
        layers = self.layers
        if (
            layers is not None
            and layers != "all"
            and (isinstance(layers, str | int) or not all(isinstance(k, int) for k in layers))
        ):
            raise VrlabError(
                f"extract.layers={layers!r} must be a list of layer indices, e.g. [-1, -2, 12], or 'all'"
            )


def run_extraction(request: ExtractionRequest, *, distributed: bool = False) -> EmbeddingStore | None:
    """Extract (or reuse) the store of `request.encoder` on `request.benchmark`; None on ranks other than 0."""
    from vrlab.adapters import load_token_adapter
    from vrlab.checkpoint import file_digest, load_tower
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.encoders.factory import load_encoder

    r = request
    rank, world = distributed_context() if distributed else (0, 1)
    device = rank_device(resolve_device(r.device)) if distributed else resolve_device(r.device)
    registry = to_plain(r.registry)
    benchmark = load_benchmark(r.benchmark, r.data_root, registry, to_plain(r.benchmark_args))
    encoder = (
        load_encoder(r.encoder, to_plain(r.encoder_args), to_plain(r.compose), registry=registry)
        .to(device)
        .eval()
    )
    adapter, adapter_info = None, None
    tower = r.encoder_weights
    if r.adapter:
        adapter, acfg = load_token_adapter(r.adapter, expect_in_dim=encoder.dim, encoder=encoder.name)
        adapter = adapter.to(device)
        if acfg.get("encoder") and acfg["encoder"] != encoder.name:
            log.warning("adapter %s was trained on '%s', not '%s'", r.adapter, acfg["encoder"], encoder.name)
        adapter_info = {"config": acfg, "weights": file_digest(r.adapter)}
        if acfg.get("tuned_encoder") and not tower:  # trained with its tower: the tower comes along
            tower = str(Path(r.adapter) / acfg["tuned_encoder"])
    tuned = load_tower(encoder, tower) if tower else None
    items = benchmark.items[: r.limit] if r.limit else benchmark.items
    settings = extraction_settings(encoder, benchmark, items, device, r.dtype, adapter_info, r.seed)
    if tuned:  # only then, so the stores of frozen towers keep their keys
        settings["tuned_tower"] = tuned
    views = None
    if r.layers:
        if getattr(encoder, "strategy", "fixed") != "fixed":
            raise VrlabError(
                f"extract.layers records a fixed-grid tower's layers, not '{encoder.name}' under "
                f"resolution={encoder.strategy}"
            )
        if not hasattr(encoder, "layer_indices"):
            raise VrlabError(
                f"extract.layers needs a tower of the transformers backend; '{encoder.name}' is a "
                f"{type(encoder).__name__}"
            )
        encoder.record_layers = encoder.layer_indices(r.layers)
        settings["layers"] = list(encoder.record_layers)
        views = {}
        for k in encoder.record_layers:
            view = layer_settings(settings, encoder, k)
            ids = [it.id for it in items]
            views[str(k)] = {"key": store_key(view, ids, r.shard_size, r.store_dtype), "settings": view}
    key = store_key(settings, [it.id for it in items], r.shard_size, r.store_dtype)
    default = Path(r.outputs) / "stores" / slug(benchmark.card.name) / f"{slug(encoder.name)}-{key[:12]}"
    path = Path(r.out or default)
    if path.exists() and not path.is_dir():
        raise VrlabError(f"extract.out={path} is an existing file; name a folder for the store")
    store = extract(
        encoder,
        items,
        path,
        settings,
        batch_size=r.batch_size,
        shard_size=r.shard_size,
        num_workers=r.num_workers,
        device=device,
        dtype=r.dtype,
        store_dtype=r.store_dtype,
        on_bad_image=r.on_bad_image,
        max_pixels=r.max_pixels,
        adapter=adapter,
        rank=rank,
        world=world,
        layer_views=views,
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
