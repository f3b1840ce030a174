"""`vrlab task=export_hf checkpoint=<dir> export.out=<dir>`: a stage-2 model as a Hugging Face LLaVA folder."""

from __future__ import annotations

import logging
from typing import Any

from vrlab.errors import VrlabError
from vrlab.export_hf import export_llava
from vrlab.tasks.config import model_checkpoint

log = logging.getLogger(__name__)


def export_hf_task(cfg: Any) -> dict[str, Any]:
    if not cfg.export.out:
        raise VrlabError("task=export_hf needs export.out=<folder for the LLaVA model>")
    out = export_llava(model_checkpoint(cfg, "export_hf"), cfg.export.out)
    log.info("LlavaForConditionalGeneration folder -> %s", out)
    return {"output": str(out)}
