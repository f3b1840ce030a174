"""`vrlab task=import checkpoint=<published checkpoint>`: a LLaVA, TG-LLaVA or Hugging Face Llava checkpoint
written once as a vrlab checkpoint (other tasks do this on demand; this task names the folder and reports)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vrlab.errors import VrlabError
from vrlab.published import IMPORT_RECORD, detect_format, import_checkpoint, import_path
from vrlab.tasks.config import import_options

log = logging.getLogger(__name__)


def import_task(cfg: Any) -> dict[str, Any]:
    if not cfg.checkpoint:
        raise VrlabError("task=import needs checkpoint=<a LLaVA, TG-LLaVA or Hugging Face Llava checkpoint>")
    options = import_options(cfg)
    out = Path(cfg["import"].out or import_path(cfg.checkpoint, Path(cfg.paths.outputs) / "imports", options))
    if (out / IMPORT_RECORD).is_file():
        log.info("already imported: %s", out)
    else:
        fmt = detect_format(cfg.checkpoint) if options.format == "auto" else options.format
        log.info("importing %s (%s) ...", cfg.checkpoint, fmt)
        import_checkpoint(cfg.checkpoint, out, options)
    record = json.loads((out / IMPORT_RECORD).read_text())
    kind = "model" if (out / "vlm_config.json").is_file() else "stage-1 adapter"
    log.info(
        "%s %s -> %s (a vrlab %s; tower %s)", record["format"], cfg.checkpoint, out, kind, record["tower"]
    )
    return {"output": str(out), "format": record["format"], "kind": kind}
