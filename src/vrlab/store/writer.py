"""StoreWriter: creates or resumes a store under its locks, writes shards atomically, completes the manifest."""

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
from vrlab.runtime import atomic_write_bytes, atomic_write_json, library_versions, to_plain
from vrlab.store.format import (
    DTYPES,
    LOCK_NAME,
    LOCK_TIMEOUT,
    RECORD_SUFFIX,
    REPAIR,
    STORE_VERSION,
    WRITER_PREFIX,
    _signature,
    file_sha256,
    read_manifest,
    shard_name,
    shard_problem,
    store_key,
)
from vrlab.store.reader import EmbeddingStore


class StoreLock(FileLock):
    """A plain `FileLock`, of a class of vrlab's own.

    lmms-eval's evaluator (0.7.3) patches `FileLock(...)` process-wide to return one shared, reentrant
    instance per path; a store's locks would then stop excluding a second writer in the same process. The
    patch matches `filelock.FileLock` by identity, so a subclass keeps the real semantics.
    """


log = logging.getLogger(__name__)


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
        ragged: bool = False,
    ) -> None:
        self._marker: StoreLock | None = None  # first, so that __del__ works whatever fails below
        if dtype not in DTYPES:
            raise VrlabError(f"store dtype '{dtype}' is not one of {sorted(DTYPES)}")
        if shard_size < 1:
            raise VrlabError(f"shard_size={shard_size} must be positive")
        self.path = Path(path)
        self.ids, self.shard_size, self.dtype = list(ids), int(shard_size), dtype
        self.key = store_key(settings, self.ids, shard_size, dtype)
        self.lock_timeout = float(lock_timeout)
        self.ragged = bool(
            ragged
        )  # one token count per item (anyres, native): part of the settings, so the key
        self._verified: dict[int, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self.path.mkdir(parents=True, exist_ok=True)
        self._mutex = StoreLock(self.path / LOCK_NAME, timeout=self.lock_timeout, thread_local=False)
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
            marker = StoreLock(
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
            probe = StoreLock(marker, thread_local=False)
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
        tokens: torch.Tensor | Sequence[torch.Tensor],
        pooled: torch.Tensor | None,
        skipped: Sequence[str] = (),
        layouts: Sequence[Mapping[str, Any]] | None = None,
        layers: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        """Write one shard under a temporary name, then rename it into place; then its record.

        Ragged tokens (the anyres and native strategies) come as one `[n_i, D]` tensor per row with each row's
        layout: the shard holds them end to end (`tokens` `[sum n_i, D]`), with `offsets` `[rows + 1]` and the
        layouts in its metadata, so a row is still one memory-mapped slice.
        """
        if self._marker is None:
            raise VrlabError(
                f"the writer of store {self.path} is closed (finalized, failed or closed); "
                "make a new StoreWriter"
            )
        with self._releasing_on_error():
            dt = DTYPES[self.dtype]
            metadata = {"skipped": json.dumps(list(skipped)), "key": self.key}
            if layouts is not None:
                rows = list(tokens)
                if len(rows) != len(index) or len(layouts) != len(index):
                    raise VrlabError(
                        f"shard {shard} of {self.path}: {len(index)} rows but {len(rows)} token blocks and "
                        f"{len(layouts)} layouts"
                    )
                lengths = torch.tensor([0] + [len(t) for t in rows], dtype=torch.int64)
                flat = torch.cat(rows) if rows else torch.zeros(0, 0)
                tensors = {"index": index.to(torch.int64).contiguous(), "tokens": flat.to(dt).contiguous()}
                tensors["offsets"] = lengths.cumsum(0)
                metadata["layouts"] = json.dumps([to_plain(lay) for lay in layouts])
            else:
                tensors = {"index": index.to(torch.int64).contiguous(), "tokens": tokens.to(dt).contiguous()}
            if pooled is not None:
                tensors["pooled"] = pooled.to(dt).contiguous()
            for k, t in (layers or {}).items():  # extract.layers: each layer's tokens, read as a view
                tensors[f"tokens@{k}"] = t.to(dt).contiguous()
            data = save(tensors, metadata=metadata)
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
        """Positions, skipped ids and row shapes (none for a fully skipped shard) of shard `s`; a ragged
        shard's token shape is its width alone."""
        file = self.path / shard_name(s)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    raise VrlabError(f"shard {file} belongs to another run; delete it and rerun")
                index = f.get_tensor("index").tolist()
                names = [k for k in ("tokens", "pooled") if index and k in f.keys()]  # noqa: SIM118
                shapes = {k: list(f.get_slice(k).get_shape())[1:] for k in names}
                if index and ("offsets" in f.keys()) != self.ragged:  # noqa: SIM118
                    raise VrlabError(
                        f"shard {file} is {'ragged' if not self.ragged else 'not ragged'} unlike its store; "
                        f"delete it and {REPAIR}"
                    )
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
                # a writer killed mid-write leaves its temporary file (`.<name>.<random>.tmp`); every shard and
                # record is in place by now, so none of them is still being written
                for stale in self.path.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)
                manifest.update(
                    complete=True,
                    stored_ids=stored,
                    skipped=skipped,
                    shards=shards,
                    shapes={"tokens": shapes.get("tokens"), "pooled": shapes.get("pooled")},
                    ragged=self.ragged,
                    **dict(extra or {}),
                )
                atomic_write_json(self.path / "manifest.json", manifest)
        finally:
            self.close()
        return EmbeddingStore(self.path)
