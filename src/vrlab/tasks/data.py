"""`vrlab task=make_benchmark`: write the generated benchmark, in the real datasets' layouts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.data.synthetic import make_benchmark
from vrlab.runtime import to_plain

log = logging.getLogger(__name__)


def make_benchmark_task(cfg: Any) -> dict[str, int]:
    """`vrlab task=make_benchmark`: write the generated benchmark under `<paths.data>/synthetic`."""
    root = Path(cfg.make_benchmark.root or Path(cfg.paths.data) / "synthetic")
    counts = make_benchmark(
        root,
        seed=cfg.seed,
        sizes=to_plain(cfg.make_benchmark.sizes),
        image_size=tuple(to_plain(cfg.make_benchmark.get("image_size") or (96, 128))),
        overwrite=cfg.make_benchmark.overwrite,
    )
    log.info("generated benchmark at %s: %s images", root, counts)
    return counts
