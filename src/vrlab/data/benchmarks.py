"""Benchmark cards -> loaders: find the card, resolve its root against the data folder, build the loader.

A card's `root` is relative to `paths.data` (`VRLAB_DATA`, default `data/`) unless absolute;
`benchmark_args` override any loader argument (for example `split` or `max_pairs`). `lmms:<task>` names an
lmms-eval task's images (`vrlab.eval.docs`), with `limit`, `order` and `include` as loader arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vrlab.data.loaders import Loader
from vrlab.errors import VrlabError
from vrlab.instantiate import instantiate_card
from vrlab.registry import BenchmarkCard, Registry


def load_benchmark(
    name: str,
    data_root: str | Path,
    registry_cfg: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Loader:
    """The loader of benchmark `name`, with its card attached as `.card`."""
    registry = Registry.from_config(registry_cfg, kind="benchmark")
    if name.startswith("lmms:"):  # an lmms-eval task's images: a card made in memory
        from vrlab.eval.docs import lmms_card_spec

        card = BenchmarkCard(name, lmms_card_spec(name, data_root), family="lmms", meta={"task": "images"})
    else:
        card = registry.get(name)
    spec = {**card.spec, **dict(overrides or {})}
    if "root" not in spec:
        raise VrlabError(f"benchmark card {card.path} needs a 'root'")
    root = Path(spec["root"]).expanduser()
    root = root if root.is_absolute() else Path(data_root) / root
    card = card.with_overrides({**dict(overrides or {}), "root": str(root)})
    loader = instantiate_card(card, "benchmark", registry.trusted)
    loader.card = card
    loader.check_ids()
    if len(loader) == 0:
        raise VrlabError(f"benchmark '{card.name}' at {root} has no images")
    return loader
