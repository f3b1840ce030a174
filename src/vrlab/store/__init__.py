"""The EmbeddingStore: a folder of safetensors shards plus `manifest.json`, one per (benchmark, encoder config).

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

Modules: `format` (names, the key, records, checks), `writer` (StoreWriter), `reader` (EmbeddingStore).
"""

from vrlab.store.format import DTYPES, is_complete, shard_name, store_key
from vrlab.store.reader import EmbeddingStore
from vrlab.store.writer import StoreWriter

__all__ = ["DTYPES", "EmbeddingStore", "StoreWriter", "is_complete", "shard_name", "store_key"]
