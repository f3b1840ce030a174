"""`vrlab task=demo`: build tiny random encoders of every family, save them with each library's own save
call under `demo/models/` (plus a full-size random ViT-S for `make perf`), write cards pointing at them to
`demo/encoders/`, and render a few scenes to `demo/images/`. The Makefile's `demo` target then runs
`task=features` on every family and two composites, generates the benchmark and extracts every demo encoder
on it, loading the models back through the registry exactly as real checkpoints load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.data.synthetic import write_demo_images
from vrlab.runtime import to_plain
from vrlab.tiny import BUILDERS, PERF_BUILDERS, build_tiny

log = logging.getLogger(__name__)


def demo_task(cfg: Any) -> dict[str, Any]:
    """Write the demo's tiny models, cards and images."""
    root = Path(cfg.demo.root)
    families = (
        [*BUILDERS, *PERF_BUILDERS]
        if cfg.demo.families in ("all", None)
        else list(to_plain(cfg.demo.families))
    )
    cards = []
    for family in families:
        # Always rebuilt (a few seconds in all), so cards never go stale when the builders change.
        card = build_tiny(family, root / "models", root / "encoders", seed=cfg.seed)
        log.info("built tiny %s -> %s", family, card)
        cards.append(str(card))
    images = write_demo_images(root / "images", count=cfg.demo.images, seed=cfg.seed)
    log.info("wrote %d demo images to %s", len(images), root / "images")
    return {"cards": cards, "images": [str(p) for p in images]}
