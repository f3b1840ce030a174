"""`vrlab task=eval checkpoint=<dir> eval.tasks=[...]`: lmms-eval tasks on a trained model, into a resumable
run folder under `<outputs>/eval/`, with a table of the primary metrics at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vrlab.checkpoint import VLM_CONFIG, folder_digest
from vrlab.mllm.tower import representation as representation_name
from vrlab.runtime import run_dir, to_plain
from vrlab.tasks.config import model_checkpoint

log = logging.getLogger(__name__)


def print_table(summary: dict[str, Any], title: str) -> None:
    view = Table(title=title)
    for col in ("task", "metric", "score", "samples", "samples/s"):
        view.add_column(col)
    for record in summary["tasks"].values():
        for name, r in record["results"].items():
            score = r.get("score")
            view.add_row(
                name,
                str(r.get("primary")),
                f"{score:.4f}" if isinstance(score, int | float) else str(score),
                str(r.get("n_samples")),
                f"{record.get('samples_per_second') or 0:.1f}",
            )
    Console(width=140).print(view)


def eval_task(cfg: Any) -> dict[str, Any]:
    """Evaluate `checkpoint` (a folder written by stage 2) on `eval.tasks`."""
    from vrlab.eval.run import evaluate

    checkpoint = model_checkpoint(cfg, "eval")
    ecfg = cfg.eval
    tasks = [str(t) for t in to_plain(ecfg.tasks) or []]
    config = json.loads((checkpoint / VLM_CONFIG).read_text())
    tuned = config.get("tuned_encoder")
    representation = representation_name(ecfg.label, config["encoder"]["name"], tuned)
    digest = folder_digest(checkpoint)
    gen_kwargs = ecfg.gen_kwargs or None
    out = Path(
        ecfg.out
        or run_dir(
            cfg.paths.outputs,
            "eval",
            representation,
            {"checkpoint": digest, "limit": ecfg.limit, "gen_kwargs": gen_kwargs},
        )
    )
    header = {
        "representation": representation,
        "encoder": config["encoder"]["name"],
        "tuned_tower": tuned,
        "checkpoint": str(checkpoint),
        "checkpoint_digest": digest,
        "batch_size": ecfg.batch_size,
    }

    def model() -> Any:
        from vrlab.eval.model import VrlabLMM

        return VrlabLMM(
            pretrained=str(checkpoint),
            batch_size=ecfg.batch_size,
            device=cfg.device,
            max_new_tokens=ecfg.max_new_tokens,
        )

    summary = evaluate(
        model,
        tasks,
        out,
        include=to_plain(ecfg.include) or [],
        limit=ecfg.limit,
        gen_kwargs=gen_kwargs,
        header=header,
        data=cfg.paths.data,
    )
    if "rank" in summary:  # a rank other than 0 of a torchrun evaluation: rank 0 reports
        return summary
    print_table(summary, f"{representation}: {out}")
    log.info("eval results -> %s", out / "eval.json")
    return {"output": str(out / "eval.json"), **summary}
