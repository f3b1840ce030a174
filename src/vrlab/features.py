"""`vrlab task=features`: run one encoder (possibly composite) on a folder of images and report token shapes
and statistics, per member for composites; optionally save the tokens.

A quick check that an encoder card works before a long extraction, and a fingerprint (`digest`) to compare
runs for determinism.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from tqdm import tqdm

from vrlab.data.images import decode_image, list_images
from vrlab.encoders.base import VisionEncoder, autocast_context, collate_pixels, move_pixels
from vrlab.registry import Registry
from vrlab.runtime import (
    atomic_write_json,
    library_versions,
    resolve_device,
    run_dir,
    seed_everything,
    to_plain,
)

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
    encoder: VisionEncoder, paths: list[Any], batch_size: int = 8, device: str = "cpu", dtype: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens `[N_images, N_tokens, D]` (and pooled) of `encoder` on image files, in file order."""
    dev = torch.device(device)
    tokens, pooled = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"features {encoder.name}", unit="batch"):
        pixels = move_pixels(
            collate_pixels([encoder.transform(decode_image(p)) for p in paths[i : i + batch_size]]), dev
        )
        with autocast_context(dev, dtype):
            out = encoder(pixels).check_finite(encoder.name)
        tokens.append(out.tokens.float().cpu())
        pooled.append(None if out.pooled is None else out.pooled.float().cpu())
    return torch.cat(tokens), (torch.cat(pooled) if all(p is not None for p in pooled) else None)


def features_task(cfg: Any) -> dict[str, Any]:
    """Run `cfg.encoder` on `cfg.features.images`; print a table and write summary.json."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    registry = Registry.from_config(cfg.registry)
    encoder = registry.build(cfg.encoder, to_plain(cfg.encoder_args), to_plain(cfg.compose)).to(device).eval()
    paths = list_images(cfg.features.images)[: cfg.features.limit or None]
    tokens, pooled = run_features(encoder, paths, cfg.features.batch_size, str(device), cfg.dtype)
    members = [
        {"name": name, "channels": [s.start, s.stop], **token_stats(tokens[..., s])}
        for name, s in member_slices(encoder)
    ]
    summary = {
        "encoder": encoder.name,
        "images": len(paths),
        "image_folder": str(cfg.features.images),
        "tokens_shape": list(tokens.shape),
        "grid": list(encoder.grid),
        "dim": encoder.dim,
        "pooled_shape": None if pooled is None else list(pooled.shape),
        "device": str(device),
        "dtype": cfg.dtype,
        "stats": token_stats(tokens),
        "members": members,
        "digest": digest(tokens),
        "settings": encoder.settings(),
        "seed": cfg.seed,
        "versions": library_versions(),
    }
    out_dir = run_dir(
        cfg.paths.outputs,
        "features",
        encoder.name,
        {
            "settings": encoder.settings(),
            "images": [str(p) for p in paths],
            "dtype": cfg.dtype,
            "device": device.type,
        },
    )
    if cfg.features.save_tokens:
        tmp = out_dir / ".tokens.safetensors.tmp"
        tensors = {"tokens": tokens.contiguous()} | (
            {"pooled": pooled.contiguous()} if pooled is not None else {}
        )
        save_file(tensors, str(tmp))
        os.replace(tmp, out_dir / "tokens.safetensors")
    atomic_write_json(out_dir / "summary.json", summary)
    table = Table(
        title=f"{encoder.name}: {len(paths)} images -> tokens {list(tokens.shape)}, grid "
        f"{encoder.grid[0]}x{encoder.grid[1]}, pooled {summary['pooled_shape']}"
    )
    for col in ("member", "channels", "mean", "std", "min", "max", "token norm"):
        table.add_column(col)
    for m in members:
        table.add_row(
            m["name"],
            f"{m['channels'][0]}:{m['channels'][1]}",
            *(f"{m[k]:.4f}" for k in ("mean", "std", "min", "max", "token_norm")),
        )
    Console(width=160).print(table)
    log.info("digest %s; summary written to %s", summary["digest"], out_dir / "summary.json")
    summary["output_dir"] = str(out_dir)
    return summary
