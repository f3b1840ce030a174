"""The store's on-disk format: file names, the key, manifests, shard records and the checks on them."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vrlab.errors import VrlabError
from vrlab.runtime import config_hash

log = logging.getLogger(__name__)

STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOCK_TIMEOUT = 30.0  # seconds a writer waits for another one's critical section, which lasts milliseconds
LOCK_NAME = ".lock"
WRITER_PREFIX = ".writer-"
RECORD_SUFFIX = ".sha256"
REPAIR = "rerun the same extraction, which extracts damaged or missing shards again"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def store_key(settings: Mapping[str, Any], ids: Sequence[str], shard_size: int, dtype: str) -> str:
    """The hash naming a store: everything that changes the numbers (encoder card, layer, resolution, transform,
    normalisation, protocol, seed, benchmark split and items, adapter, dtype) plus the shard layout."""
    return config_hash(
        {"settings": settings, "ids": list(ids), "shard_size": shard_size, "dtype": dtype}, length=16
    )


def read_manifest(path: str | Path, advice: str) -> dict[str, Any]:
    """The manifest of the store at `path`; one that is not a JSON object raises VrlabError with `advice`."""
    file = Path(path) / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VrlabError(f"store manifest {file} is damaged (not valid JSON: {exc}); {advice}") from None
    if not isinstance(manifest, dict):
        raise VrlabError(f"store manifest {file} is damaged (not a JSON object); {advice}")
    return manifest


def is_complete(path: str | Path) -> bool:
    """Whether a finished store exists at `path`."""
    if not (Path(path) / "manifest.json").exists():
        return False
    advice = f"delete the folder {path} and run the extraction again"
    return bool(read_manifest(path, advice).get("complete"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def shard_problem(path: Path, key: str | None) -> str | None:
    """Why the safetensors file at `path` is not a whole shard of the store `key` (None if it is): checks that
    its header parses and describes exactly the file's bytes, and the metadata key. Reads only the header."""
    size = path.stat().st_size
    if size < 8:
        return f"is truncated ({size} bytes)"
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if 8 + length > size:
            return f"is truncated ({size} bytes, its header alone claims {8 + length})"
        try:
            header = json.loads(fh.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
            meta = header.get("__metadata__") or {}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has an unreadable safetensors header"
    if 8 + length + end != size:
        return f"has {size} bytes but its header describes {8 + length + end} (truncated or overwritten)"
    if key is not None and meta.get("key") != key:
        return f"belongs to another extraction (key {meta.get('key')}, this store's is {key})"
    return None


def _signature(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (a verified digest is reused while it holds)."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino
