"""`vrlab task=extract`: one encoder over one benchmark into an EmbeddingStore (one slice per rank under
torchrun or accelerate launch)."""

from __future__ import annotations

from typing import Any

from vrlab.extract import run_extraction
from vrlab.runtime import process_group, seed_everything
from vrlab.tasks.config import extraction_request


def extract_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=extract`; under torchrun/accelerate each rank extracts its slice of shards."""
    seed_everything(cfg.seed)
    with process_group() as (rank, _):
        request = extraction_request(
            cfg,
            cfg.encoder,
            cfg.benchmark,
            adapter=cfg.extract.adapter,
            limit=cfg.extract.limit,
            encoder_weights=cfg.get("encoder_weights"),
        )
        store = run_extraction(request, distributed=True)
    if store is None:
        return {"rank": rank}
    return {
        "path": str(store.path),
        "items": len(store),
        "skipped": store.skipped,
        "shapes": store.manifest["shapes"],
    }
