"""`vrlab task=encoders` and `task=benchmarks`: the tables of registered cards (with `encoders.build=true`,
each encoder is built and its measured dim and grid reported)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from vrlab.encoders.factory import build_encoder
from vrlab.registry import Registry


def encoders_task(cfg: Any) -> list[dict[str, Any]]:
    """Print registered encoders matching `encoders.filter`; with `encoders.build=true`, measure dim and grid."""
    registry = Registry.from_config(cfg.registry)
    cards = registry.list(cfg.encoders.filter)
    rows = []
    for card in cards:
        dim, grid, note = card.dim, card.grid, ""
        if cfg.encoders.build:
            try:
                encoder = build_encoder(registry, card.name)
                dim, grid, note = encoder.dim, tuple(encoder.grid), "measured"
            except Exception as exc:  # a missing checkpoint should not hide the other rows
                note = f"not built: {str(exc).splitlines()[0][:80]}"
        rows.append(
            {
                "name": card.name,
                "aliases": list(card.aliases),
                "family": card.family,
                "dim": dim,
                "grid": list(grid) if grid else None,
                "source": card.source,
                "note": note,
            }
        )
    table = Table(title=f"vrlab encoders matching '{cfg.encoders.filter}' ({len(rows)} of {len(registry)})")
    for col in ("name", "aliases", "family", "dim", "grid", "source") + (
        ("note",) if cfg.encoders.build else ()
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        grid = f"{r['grid'][0]}x{r['grid'][1]}" if r["grid"] else "?"
        cells = [r["name"], ", ".join(r["aliases"]), r["family"], str(r["dim"] or "?"), grid, r["source"]]
        table.add_row(*cells, *([r["note"]] if cfg.encoders.build else []))
    Console(width=200).print(table)
    return rows


def benchmarks_task(cfg: Any) -> list[dict[str, Any]]:
    """Print registered benchmark cards (name, task, metric, loader, root)."""
    registry = Registry.from_config(cfg.registry, kind="benchmark")
    rows = [
        {
            "name": c.name,
            "aliases": list(c.aliases),
            "task": c.task,
            "metric": c.metric,
            "loader": str(c.spec["_target_"]).rsplit(".", 1)[-1],
            "root": str(c.spec.get("root", "")),
        }
        for c in registry.list(cfg.encoders.filter)
    ]
    table = Table(title=f"vrlab benchmarks (roots relative to {cfg.paths.data})")
    for col in ("name", "task", "metric", "loader", "root"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["task"], r["metric"], r["loader"], r["root"])
    Console(width=200).print(table)
    return rows
