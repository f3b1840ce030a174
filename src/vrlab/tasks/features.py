"""`vrlab task=features`: run one encoder (possibly composite) on a folder of images, print token shapes and
statistics per member, write `summary.json` (with a digest of the tokens) and optionally the tokens."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from safetensors.torch import save

from vrlab.data.images import list_images
from vrlab.encoders.factory import load_encoder
from vrlab.errors import VrlabError
from vrlab.features import digest, member_slices, run_features, token_stats
from vrlab.runtime import (
    atomic_write_bytes,
    atomic_write_json,
    library_versions,
    resolve_device,
    run_dir,
    seed_everything,
    to_plain,
)
from vrlab.tasks.config import registry_cfg

log = logging.getLogger(__name__)


def features_task(cfg: Any) -> dict[str, Any]:
    """Run `cfg.encoder` on `cfg.features.images`; print a table and write summary.json."""
    # everything a user can get wrong is checked before a model loads
    if OmegaConf.is_missing(cfg.features, "images") or not cfg.features.images:
        raise VrlabError("task=features needs features.images=<a folder of images>")
    if not cfg.encoder:
        raise VrlabError("task=features needs encoder=<name> (see vrlab task=encoders)")
    from vrlab.registry import Registry

    Registry.from_config(registry_cfg(cfg)).resolve(cfg.encoder)  # a misspelt name, before any file is read
    paths = list_images(cfg.features.images)[: cfg.features.limit or None]
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    encoder = load_encoder(
        cfg.encoder, to_plain(cfg.encoder_args), to_plain(cfg.compose), registry=registry_cfg(cfg)
    ).to(device)
    tokens, pooled, skipped = run_features(
        encoder,
        paths,
        cfg.features.batch_size,
        str(device),
        cfg.dtype,
        cfg.data.on_bad_image,
        cfg.data.max_pixels,
    )
    if skipped:
        log.warning("skipped %d unreadable images: %s", len(skipped), ", ".join(skipped[:5]))
        paths = [p for p in paths if str(p) not in set(skipped)]
    members = [
        {"name": name, "channels": [s.start, s.stop], **token_stats(tokens[..., s])}
        for name, s in member_slices(encoder)
    ]
    summary = {
        "encoder": encoder.name,
        "images": len(paths),
        "skipped": skipped,
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
        tensors = {"tokens": tokens.contiguous()} | (
            {"pooled": pooled.contiguous()} if pooled is not None else {}
        )
        atomic_write_bytes(out_dir / "tokens.safetensors", save(tensors))
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
