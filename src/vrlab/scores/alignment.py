"""A score (cross-modal alignment), as in "Law of Vision Representation in MLLMs", under two protocols.

`reference_cosine` (the paper's first version and its authors' code; the default). For a candidate's projected tokens E_v(x) [N_v, H] and a reference's E_r(x) [N_r, H] (each from its own
stage-1 projector):  s_r(v, x) = mean_i max_j cos(E_v(x)_i, E_r(x)_j); A_r is the mean of s_r over the first
N images of a benchmark, and A the mean over references. Token counts may differ, per image too (the anyres
and native strategies: every token of the image, base view included; newlines are the LLM's, not the
image's); widths may not.
fp32 by default; `dtype=bfloat16` reproduces the published numerics (tensors saved and compared in bf16).

`caption_likelihood` (the published version, COLM 2025): with encoder, stage-1 projector and LLM frozen, A is
the mean log-probability per caption token given the image, over N image-caption pairs of the stage-1 data,
each scored as stage 1 labels it (the stage-1 template: the caption and its separator). Tokens are pooled
over all pairs, so A is exactly the negative stage-1 loss of those pairs taken as one batch. One A per
representation, shared by every benchmark. It runs the MLLM, so it lives with the model's other scoring
calls (`vrlab.mllm.inference.caption_likelihood`); this module keeps the protocol names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.errors import ShapeError, VrlabError
from vrlab.store import EmbeddingStore

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALIGNMENT_PROTOCOLS = ("reference_cosine", "caption_likelihood")


def image_alignment(candidate: torch.Tensor, reference: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Per-image score for batches `[B, N_v, H]` and `[B, N_r, H]` -> `[B]` (float32)."""
    if candidate.dim() == 2:
        candidate, reference = candidate.unsqueeze(0), reference.unsqueeze(0)
    if candidate.shape[0] != reference.shape[0] or candidate.shape[-1] != reference.shape[-1]:
        raise ShapeError(
            f"cannot compare candidate tokens {tuple(candidate.shape)} with reference tokens {tuple(reference.shape)}: "
            "batch and width must match (project both with their stage-1 adapters into the LLM width)"
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
    ragged = getattr(candidate, "ragged", False) or getattr(reference, "ragged", False)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if ragged:  # a token count per image (anyres, native): one image at a time
            scores += [
                image_alignment(candidate.tokens(i).float(), reference.tokens(i).float(), dtype)
                for i in chunk
            ]
            continue
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
