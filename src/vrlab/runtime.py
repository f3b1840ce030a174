"""What every task needs: device choice, seeding, config hashes, run folders and atomic file writes.

Run folders derive from a hash of the settings that change the numbers, not from the clock, so a rerun (or a
requeued cluster job) finds its own earlier work.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vrlab.errors import VrlabError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; an unavailable explicit device is an error, not a silent fallback."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VrlabError(
            f"device={device} was asked for but CUDA is not available; use device=auto or device=cpu"
        )
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_plain(value: Any) -> Any:
    """OmegaConf nodes, paths and tuples as plain JSON-able data."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(settings: Any, length: int = 12) -> str:
    """A stable short hash of JSON-able settings (key order does not matter)."""
    blob = json.dumps(to_plain(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def slug(name: str, max_len: int = 60) -> str:
    """A file-system-safe version of an encoder or benchmark name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_")[:max_len] or "run"


def run_dir(root: str | Path, task: str, name: str, settings: Any) -> Path:
    """`<root>/<task>/<slug(name)>-<hash(settings)>`, created."""
    path = Path(root) / task / f"{slug(name)}-{config_hash(settings)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys, written atomically."""
    atomic_write_bytes(path, (json.dumps(to_plain(obj), indent=2, sort_keys=True) + "\n").encode())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change numbers, for manifests and result files."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vrlab", "torch", "transformers", "diffusers", "timm", "open_clip_torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
