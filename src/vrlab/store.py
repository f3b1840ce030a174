"""EmbeddingStore: a folder of safetensors shards plus `manifest.json`, one per (benchmark, encoder config).

Layout:
  manifest.json          header (key, settings, item ids in benchmark order, shard size, dtype, versions);
                         `complete: true` and the list of stored ids, shards (`file`, `rows`, `bytes`,
                         `sha256`) and skipped images once finished
  shard-00000.safetensors  `tokens` [n, N, D], `pooled` [n, D'] (optional), `index` [n] (positions in the
                         benchmark's item list); metadata `key` (the store key) and `skipped` (JSON list of
                         unreadable item ids)
  shard-00000.safetensors.sha256  the shard's record, JSON `{file, rows, bytes, sha256, key}`, written right
                         after the shard from the very bytes written
  .lock, .writer-<key>-<token>.lock  the writers' locks (below)

Damage. Shards and records are written to a temporary name and renamed, so neither is ever partial when
written; damage comes later (a full disk, a copy cut short, a bad sector). A shard counts as done only when
its record exists, names this store's key and gives the shard's size; the first time a writer asks about a
shard it also checks the SHA-256, and a shard that fails is deleted, logged as a warning, and the manifest
marked incomplete, so the same extraction, rerun, extracts it again (that is how a damaged store is repaired).
`finalize` writes every shard's size and digest into the manifest; `EmbeddingStore` checks a shard's size,
digest and key the first time it opens it. A shard without a record (written before records existed, or
killed between the two renames) is adopted when its header describes exactly the file's bytes and carries
the store's key. Stores whose manifest lists no digests (written before them) are still read; their shards
get the structural check only.

Writers. Two extractions with different settings must never share a folder, but the ranks of one torchrun
extraction (same settings, hence same key) write their slices of shards into one folder at once. So:
- `.lock` (a `filelock` lock) guards only short critical sections: reading or creating the manifest and
  checking its key, looking at the other writers' locks, and the manifest updates of `done` and `finalize`.
  A writer that cannot take it within `lock_timeout` seconds raises, naming the folder.
- every writer also holds its own lock `.writer-<key>-<token>.lock` from `__init__` until `finalize`, an
  exception in its methods, `close()`, the end of a `with` block, or `__del__` as a fallback (the OS drops
  it when the process dies). Inside the critical section a new writer refuses to start when a lock of
  another key is still held, and deletes the ones nobody holds; locks of its own key are its fellow ranks.
Since the manifest is created and checked under `.lock`, a second key also finds the first one's manifest and
is refused; the writer locks say why (a live extraction, not an old folder). Readers take no lock: they read
only complete manifests, and memory-map shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_bytes, atomic_write_json, config_hash, library_versions, to_plain

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


class StoreWriter:
    """Creates or resumes a store; `write_shard` is atomic; `finalize` completes the manifest.

    Holds the folder's writer lock from construction until `finalize`, `close()`, an exception in one of its
    methods, or the end of a `with` block (see the module docstring); `lock_timeout` is how long it waits for
    another writer's critical section before it gives up.
    """

    def __init__(
        self,
        path: str | Path,
        settings: Mapping[str, Any],
        ids: Sequence[str],
        shard_size: int,
        dtype: str = "float32",
        *,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self._marker: FileLock | None = None  # first, so that __del__ works whatever fails below
        if dtype not in DTYPES:
            raise VrlabError(f"store dtype '{dtype}' is not one of {sorted(DTYPES)}")
        if shard_size < 1:
            raise VrlabError(f"shard_size={shard_size} must be positive")
        self.path = Path(path)
        self.ids, self.shard_size, self.dtype = list(ids), int(shard_size), dtype
        self.key = store_key(settings, self.ids, shard_size, dtype)
        self.lock_timeout = float(lock_timeout)
        self._verified: dict[int, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        self._mutex = FileLock(self.path / LOCK_NAME, timeout=self.lock_timeout, thread_local=False)
        with self._critical():
            self._refuse_other_writers()
            if (self.path / "manifest.json").exists():
                old = self._manifest()
                if old.get("key") != self.key:
                    raise VrlabError(
                        f"store {self.path} holds different settings (key {old.get('key')} != {self.key}); "
                        "delete it or choose another output folder"
                    )
            else:
                atomic_write_json(
                    self.path / "manifest.json",
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
            marker = FileLock(
                self.path / f"{WRITER_PREFIX}{self.key}-{secrets.token_hex(4)}.lock", thread_local=False
            )
            marker.acquire(blocking=False)  # a fresh name: nobody else holds it
            self._marker = marker

    # -- locking ---------------------------------------------------------------------------------------------

    @contextmanager
    def _critical(self) -> Iterator[None]:
        try:
            self._mutex.acquire()
        except Timeout:
            raise VrlabError(
                f"another extraction is writing the store {self.path}: its lock {self.path / LOCK_NAME} "
                f"stayed taken for {self.lock_timeout:g} s; wait for that extraction to finish or choose "
                "another output folder"
            ) from None
        try:
            yield
        finally:
            self._mutex.release()

    def _refuse_other_writers(self) -> None:
        for marker in sorted(self.path.glob(f"{WRITER_PREFIX}*.lock")):
            key = marker.name[len(WRITER_PREFIX) :].split("-")[0]
            if key == self.key:
                continue  # a rank of this same extraction
            probe = FileLock(marker, thread_local=False)
            try:
                probe.acquire(blocking=False)
            except Timeout:
                raise VrlabError(
                    f"another extraction is writing the store {self.path} with other settings (key {key}, "
                    f"this one's is {self.key}); wait for it to finish or choose another output folder"
                ) from None
            probe.release()
            marker.unlink(missing_ok=True)  # its writer ended without removing it

    def close(self) -> None:
        """Release the writer lock (idempotent); `finalize` and any exception in a method call this."""
        marker, self._marker = getattr(self, "_marker", None), None
        if marker is not None:
            marker.release()
            Path(marker.lock_file).unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):  # at interpreter shutdown filelock may be torn down already
            self.close()

    @contextmanager
    def _releasing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

    # -- shards ----------------------------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        return read_manifest(self.path, f"delete the folder {self.path} and rerun the extraction")

    @property
    def num_shards(self) -> int:
        return max(1, -(-len(self.ids) // self.shard_size))

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(len(self.ids), (shard + 1) * self.shard_size))

    def record_path(self, shard: int) -> Path:
        return self.path / (shard_name(shard) + RECORD_SUFFIX)

    def done(self, shard: int) -> bool:
        """Whether shard `shard` is on disk and whole; a damaged one is deleted and logged, to be redone."""
        with self._releasing_on_error():
            file, record_file = self.path / shard_name(shard), self.record_path(shard)
            if not file.exists():
                record_file.unlink(missing_ok=True)
                self._verified.pop(shard, None)
                return False
            cached = self._verified.get(shard)
            if cached is not None and cached[0] == _signature(file):
                return True
            problem = self._verify(shard)
            if problem is None:
                return True
            log.warning("shard %s %s; deleting it so that it is extracted again", file, problem)
            file.unlink(missing_ok=True)
            record_file.unlink(missing_ok=True)
            self._verified.pop(shard, None)
            self._mark_incomplete()
            return False

    def _verify(self, shard: int) -> str | None:
        """Check shard `shard` against its record (or adopt it, see the module docstring); None when whole."""
        file, record_file = self.path / shard_name(shard), self.record_path(shard)
        signature = _signature(file)
        try:
            record = json.loads(record_file.read_text())
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except FileNotFoundError:
            record = None
        except (UnicodeDecodeError, ValueError):
            return f"has an unreadable record {record_file.name}"
        if record is None:
            problem = shard_problem(file, self.key)
            if problem is not None:
                return problem
            record = {"file": file.name, "bytes": signature[0], "sha256": file_sha256(file), "key": self.key}
            atomic_write_json(record_file, record)
        else:
            if record.get("key") != self.key:
                return f"belongs to another extraction (its record names key {record.get('key')})"
            if record.get("bytes") != signature[0]:
                size, recorded = signature[0], record.get("bytes")
                return f"has {size} bytes, its record says {recorded} (truncated or overwritten)"
            if file_sha256(file) != record.get("sha256"):
                return "does not match the SHA-256 of its record (damaged on disk)"
        self._verified[shard] = (signature, record)
        return None

    def _mark_incomplete(self) -> None:
        with self._critical():
            manifest = self._manifest()
            if manifest.get("complete") and manifest.get("key") == self.key:
                manifest["complete"] = False
                atomic_write_json(self.path / "manifest.json", manifest)

    def write_shard(
        self,
        shard: int,
        index: torch.Tensor,
        tokens: torch.Tensor,
        pooled: torch.Tensor | None,
        skipped: Sequence[str] = (),
    ) -> None:
        """Write one shard under a temporary name, then rename it into place; then its record."""
        if self._marker is None:
            raise VrlabError(
                f"the writer of store {self.path} is closed (finalized, failed or closed); "
                "make a new StoreWriter"
            )
        with self._releasing_on_error():
            dt = DTYPES[self.dtype]
            tensors = {"index": index.to(torch.int64).contiguous(), "tokens": tokens.to(dt).contiguous()}
            if pooled is not None:
                tensors["pooled"] = pooled.to(dt).contiguous()
            data = save(tensors, metadata={"skipped": json.dumps(list(skipped)), "key": self.key})
            record = {
                "file": shard_name(shard),
                "rows": len(tensors["index"]),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "key": self.key,
            }
            file = self.path / shard_name(shard)
            atomic_write_bytes(file, data)
            atomic_write_json(self.record_path(shard), record)
            self._verified[shard] = (_signature(file), record)

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.done(s)]

    def _contents(self, s: int) -> tuple[list[int], list[str], dict[str, list[int]]]:
        """Positions, skipped ids and row shapes (none for a fully skipped shard) of shard `s`."""
        file = self.path / shard_name(s)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    raise VrlabError(f"shard {file} belongs to another run; delete it and rerun")
                index = f.get_tensor("index").tolist()
                names = [k for k in ("tokens", "pooled") if index and k in f.keys()]  # noqa: SIM118
                shapes = {k: list(f.get_slice(k).get_shape())[1:] for k in names}
        except SafetensorError as exc:
            raise VrlabError(f"shard {file} cannot be read ({exc}); delete it and {REPAIR}") from None
        return index, json.loads(meta.get("skipped", "[]")), shapes

    def finalize(self, extra: Mapping[str, Any] | None = None) -> EmbeddingStore:
        """Check every shard is present, whole and consistent, then mark the manifest complete."""
        try:
            missing = self.missing()  # verifies each digest not verified yet (other ranks' shards)
            if missing:
                raise VrlabError(
                    f"store {self.path} cannot be completed: shards {missing} are missing (never written, or "
                    f"damaged and deleted); {REPAIR}"
                )
            stored, skipped, shards, shapes = [], [], [], {}
            for s in range(self.num_shards):
                index, shard_skipped, shard_shapes = self._contents(s)
                for key, shape in shard_shapes.items():
                    if shapes.setdefault(key, shape) != shape:
                        raise VrlabError(
                            f"shard {s} of {self.path} has {key} shape {shape}, expected {shapes[key]}"
                        )
                stored += [self.ids[i] for i in index]
                skipped += shard_skipped
                record = self._verified[s][1]
                shards.append(
                    {
                        "file": shard_name(s),
                        "rows": len(index),
                        "bytes": record["bytes"],
                        "sha256": record["sha256"],
                    }
                )
            with self._critical():
                manifest = self._manifest()
                if manifest.get("key") != self.key:
                    raise VrlabError(
                        f"the manifest of store {self.path} was replaced by another extraction (key "
                        f"{manifest.get('key')}, this one's is {self.key}); delete the folder and rerun"
                    )
                manifest.update(
                    complete=True,
                    stored_ids=stored,
                    skipped=skipped,
                    shards=shards,
                    shapes={"tokens": shapes.get("tokens"), "pooled": shapes.get("pooled")},
                    **dict(extra or {}),
                )
                atomic_write_json(self.path / "manifest.json", manifest)
        finally:
            self.close()
        return EmbeddingStore(self.path)


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
        key = self.manifest.get("key")
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
