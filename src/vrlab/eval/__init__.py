"""Evaluation with lmms-eval: the `vrlab` model class, the run folder logic and the local tasks.

`manifests()` is the `lmms_eval.models` entry point, so `python -m lmms_eval --model vrlab
--model_args pretrained=<dir>` finds the class once vrlab is installed. Nothing here imports
`lmms_eval.evaluator` at import time (it takes 10-16 s); `vrlab.eval.run` imports it when a run starts.
"""

from __future__ import annotations

from typing import Any


def manifests() -> list[Any]:
    """lmms-eval's model manifests for vrlab checkpoints (read by `lmms_eval.models` at import)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vrlab", simple_class_path="vrlab.eval.model.VrlabLMM")]
