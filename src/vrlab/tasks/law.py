"""`vrlab task=law_table | law_fit | law_policy | law_recommend`: gather A, C and scores into one table, fit
the AC law, simulate the AC policy and rank untrained candidates."""

from __future__ import annotations

import logging
from glob import glob
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from vrlab.errors import VrlabError
from vrlab.report import law_markdown, plot_fit, plot_policy
from vrlab.runtime import atomic_write_bytes, atomic_write_json, run_dir, to_plain
from vrlab.scores.alignment import ALIGNMENT_PROTOCOLS
from vrlab.scores.law import a_column, benchmarks_of, collect_table, fit_law, read_table
from vrlab.scores.policy import recall_within_budget, recommend, simulate_policy

log = logging.getLogger(__name__)


def law_table_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_table`: gather A, C and eval results (globs) and an optional scores CSV into one table."""
    lcfg = cfg.law
    a_files = sorted(Path(p) for g in lcfg.alignment for p in glob(g, recursive=True))
    c_files = sorted(Path(p) for g in lcfg.correspondence for p in glob(g, recursive=True))
    e_files = sorted(Path(p) for g in lcfg.eval for p in glob(g, recursive=True))
    scores = pd.read_csv(lcfg.scores) if lcfg.scores else None
    if lcfg.duplicates not in ("error", "newest"):
        raise VrlabError(f"law.duplicates={lcfg.duplicates!r} must be 'error' or 'newest'")
    if lcfg.get("alignment_protocol") not in (None, *ALIGNMENT_PROTOCOLS):
        raise VrlabError(
            f"law.alignment_protocol={lcfg.alignment_protocol!r} must be one of {list(ALIGNMENT_PROTOCOLS)} or null"
        )
    table = collect_table(
        a_files,
        c_files,
        scores,
        lcfg.protocol,
        e_files,
        to_plain(lcfg.score_metrics),
        lcfg.duplicates,
        lcfg.get("alignment_protocol"),
    )
    out = Path(lcfg.out or Path(cfg.paths.outputs) / "law" / "table.csv")
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    log.info("law table with %d representations and columns %s -> %s", len(table), list(table.columns), out)
    return {"table": str(out), "rows": len(table), "columns": list(table.columns)}


def _out_dir(cfg: Any, name: str) -> Path:
    return run_dir(cfg.paths.outputs, "law", name, {"table": str(cfg.law.table), "law": str(cfg.law)})


def law_fit_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_fit law.table=<csv>`: fit, write law_fit.json, law_fit.md and plots."""
    table = read_table(cfg.law.table)
    result = fit_law(
        table, to_plain(cfg.law.benchmarks), to_plain(cfg.law.summary_benchmarks), cfg.law.degree
    )
    out = _out_dir(cfg, "fit")
    atomic_write_json(out / "law_fit.json", result)
    atomic_write_bytes(out / "law_fit.md", law_markdown(result).encode())
    plots = plot_fit(result, table, out)
    print(law_markdown(result))
    log.info("law fit -> %s (plots: %s)", out / "law_fit.json", ", ".join(p.name for p in plots))
    return {"output": str(out / "law_fit.json"), **result}


def law_policy_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_policy law.table=<csv>`: simulate the AC policy against random order per benchmark, and
    its Recall@k within a budget of `law.budget` trainings (the paper's published metric), exactly."""
    table = read_table(cfg.law.table)
    results = {}
    for b in to_plain(cfg.law.benchmarks) or benchmarks_of(table):
        rows = table.dropna(subset=[b])
        a, c, y = (rows[col].to_numpy(float) for col in (a_column(table, b), "C", b))
        r = simulate_policy(a, c, y, k=cfg.law.top_k, trials=cfg.law.trials, seed=cfg.seed)
        r["recall_within_budget"] = recall_within_budget(a, c, y, k=cfg.law.top_k, budget=cfg.law.budget)
        results[b] = r
        log.info(
            "%s: trainings to find the best in the top %d: AC policy mean %.2f (median %.1f), random %.2f; "
            "Recall@%d within %d trainings %.1f%% (random %.1f%%)",
            b,
            r["k"],
            r["mean_AC"],
            r["median_AC"],
            r["mean_random"],
            r["k"],
            cfg.law.budget,
            100 * r["recall_within_budget"]["AC"],
            100 * r["recall_within_budget"]["random"],
        )
    summary = {
        "k": cfg.law.top_k,
        "budget": cfg.law.budget,
        "over": list(results),
        "AC": float(sum(r["recall_within_budget"]["AC"] for r in results.values()) / len(results)),
        "random": float(sum(r["recall_within_budget"]["random"] for r in results.values()) / len(results)),
    }
    log.info(
        "Recall@%d within %d trainings, mean over %d benchmarks: AC policy %.2f%%, random %.2f%%",
        summary["k"],
        summary["budget"],
        len(results),
        100 * summary["AC"],
        100 * summary["random"],
    )
    out = _out_dir(cfg, "policy")
    atomic_write_json(out / "law_policy.json", {"benchmarks": results, "recall_within_budget": summary})
    plot_policy(results, out / "recall_at_k.png")
    return {"output": str(out / "law_policy.json"), "results": results, "recall_within_budget": summary}


def law_recommend_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=law_recommend law.table=<csv>`: which untrained candidate to train next, per benchmark."""
    table = read_table(cfg.law.table)
    out = {}
    for b in to_plain(cfg.law.benchmarks) or benchmarks_of(table):
        if table[b].notna().all():
            continue
        ranked = recommend(table, b, cfg.law.bootstrap, cfg.seed)
        out[b] = ranked.to_dict("records")
        view = Table(title=f"{b}: train next (predicted {b}, 90% bootstrap interval)")
        for col in ("rank", "representation", "predicted", "interval", "A", "C"):
            view.add_column(col)
        for i, r in ranked.iterrows():
            view.add_row(
                str(i + 1),
                r["representation"],
                f"{r['predicted']:.2f}",
                f"[{r['low']:.2f}, {r['high']:.2f}]",
                f"{r['A']:.4f}",
                f"{r['C']:.2f}",
            )
        Console(width=160).print(view)
    if not out:
        raise VrlabError(f"every candidate in {cfg.law.table} has every score; nothing to recommend")
    return out
