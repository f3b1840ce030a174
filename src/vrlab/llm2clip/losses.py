"""LLM2CLIP's two losses: the caption-contrastive hard-negative NLL (LLM stage) and CLIP's symmetric loss.

`hard_negative_nll` follows LLM2Vec's `HardNegativeNLLLoss`: query i scores every positive and every hard
negative of the batch (cosine times `scale`, 50 by default, i.e. temperature 0.02) and the loss is the
cross-entropy of its own positive. Across processes the documents are gathered (with gradients kept for
this rank's share) so every query sees the global batch, as the release does. `clip_loss` is open_clip's
`ClipLoss` with `local_loss` and `gather_with_grad`, the released CLIP-stage settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, this rank's with their gradient."""
    rank, world = _world()
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x
    return torch.cat(parts)


def hard_negative_nll(
    query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None, scale: float = 50.0
) -> torch.Tensor:
    """Mean over queries of −log softmax(scale · cos(q_i, [d⁺_1..d⁺_N, d⁻_1..d⁻_N]))_i."""
    rank, _ = _world()
    docs = _gather(positive) if negative is None else torch.cat([_gather(positive), _gather(negative)])
    scores = scale * F.normalize(query, dim=-1) @ F.normalize(docs, dim=-1).T
    labels = torch.arange(len(query), device=query.device) + rank * len(query)
    return F.cross_entropy(scores, labels)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """½ [CE(τ⁻¹ V Uᵀ) + CE(τ⁻¹ U Vᵀ)] on L2-normalised features; `logit_scale` is τ⁻¹ itself (not its log)."""
    from open_clip.loss import ClipLoss

    rank, world = _world()
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale)
