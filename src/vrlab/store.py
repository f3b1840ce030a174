"""EmbeddingStore: a folder of safetensors shards plus `manifest.json`, one per (benchmark, encoder config).

Layout:
  manifest.json          header (key, settings, item ids in benchmark order, shard size, dtype, versions);
                         `complete: true` and the list of stored ids, shards and skipped images once finished
  shard-00000.safetensors  `tokens` [n, N, D], `pooled` [n, D'] (optional), `index` [n] (positions in the
                         benchmark's item list); metadata `skipped` (JSON list of unreadable item ids)

Shards are written to a temporary name and renamed, so a shard file that exists is complete; a rerun skips
finished shards. Readers refuse a store whose manifest is not complete, and memory-map shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_bytes, atomic_write_json, config_hash, library_versions, to_plain

STORE_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def store_key(settings: Mapping[str, Any], ids: Sequence[str], shard_size: int, dtype: str) -> str:
    """The hash naming a store: everything that changes the numbers (encoder card, layer, resolution, transform,
    normalisation, protocol, seed, benchmark split and items, adapter, dtype) plus the shard layout."""
    return config_hash(
        {"settings": settings, "ids": list(ids), "shard_size": shard_size, "dtype": dtype}, length=16
    )


def is_complete(path: str | Path) -> bool:
    """Whether a finished store exists at `path`."""
    manifest = Path(path) / "manifest.json"
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("complete"))


class StoreWriter:
    """Creates or resumes a store; `write_shard` is atomic; `finalize` completes the manifest."""

    def __init__(
        self,
        path: str | Path,
        settings: Mapping[str, Any],
        ids: Sequence[str],
        shard_size: int,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise VrlabError(f"store dtype '{dtype}' is not one of {sorted(DTYPES)}")
        if shard_size < 1:
            raise VrlabError(f"shard_size={shard_size} must be positive")
        self.path = Path(path)
        self.ids, self.shard_size, self.dtype = list(ids), int(shard_size), dtype
        self.key = store_key(settings, self.ids, shard_size, dtype)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("key") != self.key:
                raise VrlabError(
                    f"store {self.path} holds different settings (key {old.get('key')} != {self.key}); "
                    "delete it or choose another output folder"
                )
        else:
            # Rank 0 writes the header; other ranks may race, but they write identical bytes.
            atomic_write_json(
                manifest,
                {
                    "version": STORE_VERSION,
                    "key": self.key,
                    "complete": False,
                    "settings": to_plain(settings),
                    "item_ids": self.ids,
                    "num_items": len(self.ids),
                    "shard_size": shard_size,
                    "dtype": dtype,
                    "num_shards": self.num_shards,
                    "versions": library_versions(),
                },
            )

    @property
    def num_shards(self) -> int:
        return max(1, -(-len(self.ids) // self.shard_size))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(len(self.ids), (shard + 1) * self.shard_size))

    def done(self, shard: int) -> bool:
        return (self.path / shard_name(shard)).exists()

    def write_shard(
        self,
        shard: int,
        index: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor | None,
        skipped: Sequence[str] = (),
    ) -> None:
        """Write one shard under a temporary name, then rename it into place."""
        dt = DTYPES[self.dtype]
        tensors = {"index": index.to(torch.int64).contiguous(), "tokens": tokens.to(dt).contiguous()}
        if pooled is not None:
            tensors["pooled"] = pooled.to(dt).contiguous()
        atomic_write_bytes(
            self.path / shard_name(shard),
            save(tensors, metadata={"skipped": json.dumps(list(skipped)), "key": self.key}),
        )

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.done(s)]

    def finalize(self, extra: Mapping[str, Any] | None = None) -> EmbeddingStore:
        """Check every shard is present and consistent, then mark the manifest complete."""
        missing = self.missing()
        if missing:
            raise VrlabError(f"store {self.path} cannot be completed: shards {missing} are missing")
        manifest = json.loads((self.path / "manifest.json").read_text())
        stored, skipped, shards, shapes = [], [], [], {}
        for s in range(self.num_shards):
            with safe_open(str(self.path / shard_name(s)), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    raise VrlabError(
                        f"shard {self.path / shard_name(s)} belongs to another run; delete it and rerun"
                    )
                index = f.get_tensor("index").tolist()
                for key in ("tokens", "pooled") if index else ():  # a fully skipped shard has no shapes
                    if key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        shape = list(f.get_slice(key).get_shape())[1:]
                        if shapes.setdefault(key, shape) != shape:
                            raise VrlabError(
                                f"shard {s} of {self.path} has {key} shape {shape}, expected {shapes[key]}"
                            )
                skipped += json.loads(meta.get("skipped", "[]"))
            stored += [self.ids[i] for i in index]
            shards.append({"file": shard_name(s), "rows": len(index)})
        manifest.update(
            complete=True,
            stored_ids=stored,
            skipped=skipped,
            shards=shards,
            shapes={"tokens": shapes.get("tokens"), "pooled": shapes.get("pooled")},
            **dict(extra or {}),
        )
        atomic_write_json(self.path / "manifest.json", manifest)
        return EmbeddingStore(self.path)


class EmbeddingStore:
    """Read a complete store: `len`, `ids`, tokens and pooled by position or id, batch iteration."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise VrlabError(
                f"no embedding store at {self.path} (manifest.json missing); run vrlab task=extract first"
            )
        self.manifest = json.loads(manifest.read_text())
        if not self.manifest.get("complete"):
            done = len(list(self.path.glob("shard-*.safetensors")))
            raise VrlabError(
                f"embedding store {self.path} is incomplete ({done}/{self.manifest.get('num_shards')} shards); "
                "rerun the same extraction to resume it"
            )
        self.ids: list[str] = self.manifest["stored_ids"]
        self._where: list[tuple[int, int]] = [
            (s, r) for s, sh in enumerate(self.manifest["shards"]) for r in range(sh["rows"])
        ]
        self._position = {item_id: i for i, item_id in enumerate(self.ids)}
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._position

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def skipped(self) -> list[str]:
        return self.manifest.get("skipped", [])

    @property
    def has_pooled(self) -> bool:
        return self.manifest["shapes"].get("pooled") is not None

    def _shard(self, s: int) -> Any:
        if s not in self._handles:  # safe_open memory-maps the file
            self._handles[s] = safe_open(str(self.path / self.manifest["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def position(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self._position:
                raise VrlabError(f"item '{key}' is not in store {self.path}")
            return self._position[key]
        if not -len(self) <= key < len(self):
            raise IndexError(f"index {key} out of range for a store of {len(self)} items")
        return key % len(self)

    def _get(self, name: str, key: int | str) -> torch.Tensor:
        s, r = self._where[self.position(key)]
        return self._shard(s).get_slice(name)[r : r + 1][0]

    def tokens(self, key: int | str) -> torch.Tensor:
        """Tokens `[N, D]` of one item, by position or id."""
        return self._get("tokens", key)

    def pooled(self, key: int | str) -> torch.Tensor | None:
        return self._get("pooled", key) if self.has_pooled else None

    def load(self, name: str = "tokens") -> torch.Tensor:
        """All rows of `tokens` or `pooled`, in stored order."""
        shards = [s for s, sh in enumerate(self.manifest["shards"]) if sh["rows"]]
        return torch.cat([self._shard(s).get_tensor(name) for s in shards])

    def batches(self, batch_size: int = 64, name: str = "tokens") -> Iterator[tuple[list[str], torch.Tensor]]:
        """(ids, tensor) batches in stored order; each shard is read once."""
        start = 0
        for s, shard in enumerate(self.manifest["shards"]):
            block = self._shard(s).get_tensor(name)
            for i in range(0, shard["rows"], batch_size):
                stop = min(i + batch_size, shard["rows"])
                yield self.ids[start + i : start + stop], block[i:stop]
            start += shard["rows"]
