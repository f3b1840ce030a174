"""`vrlab task=features`: run one encoder (possibly composite) on a folder of images and report token shapes
and statistics, per member for composites; optionally save the tokens.

A quick check that an encoder card works before a long extraction, and a fingerprint (`digest`) to compare
runs for determinism.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from tqdm import tqdm

from vrlab.data.images import DEFAULT_MAX_PIXELS, decode_image
from vrlab.encoders.base import VisionEncoder, autocast_context, collate_pixels, move_pixels
from vrlab.errors import ImageDecodeError, VrlabError

log = logging.getLogger(__name__)


def token_stats(tokens: torch.Tensor) -> dict[str, float]:
    """Summary statistics of a `[B, N, D]` token tensor."""
    t = tokens.float()
    return {
        "mean": t.mean().item(),
        "std": t.std().item(),
        "min": t.min().item(),
        "max": t.max().item(),
        "token_norm": t.norm(dim=-1).mean().item(),
    }


def digest(tensor: torch.Tensor) -> str:
    """Short SHA-256 of a tensor's bytes: equal digests mean bit-identical features."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def member_slices(encoder: VisionEncoder) -> list[tuple[str, slice]]:
    """Channel ranges of each member in the concatenated tokens (one range for a single encoder)."""
    members = getattr(encoder, "members", None)
    if members is None:
        return [(encoder.name, slice(0, encoder.dim))]
    out, start = [], 0
    for m in members:
        out.append((m.name, slice(start, start + m.dim)))
        start += m.dim
    return out


@torch.inference_mode()
def run_features(
    encoder: VisionEncoder,
    paths: list[Any],
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    on_bad_image: str = "error",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Tokens `[N_images, N_tokens, D]` (and pooled) of `encoder` on image files, in file order, and the files
    skipped as unreadable (`on_bad_image=skip`; with `error` the first one raises). When the token count
    differs per image (the anyres and native strategies), the tokens come end to end as `[1, ΣN, D]`."""
    if on_bad_image not in ("error", "skip"):
        raise VrlabError(f"data.on_bad_image='{on_bad_image}' must be 'error' or 'skip'")
    dev = torch.device(device)
    tokens, pooled, skipped = [], [], []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"features {encoder.name}", unit="batch"):
        images = []
        for p in paths[i : i + batch_size]:
            try:
                images.append(encoder.transform(decode_image(p, max_pixels)))
            except ImageDecodeError:
                if on_bad_image == "error":
                    raise
                skipped.append(str(p))
        if not images:
            continue
        pixels = move_pixels(collate_pixels(images), dev)
        with autocast_context(dev, dtype):
            out = encoder(pixels).check_finite(encoder.name)
        tokens += [t.float().cpu() for t in out.per_image()]
        pooled.append(None if out.pooled is None else out.pooled.float().cpu())
    if not tokens:
        raise VrlabError(f"none of the {len(paths)} images could be read (all skipped)")
    if len({len(t) for t in tokens}) > 1:  # anyres, native: a token count per image, all tokens end to end
        joined = torch.cat(tokens).unsqueeze(0)
    else:
        joined = torch.stack(tokens)
    return joined, (torch.cat(pooled) if all(p is not None for p in pooled) else None), skipped
