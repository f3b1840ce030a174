"""vrlab: which vision representation should a multimodal LLM use, and why.

The Python API (imported lazily, so `import vrlab` is cheap):

    encoder = vrlab.load_encoder("clip224.dinov2-l")            # a VisionEncoder (composite here)
    store = vrlab.extract_store("clip224", "spair")             # an EmbeddingStore (reused when complete)
    store, settings = vrlab.correspondence_store("clip224", "spair", protocol="law")
    c = vrlab.correspondence(store, pairs, settings)["C"]      # the C score
    a = vrlab.alignment(candidate_store, {"clip224": reference_store})["A"]
    fit = vrlab.fit_law(table)                                  # the AC law on a DataFrame
    probe = vrlab.LinearProbe(multilabel=False).fit(x, y)
    model = vrlab.load_retrieval_model("hf:openai/clip-vit-base-patch32")   # or an LLM2CLIPModel folder
    recall = vrlab.evaluate_retrieval(model, vrlab.load_benchmark("flickr30k-test", "data"))
    vrlab.import_checkpoint("llava-v1.5-7b", "imports/llava-v1.5-7b")   # a published LLaVA as a vrlab model

`vrlab task=...` (the Hydra app) runs the same functions from config.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_encoder": "vrlab.encoders.factory",
    "load_benchmark": "vrlab.data.benchmarks",
    "Registry": "vrlab.registry",
    "ExtractionRequest": "vrlab.extract",
    "run_extraction": "vrlab.extract",
    "extract_store": "vrlab.api",
    "correspondence_store": "vrlab.api",
    "EmbeddingStore": "vrlab.store",
    "correspondence": "vrlab.scores.correspondence",
    "protocol_settings": "vrlab.scores.correspondence",
    "alignment": "vrlab.scores.alignment",
    "fit_law": "vrlab.scores.law",
    "read_table": "vrlab.scores.law",
    "collect_table": "vrlab.scores.law",
    "simulate_policy": "vrlab.scores.policy",
    "recommend": "vrlab.scores.policy",
    "VisionLanguageModel": "vrlab.mllm.model",
    "import_checkpoint": "vrlab.published",
    "ImportOptions": "vrlab.published",
    "LinearProbe": "vrlab.probes.linear",
    "LLMTextEncoder": "vrlab.llm2clip.text",
    "LLM2CLIPModel": "vrlab.llm2clip.model",
    "load_retrieval_model": "vrlab.retrieval",
    "evaluate_retrieval": "vrlab.retrieval",
    "recall_at_k": "vrlab.retrieval",
    "VrlabError": "vrlab.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vrlab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
