"""`vrlab task=demo`: build tiny random encoders of every family, save them with each library's own save
call under `demo/models/`, write cards pointing at them to `demo/encoders/`, and render a few scenes to
`demo/images/`. The Makefile's `demo` target then runs `task=features` on every family and one composite,
loading the models back through the registry exactly as real checkpoints load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.data.synthetic import write_demo_images
from vrlab.runtime import to_plain
from vrlab.tiny import BUILDERS, build_tiny

log = logging.getLogger(__name__)


def demo_task(cfg: Any) -> dict[str, Any]:
    """Write the demo's tiny models, cards and images (skipping models already built)."""
    root = Path(cfg.demo.root)
    families = list(BUILDERS) if cfg.demo.families in ("all", None) else list(to_plain(cfg.demo.families))
    cards = []
    for family in families:
        card = root / "encoders" / f"{family}.yaml"
        if card.exists() and (root / "models" / family).exists():
            log.info("tiny %s already built: %s", family, card)
        else:
            card = build_tiny(family, root / "models", root / "encoders", seed=cfg.seed)
            log.info("built tiny %s -> %s", family, card)
        cards.append(str(card))
    images = write_demo_images(root / "images", count=cfg.demo.images, seed=cfg.seed)
    log.info("wrote %d demo images to %s", len(images), root / "images")
    return {"cards": cards, "images": [str(p) for p in images]}
