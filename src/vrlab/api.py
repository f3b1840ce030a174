"""The Python API: what a notebook needs to extract, score and fit without Hydra.

Each function takes explicit arguments and calls the same library code the `vrlab task=...` jobs call, so a
number from a notebook equals the number from the command line with the same settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vrlab.extract import ExtractionRequest, run_extraction
from vrlab.store import EmbeddingStore


def extract_store(encoder: str, benchmark: str, **options: Any) -> EmbeddingStore:
    """Extract (or reuse) the store of `encoder` on `benchmark`; `options` are `ExtractionRequest` fields
    (`registry`, `data_root`, `outputs`, `adapter`, `limit`, `encoder_args`, `compose`, `batch_size`, ...)."""
    unknown = sorted(set(options) - set(ExtractionRequest.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown extraction option(s) {unknown}; see vrlab.ExtractionRequest")
    store = run_extraction(ExtractionRequest(encoder=encoder, benchmark=benchmark, **options))
    assert store is not None  # only other ranks of a distributed run get None
    return store


def correspondence_store(
    encoder: str, benchmark: str, protocol: str = "standard", **options: Any
) -> tuple[EmbeddingStore, Any]:
    """The store a correspondence protocol scores (its input resize, normalisation and composite policy
    applied), and the protocol's settings: `correspondence(*correspondence_store(...)[::-1]...)` is C."""
    from vrlab.registry import Registry
    from vrlab.scores.correspondence import extraction_options, settings_for

    registry: Mapping[str, Any] = options.get("registry") or {}
    families = [c.family for c in Registry.from_config(registry).resolve(encoder)]
    settings = settings_for(protocol, families, **options.pop("protocol_options", {}))
    args, compose = extraction_options(settings, options.pop("encoder_args", {}), options.pop("compose", {}))
    return extract_store(encoder, benchmark, encoder_args=args, compose=compose, **options), settings
