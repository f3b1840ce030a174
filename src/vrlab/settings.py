"""Checks on numeric settings, run before any model loads: counts and sizes must be whole numbers in range.

One table (`LIMITS`) names every count a user sets on the command line; `check_settings(cfg)` refuses a wrong
type or an out-of-range value by its full key, so `extract.limit=-5` never becomes a Python slice that
silently drops items and `extract.batch_size=abc` never reaches a DataLoader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vrlab.errors import VrlabError

# key -> (smallest allowed value, whether null is allowed)
LIMITS: dict[str, tuple[int, bool]] = {
    "seed": (0, False),
    "extract.batch_size": (1, False),
    "extract.shard_size": (1, False),
    "extract.num_workers": (0, False),
    "extract.limit": (1, True),
    "perf.batch_size": (1, False),
    "perf.images": (1, False),
    "perf.warmup": (0, False),
    "perf.repeats": (1, False),
    "perf.runs": (1, False),
    "alignment.n_images": (1, True),
    "alignment.n_pairs": (1, True),
    "alignment.batch_size": (1, False),
    "correspondence.max_pairs": (1, True),
    "correspondence.upsample": (1, True),
    "law.degree": (1, False),
    "law.top_k": (1, False),
    "law.budget": (1, False),
    "law.trials": (1, False),
    "law.bootstrap": (1, False),
    "generate.max_new_tokens": (1, False),
    "generate.limit": (1, True),
    "eval.limit": (1, True),
    "eval.batch_size": (1, False),
    "eval.max_new_tokens": (1, False),
    "llm2clip_text.max_length": (1, False),
    "llm2clip.max_length": (1, True),
    "llm2clip.embed_dim": (1, False),
    "llm2clip.blocks": (0, False),
    "llm2clip.embed_batch_size": (1, False),
    "llm2clip.eval_batch_size": (1, False),
    "retrieval.batch_size": (1, False),
    "retrieval.limit": (1, True),
    "retrieval.num_workers": (0, False),
    "lmvr.max_new_tokens": (1, False),
    "lmvr.batch_size": (1, False),
    "lmvr.shard_size": (1, False),
    "features.batch_size": (1, False),
    "features.limit": (1, True),
    "probe_perf.samples": (10, False),
    "probe_perf.dim": (1, False),
    "probe_perf.labels": (1, False),
    "probe_perf.max_iter": (1, False),
    "probe_perf.sklearn_labels": (1, False),
    "demo.images": (1, False),
    "demo.llm_pretrain_steps": (1, False),
    "data.max_pixels": (1, True),
}


def check_count(key: str, value: Any, minimum: int, nullable: bool) -> None:
    """Refuse `value` unless it is an integer >= `minimum` (or None where allowed), naming `key`."""
    if value is None:
        if nullable:
            return
        raise VrlabError(f"{key} must be set (an integer >= {minimum})")
    if isinstance(value, bool) or not isinstance(value, int):
        raise VrlabError(f"{key}={value!r} must be an integer >= {minimum}{' or null' if nullable else ''}")
    if value < minimum:
        raise VrlabError(f"{key}={value} must be >= {minimum}{' (or null for no limit)' if nullable else ''}")


def _get(cfg: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_settings(cfg: Mapping[str, Any]) -> None:
    """Check every count in `LIMITS` present in `cfg` (plain data or an OmegaConf config)."""
    from vrlab.runtime import to_plain

    plain = to_plain(cfg) if not isinstance(cfg, dict) else cfg
    for key, (minimum, nullable) in LIMITS.items():
        present, value = _get(plain, key)
        if present:
            check_count(key, value, minimum, nullable)
    for stage in ("stage1", "stage2"):
        present, args = _get(plain, f"train.{stage}")
        if present and isinstance(args, Mapping):
            for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
                if key in args:
                    check_count(f"train.{stage}.{key}", args[key], 1, False)
