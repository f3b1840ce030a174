"""`vrlab task=report experiment=<name>`: the experiment's self-contained HTML page
(`<paths.outputs>/reports/<name>/index.html`), gathering every result under `paths.outputs`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.registry import Registry
from vrlab.reports.page import build_report
from vrlab.runtime import atomic_write_bytes

log = logging.getLogger(__name__)


def _experiment() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("experiment") or None


def report_task(cfg: Any) -> dict[str, Any]:
    name = str(cfg.report.name or _experiment() or "default")
    out = Path(cfg.report.out or Path(cfg.paths.outputs) / "reports" / name / "index.html")
    html = build_report(
        cfg.paths.outputs,
        name,
        Registry.from_config(cfg.registry),
        command=" ".join(
            [
                "vrlab task=report",
                *([f"experiment={_experiment()}"] if _experiment() else []),
                f"report.name={name}",
                f"paths.outputs={cfg.paths.outputs}",
            ]
        ),
    )
    atomic_write_bytes(out, html.encode())
    print(f"report: {out.resolve()}")
    return {"report": str(out), "bytes": len(html)}
