"""EmbeddingStore: reads a complete store, memory-mapping shards and checking each on first open."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vrlab.encoders.resolution import Layout
from vrlab.errors import VrlabError
from vrlab.store.format import REPAIR, file_sha256, read_manifest, shard_problem

log = logging.getLogger(__name__)


class EmbeddingStore:
    """Read a complete store: `len`, `ids`, tokens and pooled by position or id, batch iteration.

    Each shard is checked (size, SHA-256, key) the first time it is opened; a damaged one raises VrlabError.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").exists():
            raise VrlabError(
                f"no embedding store at {self.path} (manifest.json missing); run vrlab task=extract first"
            )
        self.manifest = read_manifest(
            self.path, f"delete the folder {self.path} and run the extraction again"
        )
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
        self._ragged: dict[int, tuple[list[int], list[dict[str, Any]]]] = {}  # shard -> offsets, layouts
        self._tokens = "tokens"  # a layer view reads tokens@<layer>

    def view(self, layer: int) -> EmbeddingStore:
        """The store of one recorded layer (`extract.layers`): its tokens, and the key and settings a
        single-layer extraction of that layer has, so results computed from it are that extraction's."""
        if self.manifest.get("view_of"):
            raise VrlabError(
                f"this is already the view of layer {self.manifest['view_of']['layer']}; take views of {self.path}"
            )
        views = self.manifest.get("layer_views") or {}
        if str(layer) not in views:
            raise VrlabError(
                f"store {self.path} holds the layers {sorted(views, key=int) or 'of no sweep'}, not {layer}; "
                "extract with extract.layers=[...] (or all)"
            )
        view = copy.copy(self)
        view.manifest = {
            **self.manifest,
            "key": views[str(layer)]["key"],
            "settings": views[str(layer)]["settings"],
            "view_of": {"store": str(self.path), "key": self.manifest["key"], "layer": int(layer)},
        }
        view._tokens = f"tokens@{layer}"
        return view

    @property
    def layers(self) -> list[int]:
        """The hidden layers recorded beside the tokens (`extract.layers`), each readable with `view`."""
        return sorted(int(k) for k in self.manifest.get("layer_views") or {})

    @property
    def ragged(self) -> bool:
        """Whether items have their own token counts (the anyres and native resolution strategies)."""
        return bool(self.manifest.get("ragged"))

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
        if s not in self._handles:
            self._handles[s] = self._open(s)
        return self._handles[s]

    def _open(self, s: int) -> Any:
        """Check shard `s` against the manifest, then open it (safe_open memory-maps the file)."""
        entry = self.manifest["shards"][s]
        file = self.path / entry["file"]
        key = (self.manifest.get("view_of") or {}).get("key") or self.manifest.get("key")
        if not file.exists():
            raise VrlabError(f"shard {file} of store {self.path} is missing; {REPAIR}")
        if "sha256" in entry:
            size = file.stat().st_size
            if size != entry.get("bytes"):
                problem = (
                    f"has {size} bytes, the manifest says {entry.get('bytes')} (truncated or overwritten)"
                )
            elif file_sha256(file) != entry["sha256"]:
                problem = "does not match the SHA-256 in the manifest (damaged on disk)"
            else:
                problem = None
        else:  # a store written before shards had digests
            problem = shard_problem(file, None)
        if problem is not None:
            raise VrlabError(f"shard {file} {problem}; {REPAIR}")
        try:
            handle = safe_open(str(file), framework="pt")
        except SafetensorError as exc:
            raise VrlabError(f"shard {file} cannot be read ({exc}); {REPAIR}") from None
        found = (handle.metadata() or {}).get("key")
        if found != key:
            raise VrlabError(
                f"shard {file} belongs to another extraction (key {found}, the manifest's is {key}); {REPAIR}"
            )
        return handle

    def position(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self._position:
                raise VrlabError(f"item '{key}' is not in store {self.path}")
            return self._position[key]
        if not -len(self) <= key < len(self):
            raise IndexError(f"index {key} out of range for a store of {len(self)} items")
        return key % len(self)

    def _get(self, name: str, key: int | str) -> torch.Tensor:
        name = self._tokens if name == "tokens" else name
        s, r = self._where[self.position(key)]
        return self._shard(s).get_slice(name)[r : r + 1][0]

    def _ragged_index(self, s: int) -> tuple[list[int], list[dict[str, Any]]]:
        if s not in self._ragged:
            handle = self._shard(s)
            layouts = json.loads((handle.metadata() or {}).get("layouts", "[]"))
            self._ragged[s] = handle.get_tensor("offsets").tolist(), layouts
        return self._ragged[s]

    def tokens(self, key: int | str) -> torch.Tensor:
        """Tokens `[N, D]` of one item, by position or id (in a ragged store, N is the item's own count)."""
        if not self.ragged:
            return self._get("tokens", key)
        s, r = self._where[self.position(key)]
        offsets, _ = self._ragged_index(s)
        return self._shard(s).get_slice("tokens")[offsets[r] : offsets[r + 1]]

    def layout(self, key: int | str) -> Layout | None:
        """Where an item's tokens come from (`vrlab.encoders.resolution.Layout`); None in a fixed-grid store."""
        if not self.ragged:
            return None
        s, r = self._where[self.position(key)]
        return Layout.from_dict(self._ragged_index(s)[1][r])

    def pooled(self, key: int | str) -> torch.Tensor | None:
        return self._get("pooled", key) if self.has_pooled else None

    def load(self, name: str = "tokens") -> torch.Tensor:
        """All rows of `tokens` or `pooled`, in stored order."""
        self._refuse_ragged(name)
        name = self._tokens if name == "tokens" else name
        shards = [s for s, sh in enumerate(self.manifest["shards"]) if sh["rows"]]
        return torch.cat([self._shard(s).get_tensor(name) for s in shards])

    def batches(self, batch_size: int = 64, name: str = "tokens") -> Iterator[tuple[list[str], torch.Tensor]]:
        """(ids, tensor) batches in stored order; each shard is read once."""
        self._refuse_ragged(name)
        name = self._tokens if name == "tokens" else name
        start = 0
        for s, shard in enumerate(self.manifest["shards"]):
            block = self._shard(s).get_tensor(name)
            for i in range(0, shard["rows"], batch_size):
                stop = min(i + batch_size, shard["rows"])
                yield self.ids[start + i : start + stop], block[i:stop]
            start += shard["rows"]

    def _refuse_ragged(self, name: str) -> None:
        if name == "tokens" and self.ragged:
            raise VrlabError(
                f"store {self.path} holds a token count per item (resolution "
                f"{self.settings.get('encoder', {}).get('transform', {}).get('strategy')}); read items with "
                "tokens(i), or the pooled vectors"
            )
