"""The results of `make science`: the per-encoder table, the verdict per benchmark, printed and written as
`<science.root>/science.json`, `<science.root>/science.md` (and `science.docs`, the repository's page) and a
plot of leave-one-out predictions against the measured scores. Every number is read from the run's own
law tables and judged by `vrlab.scores.verdict`; nothing here is typed by hand."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from vrlab.report import markdown_table
from vrlab.runtime import atomic_write_bytes, atomic_write_json, to_plain
from vrlab.scores.law import a_column

log = logging.getLogger(__name__)


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def encoder_frame(
    tables: Mapping[int, pd.DataFrame],
    rungs: Sequence[tuple[str, str, int]],
    benchmarks: Sequence[str],
    seed: int,
) -> pd.DataFrame:
    """One row per encoder: kind, budget, C, A (mean over benchmarks) and each score at the default seed,
    with the scores' mean and standard deviation over seeds."""
    base = tables[seed].set_index("representation")
    rows = []
    for name, kind, steps in rungs:
        row: dict[str, Any] = {"encoder": name, "kind": kind, "steps": steps}
        if name not in base.index:
            rows.append(row)
            continue
        row["C"] = float(base.loc[name, "C"])
        row["A (mean)"] = float(np.mean([base.loc[name, a_column(tables[seed], b)] for b in benchmarks]))
        for b in benchmarks:
            over = [
                float(t.set_index("representation").loc[name, b])
                for t in tables.values()
                if name in set(t["representation"])
            ]
            row[b] = float(base.loc[name, b])
            row[f"{b} over seeds"] = f"{np.mean(over):.2f} ± {np.std(over):.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def verdict_frame(verdict: Mapping[str, Any]) -> pd.DataFrame:
    rows = []
    for b, v in verdict["benchmarks"].items():
        if "fit" not in v:
            rows.append({"benchmark": b, "span": f"{100 * v['span']:.0f} pts", "judged": "no (no fit)"})
            continue
        d, sp = v["default_seed"], v["spread"]
        rows.append(
            {
                "benchmark": b,
                "span": f"{100 * v['span']:.0f} pts",
                "judged": "yes" if v["judged"] else "no",
                "R² AC": d["AC"]["r2"],
                "LOO R² AC": d["AC"]["loo_r2"],
                "LOO R² A": d["A"]["loo_r2"],
                "LOO R² C": d["C"]["loo_r2"],
                "LOO ρ AC": d["AC"]["loo_spearman"],
                "LOO ρ A": d["A"]["loo_spearman"],
                "LOO ρ C": d["C"]["loo_spearman"],
                "seeds LOO R² AC": f"[{_f(sp['seeds']['AC']['loo_r2']['min'])}, {_f(sp['seeds']['AC']['loo_r2']['max'])}]",
                "seeds LOO ρ AC": f"[{_f(sp['seeds']['AC']['loo_spearman']['min'])}, {_f(sp['seeds']['AC']['loo_spearman']['max'])}]",
                "drop-one LOO R² AC": f"[{_f(sp['drop_one']['AC']['loo_r2']['min'])}, {_f(sp['drop_one']['AC']['loo_r2']['max'])}]",
                "drop-one LOO ρ AC": f"[{_f(sp['drop_one']['AC']['loo_spearman']['min'])}, {_f(sp['drop_one']['AC']['loo_spearman']['max'])}]",
                "most influential (LOO R² without)": (
                    f"{v['most_influential']['encoder']} ({_f(v['most_influential']['loo_r2_without'])})"
                    if v.get("most_influential")
                    else ""
                ),
                "targets": "—"
                if v["targets_met"] is None
                else ("met" if all(v["targets_met"].values()) else "missed"),
            }
        )
    return pd.DataFrame(rows)


def _print(frame: pd.DataFrame, title: str) -> None:
    view = Table(title=title)
    for col in frame.columns:
        view.add_column(str(col), overflow="fold")
    for row in frame.itertuples(index=False):
        view.add_row(*[_f(v, 3) if isinstance(v, float) else str(v) for v in row])
    Console(width=220).print(view)


def plot_loo(verdict: Mapping[str, Any], path: Path) -> Path:
    """Leave-one-out predictions of the AC law against the measured scores (normalised), one panel per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = {b: v["fit"] for b, v in verdict["benchmarks"].items() if "fit" in v}
    bs = list(fits) or ["(no fit)"]
    fig, axes = plt.subplots(1, len(bs), figsize=(3.2 * len(bs), 3.2), squeeze=False)
    for ax, b in zip(axes[0], bs, strict=True):
        if b not in fits:
            continue
        f = fits[b]
        ax.scatter(f["measured"], f["loo_predicted"], s=16)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_title(f"{b}\nLOO R² {f['loo_r2']['AC']:.2f}", fontsize=9)
        ax.set_xlabel("measured (normalised)")
    axes[0][0].set_ylabel("AC law, left out")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _markdown(
    cfg: Any,
    verdict: Mapping[str, Any],
    encoders: pd.DataFrame,
    policy: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> str:
    s = cfg.science
    lines = [
        "# The AC law on vrlab's own models",
        "",
        f"Written by `{s.command}`; rerunning it rewrites this page. Recipe, seeds and targets are declared in "
        f"`conf/experiment/{s.experiment}.yaml` before any fit.",
        "",
        "## The study",
        "",
        f"- **Encoders**: {len(encoders)} ViTs ({s_pretrain(cfg)}) pre-trained by `task=pretrain_encoder`, kinds x "
        f"budgets `{json.dumps(to_plain(s.encoders))}`, each a card.",
        f"- **MLLMs**: for each encoder and each seed of {meta['seeds']}: stage 1 on `synth-captions` "
        f"({_budget(cfg, 1)}), stage 2 on `synth-qa` ({_budget(cfg, 2)}), the same budget for every encoder, on "
        f"one shared tiny Llama (hidden {s.llm_hidden}) pretrained on the generated text ({s.llm_steps} steps)"
        + (
            f", then taught to read a visual prefix by a reader: stage 1 and {s.reader.stage2_epochs} stage-2 "
            f"epochs with a {s.reader.kind}-{s.reader.steps} encoder of seed {s.reader.seed}, no candidate."
            if s.reader is not None
            else "; every candidate starts from that text-only LLM (no reader)."
        ),
        f"- **Scores**: lmms-eval accuracy on {', '.join(f'`{b}`' for b in meta['benchmarks'])} (multiple choice, "
        "log-likelihood, 64 px scenes no model saw in training).",
        f"- **C**: `task=correspondence` on `synth-spair-semantic` (different instances of one category). **A**: "
        f"`task=alignment` against {', '.join(f'`{r}`' for r in meta['references'])}, each through its own "
        "stage-1 adapter, on each benchmark's images.",
        f"- **The law**: degree 2, min-max normalised, leave-one-out over the encoders; judged on benchmarks "
        f"whose accuracies span at least {100 * verdict['min_span']:.0f} points; targets: LOO Spearman ≥ "
        f"{verdict['targets']['loo_spearman']}, LOO R² ≥ {verdict['targets']['loo_r2']} at the default seed "
        "and at every seed.",
        f"- Seeds vary the MLLM (adapter init, data order, stage 1 and 2, A); the encoders, the LLM and C are "
        f"fixed at the default seed {meta['default_seed']}. With {s.workers} worker(s) of one torch thread, "
        + (
            f"the whole study took {meta['full_minutes']:.1f} min from an empty `science.root`"
            if meta.get("full_minutes")
            else "no run here started from an empty `science.root`"
        )
        + f"; this run took {meta['minutes']:.1f} min (a rerun skips the steps a previous run finished).",
        f"- The shared LLM's text pretraining loss: {_f(meta['llm_losses'][0])} -> {_f(meta['llm_losses'][-1])}."
        if meta.get("llm_losses")
        else "",
        "",
        "## Per encoder (default seed)",
        "",
        markdown_table(encoders),
        "## The law, per benchmark",
        "",
        "ρ: Spearman of the leave-one-out predictions with the scores. Seed and drop-one columns: [min, max] over "
        "the seeds, and over the fits that leave one encoder out of the table.",
        "",
        markdown_table(verdict_frame(verdict)),
        f"![leave-one-out predictions]({meta['plot']})",
        "",
        "## Verdict",
        "",
        *[f"- {v['verdict']}" for v in verdict["benchmarks"].values()],
        "",
        summary_sentence(verdict),
        "",
        policy_sentence(policy),
        "",
    ]
    return "\n".join(lines)


def _budget(cfg: Any, stage: int) -> str:
    a = cfg.train[f"stage{stage}"]
    return f"{a.num_train_epochs} epoch(s), batch {a.per_device_train_batch_size}, lr {a.learning_rate:g}"


def policy_sentence(policy: Mapping[str, Any] | None) -> str:
    if not policy:
        return "No policy simulation: no benchmark is judged."
    return (
        f"Policy simulation at the default seed on the judged benchmarks (Recall@{policy['k']} within "
        f"{policy['budget']} trainings, mean over {len(policy['over'])}): AC policy {100 * policy['AC']:.0f}%, "
        f"random order {100 * policy['random']:.0f}%."
    )


def s_pretrain(cfg: Any) -> str:
    p = cfg.pretrain
    return f"{p.width} wide, {p.depth} layers, patch {p.patch_size}, {p.image_size} px"


def summary_sentence(verdict: Mapping[str, Any]) -> str:
    judged = verdict["judged"]
    if not judged:
        return (
            "**No benchmark is judged** (each line above says why), so this run can neither support nor refute "
            "the law."
        )
    met = [b for b in judged if all(verdict["benchmarks"][b]["targets_met"].values())]
    beats = [b for b in judged if verdict["law_beats_a_only"][b]]
    return (
        f"**{len(met)} of {len(judged)} judged benchmarks meet the targets** ({', '.join(met) or 'none'}); the AC "
        f"law beats the A-only fit out of sample on {len(beats)} of them ({', '.join(beats) or 'none'})."
    )


def write_report(
    cfg: Any,
    rungs: Sequence[tuple[str, str, int]],
    tables: Mapping[int, pd.DataFrame],
    verdict: Mapping[str, Any],
    policy: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Print the per-encoder table and the verdict; write science.json, science.md, the plot and the docs page."""
    s = cfg.science
    root = Path(s.root)
    seed = int(cfg.seed)
    benchmarks = [str(b) for b in to_plain(s.benchmarks)]
    encoders = encoder_frame(tables, rungs, benchmarks, seed)
    plot = f"{Path(s.docs).stem if s.docs else 'science'}_loo.png"  # beside the page it belongs to
    meta = {**meta, "seeds": sorted(tables), "default_seed": seed, "benchmarks": benchmarks, "plot": plot}
    if not meta.get("fresh"):  # the cost of the whole study is that of the run that started from nothing
        previous = root / "science.json"
        meta["full_minutes"] = (
            json.loads(previous.read_text()).get("full_minutes") if previous.is_file() else None
        )
    else:
        meta["full_minutes"] = meta["minutes"]
    _print(encoders, "per encoder (default seed)")
    _print(verdict_frame(verdict), "the AC law, leave-one-out")
    for v in verdict["benchmarks"].values():
        print(v["verdict"])
    print(summary_sentence(verdict))
    record = {"verdict": verdict, "encoders": encoders.to_dict("records"), "policy": policy, **meta}
    atomic_write_json(root / "science.json", record)
    page = _markdown(cfg, verdict, encoders, policy, meta)
    atomic_write_bytes(root / "science.md", page.encode())
    plot_loo(verdict, root / meta["plot"])
    if s.docs:
        docs = Path(s.docs)
        atomic_write_bytes(docs, page.encode())
        plot_loo(verdict, docs.with_name(meta["plot"]))
        log.info("results page -> %s", docs)
    log.info("science: %s", root / "science.json")
    return record
