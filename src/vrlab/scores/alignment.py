"""A score (cross-modal alignment), as in "Law of Vision Representation in MLLMs" (law.md §2).

For a candidate's projected tokens E_v(x) [N_v, H] and a reference's E_r(x) [N_r, H] (each from its own
stage-1 projector):  s_r(v, x) = mean_i max_j cos(E_v(x)_i, E_r(x)_j); A_r is the mean of s_r over the first
N images of a benchmark, and A the mean over references. Token counts may differ; widths may not.
fp32 by default; `dtype=bfloat16` reproduces the published numerics (tensors saved and compared in bf16).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.errors import ShapeError, VrlabError
from vrlab.store import EmbeddingStore

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def image_alignment(candidate: torch.Tensor, reference: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Per-image score for batches `[B, N_v, H]` and `[B, N_r, H]` -> `[B]` (float32)."""
    if candidate.dim() == 2:
        candidate, reference = candidate.unsqueeze(0), reference.unsqueeze(0)
    if candidate.shape[0] != reference.shape[0] or candidate.shape[-1] != reference.shape[-1]:
        raise ShapeError(
            f"cannot compare candidate tokens {tuple(candidate.shape)} with reference tokens {tuple(reference.shape)}: "
            "batch and width must match (project both with their stage-1 projectors into the LLM width)"
        )
    dt = DTYPES[dtype]
    c = F.normalize(candidate.to(dt), dim=-1, eps=1e-10)
    r = F.normalize(reference.to(dt), dim=-1, eps=1e-10)
    sim = torch.bmm(c, r.transpose(1, 2))  # [B, N_v, N_r]
    return sim.max(dim=2).values.float().mean(dim=1)


def store_alignment(
    candidate: EmbeddingStore,
    reference: EmbeddingStore,
    n_images: int | None = None,
    dtype: str = "float32",
    batch_size: int = 16,
) -> dict[str, Any]:
    """A_r over the first `n_images` items of the candidate store; every one must be in the reference store."""
    if dtype not in DTYPES:
        raise VrlabError(f"alignment dtype '{dtype}' must be one of {sorted(DTYPES)}")
    bench_c = candidate.settings.get("benchmark")
    bench_r = reference.settings.get("benchmark")
    if bench_c != bench_r:
        raise VrlabError(
            f"candidate store {candidate.path} and reference store {reference.path} come from different benchmarks "
            f"({(bench_c or {}).get('name')} vs {(bench_r or {}).get('name')}); A compares the same images"
        )
    ids = candidate.ids[: n_images or None]
    if not ids:
        raise VrlabError(f"store {candidate.path} is empty")
    missing = [i for i in ids if i not in reference]
    if missing:
        raise VrlabError(
            f"reference store {reference.path} lacks {len(missing)} of the candidate's images, e.g. {missing[:3]}"
        )
    scores = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        cand = torch.stack([candidate.tokens(i) for i in chunk]).float()
        ref = torch.stack([reference.tokens(i) for i in chunk]).float()
        scores.append(image_alignment(cand, ref, dtype))
    per_image = torch.cat(scores)
    return {
        "A": per_image.mean().item(),
        "n_images": len(ids),
        "per_image": dict(zip(ids, per_image.tolist(), strict=True)),
    }


def alignment(
    candidate: EmbeddingStore,
    references: Mapping[str, EmbeddingStore],
    n_images: int | None = 100,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A against every reference and their mean, with the settings that produced it."""
    if not references:
        raise VrlabError("the A score needs at least one reference store")
    per_ref = {name: store_alignment(candidate, ref, n_images, dtype) for name, ref in references.items()}
    return {
        "A": sum(r["A"] for r in per_ref.values()) / len(per_ref),
        "references": {name: {"A": r["A"], "n_images": r["n_images"]} for name, r in per_ref.items()},
        "per_image": {name: r["per_image"] for name, r in per_ref.items()},
        "settings": {
            "n_images": n_images,
            "dtype": dtype,
            "token_match": "max over reference tokens, mean over candidate",
            "normalisation": "L2 per token, eps 1e-10",
            "candidate_store": str(candidate.path),
            "reference_stores": {k: str(v.path) for k, v in references.items()},
            "stored_dtype": candidate.manifest.get("dtype"),
        },
    }


def alignment_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=alignment`: A of `encoder` (+ `alignment.projector`) against the references, per benchmark."""
    from vrlab.extract import extract_store
    from vrlab.runtime import atomic_write_json, run_dir, to_plain

    acfg = cfg.alignment
    benchmarks: Sequence[str] = to_plain(acfg.benchmarks) or [cfg.benchmark]
    if not benchmarks or benchmarks == [None]:
        raise VrlabError("alignment needs benchmarks: alignment.benchmarks=[...] or benchmark=<name>")
    references = to_plain(acfg.references)
    if not references:
        raise VrlabError("alignment.references is empty; give [{name, encoder, projector}, ...]")
    if not acfg.projector:
        log.warning(
            "no alignment.projector: A is computed on raw encoder tokens, not on projected tokens as in the "
            "paper; widths must then match the references' raw widths"
        )
    results = {}
    for bench in benchmarks:
        cand = extract_store(cfg, cfg.encoder, bench, acfg.projector, limit=acfg.n_images)
        refs = {
            r["name"]: extract_store(
                cfg,
                r["encoder"],
                bench,
                r.get("projector"),
                limit=acfg.n_images,
                encoder_args=r.get("encoder_args", {}),
            )
            for r in references
        }
        res = alignment(cand, refs, acfg.n_images, acfg.dtype)
        res["settings"]["projector"] = acfg.projector
        results[bench] = res
        log.info(
            "A(%s, %s) = %.4f  (%s)",
            cfg.encoder,
            bench,
            res["A"],
            ", ".join(f"{k}: {v['A']:.4f}" for k, v in res["references"].items()),
        )
    out = run_dir(
        cfg.paths.outputs,
        "alignment",
        cfg.encoder,
        {
            "benchmarks": benchmarks,
            "refs": references,
            "projector": acfg.projector,
            "n": acfg.n_images,
            "dtype": acfg.dtype,
        },
    )
    summary = {
        "representation": acfg.label or cfg.encoder,
        "encoder": cfg.encoder,
        "A": {b: r["A"] for b, r in results.items()},
        "results": results,
    }
    atomic_write_json(out / "alignment.json", summary)
    log.info("written %s", out / "alignment.json")
    summary["output"] = str(Path(out) / "alignment.json")
    return summary
