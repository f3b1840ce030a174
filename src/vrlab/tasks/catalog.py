"""`vrlab task=encoders` and `task=benchmarks`: the tables of registered cards (with `encoders.build=true`,
each encoder is built and its measured dim, grid and parameter count reported; `encoders.format=markdown`
prints the README's table of built-in encoders)."""

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
        dim, grid, params, note = card.dim, card.grid, None, ""
        if cfg.encoders.build:
            try:
                encoder = build_encoder(registry, card.name)
                dim, grid, note = encoder.dim, tuple(encoder.grid), "measured"
                params = sum(p.numel() for p in encoder.parameters())
            except Exception as exc:  # a missing checkpoint should not hide the other rows
                note = f"not built: {str(exc).splitlines()[0][:80]}"
        rows.append(
            {
                "name": card.name,
                "aliases": list(card.aliases),
                "family": card.family,
                "dim": dim,
                "grid": list(grid) if grid else None,
                "tokens": grid[0] * grid[1] if grid else None,
                "params": params,
                "source": card.source,
                "note": note,
            }
        )
    if cfg.encoders.get("format", "table") == "markdown":
        print(encoders_markdown(rows))
        return rows
    table = Table(title=f"vrlab encoders matching '{cfg.encoders.filter}' ({len(rows)} of {len(registry)})")
    build_cols = ("params", "note") if cfg.encoders.build else ()
    for col in ("name", "aliases", "family", "dim", "grid", "tokens", "source", *build_cols):
        table.add_column(col, overflow="fold")
    for r in rows:
        grid = f"{r['grid'][0]}x{r['grid'][1]}" if r["grid"] else "?"
        cells = [r["name"], ", ".join(r["aliases"]), r["family"], str(r["dim"] or "?"), grid]
        cells += [str(r["tokens"] or "?"), r["source"]]
        if cfg.encoders.build:
            cells += [f"{r['params'] / 1e6:.1f}M" if r["params"] else "?", r["note"]]
        table.add_row(*cells)
    Console(width=200).print(table)
    return rows


def encoders_markdown(rows: list[dict[str, Any]]) -> str:
    """The README's table of encoders, one row per card, ordered by family then name."""
    lines = ["| Card | Aliases | Family | Source | Dim | Grid | Tokens |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"].lower())):
        grid = f"{r['grid'][0]}x{r['grid'][1]}" if r["grid"] else "?"
        lines.append(
            f"| `{r['name']}` | {', '.join(r['aliases'])} | {r['family']} | `{r['source']}` | "
            f"{r['dim'] or '?'} | {grid} | {r['tokens'] or '?'} |"
        )
    return "\n".join(lines)


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
