"""The EmbeddingStore under faults: truncated, empty, bit-flipped and foreign shards, a damaged manifest,
writers racing on one folder (other settings are refused, ranks of one extraction are not), and stores
written before shards had digests. Most tests drive StoreWriter with fixed random tensors (no encoder)."""

import gc
import hashlib
import json
import logging
import threading
import time

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import decode_image
from vrlab.encoders.factory import build_encoder
from vrlab.errors import VrlabError
from vrlab.extract import extract, rank_shards
from vrlab.store import EmbeddingStore, StoreWriter, is_complete, shard_name, store_key

SETTINGS = {"encoder": "a", "layer": -2}
OTHER = {"encoder": "b", "layer": -2}
IDS = [f"img{i:02d}" for i in range(10)]
SHARD = 4  # shards of 4, 4 and 2 rows
_gen = torch.Generator().manual_seed(0)
TOKENS = torch.randn(len(IDS), 8, 16, generator=_gen)
POOLED = torch.randn(len(IDS), 16, generator=_gen)


@pytest.fixture(params=["filelock", "lmms-eval-patched"])
def filelocks(request, monkeypatch):
    """Store locks as filelock ships them, and after lmms-eval's evaluator has patched `FileLock(...)`
    process-wide into shared reentrant instances (it does so on every in-process evaluation)."""
    if request.param == "lmms-eval-patched":
        from filelock._api import FileLockMeta
        from lmms_eval import evaluator

        monkeypatch.setattr(FileLockMeta, "__call__", FileLockMeta.__call__)
        monkeypatch.setattr(evaluator._enable_reentrant_filelocks, "_patched", False, raising=False)
        evaluator._enable_reentrant_filelocks()


def write(writer: StoreWriter, shards=None) -> StoreWriter:
    for s in range(writer.num_shards) if shards is None else shards:
        r = writer.shard_range(s)
        writer.write_shard(s, torch.tensor(list(r)), TOKENS[r.start : r.stop], POOLED[r.start : r.stop])
    return writer


def complete_store(path, settings=SETTINGS) -> EmbeddingStore:
    return write(StoreWriter(path, settings, IDS, SHARD)).finalize()


def flip_middle(file, count=64) -> None:
    """Invert `count` bytes in the middle of the tensor data (after the safetensors header)."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    mid = (start + len(data)) // 2 - count // 2
    assert start <= mid and mid + count <= len(data)
    data[mid : mid + count] = bytes(b ^ 0xFF for b in data[mid : mid + count])
    file.write_bytes(bytes(data))


def test_a_truncated_shard_is_deleted_reported_and_extracted_again(tmp_path, caplog):
    path = tmp_path / "s"
    write(StoreWriter(path, SETTINGS, IDS, SHARD))  # a run that stopped before finalize
    shard = path / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:1000])
    again = StoreWriter(path, SETTINGS, IDS, SHARD)
    with caplog.at_level(logging.WARNING, logger="vrlab.store"):
        assert [again.done(s) for s in range(3)] == [True, False, True]
    assert "shard-00001.safetensors" in caplog.text and "truncated" in caplog.text
    assert not shard.exists() and again.missing() == [1]
    store = write(again, [1]).finalize()
    assert torch.equal(store.load(), TOKENS) and torch.equal(store.load("pooled"), POOLED)


def test_a_zero_byte_shard_is_not_done_and_the_reader_names_it(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    (path / shard_name(2)).write_bytes(b"")
    with pytest.raises(VrlabError, match=r"shard-00002\.safetensors has 0 bytes.*rerun the same extraction"):
        EmbeddingStore(path).load()
    again = StoreWriter(path, SETTINGS, IDS, SHARD)
    assert again.missing() == [2]
    assert torch.equal(write(again, [2]).finalize().load(), TOKENS)


def test_flipped_bytes_in_a_complete_store_are_refused_and_repaired(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    flip_middle(path / shard_name(1))
    store = EmbeddingStore(path)
    assert torch.equal(store.tokens(IDS[0]), TOKENS[0])  # shard 0 is intact
    with pytest.raises(VrlabError, match=r"shard-00001\.safetensors does not match the SHA-256"):
        store.tokens(IDS[5])
    with pytest.raises(VrlabError, match=r"shard-00001\.safetensors"):
        EmbeddingStore(path).load()
    again = StoreWriter(path, SETTINGS, IDS, SHARD)
    assert again.missing() == [1]
    assert not is_complete(path)  # readers are told to rerun until the shard is back
    repaired = write(again, [1]).finalize()
    assert torch.equal(repaired.load(), TOKENS) and torch.equal(repaired.load("pooled"), POOLED)


def test_rerunning_the_same_extraction_repairs_a_damaged_shard(registry, data_root, tmp_path):
    items = load_benchmark("synth-folder-train", data_root).items[:6]
    encoder = build_encoder(registry, "tiny/clip")
    path = tmp_path / "s"
    extract(encoder, items, path, {"t": 1}, shard_size=2, num_workers=0, progress=False)
    flip_middle(path / shard_name(1))
    store = extract(encoder, items, path, {"t": 1}, shard_size=2, num_workers=0, progress=False)
    direct = encoder.encode_images([decode_image(it.path) for it in items])
    torch.testing.assert_close(store.load(), direct.tokens)
    digest = hashlib.sha256((path / shard_name(1)).read_bytes()).hexdigest()
    assert store.manifest["shards"][1]["sha256"] == digest


def test_a_manifest_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    (path / "manifest.json").write_text('{"key": "abc", "compl')
    with pytest.raises(VrlabError, match=r"s/manifest\.json is damaged.*delete the folder"):
        StoreWriter(path, SETTINGS, IDS, SHARD)
    with pytest.raises(VrlabError, match=r"s/manifest\.json is damaged"):
        EmbeddingStore(path)
    with pytest.raises(VrlabError, match=r"s/manifest\.json is damaged"):
        is_complete(path)


def test_two_writers_with_different_settings_started_together_one_is_refused(tmp_path, filelocks):
    path, start = tmp_path / "s", threading.Barrier(2)
    outcome: dict[str, object] = {}

    def begin(name, settings):
        start.wait()
        try:
            outcome[name] = StoreWriter(path, settings, IDS, SHARD)
        except VrlabError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=begin, args=a) for a in (("a", SETTINGS), ("b", OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [n for n, v in outcome.items() if isinstance(v, VrlabError)]
    assert len(refused) == 1, outcome
    winner = "b" if refused == ["a"] else "a"
    assert str(path) in str(outcome[refused[0]])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == store_key(OTHER if winner == "b" else SETTINGS, IDS, SHARD, "float32")


def test_a_live_writer_of_other_settings_refuses_the_second_until_it_finishes(tmp_path, filelocks):
    path = tmp_path / "s"
    first = StoreWriter(path, SETTINGS, IDS, SHARD)
    with pytest.raises(VrlabError, match=r"another extraction is writing the store .*/s with other settings"):
        StoreWriter(path, OTHER, IDS, SHARD)
    write(first).finalize()  # releases the lock: what is left is a finished store of other settings
    with pytest.raises(VrlabError, match="holds different settings"):
        StoreWriter(path, OTHER, IDS, SHARD, lock_timeout=0.2)


def test_a_writer_waits_for_the_lock_only_lock_timeout_seconds(tmp_path, filelocks):
    path = tmp_path / "s"
    path.mkdir()
    held = FileLock(path / ".lock", thread_local=False)
    held.acquire()
    began = time.monotonic()
    with pytest.raises(VrlabError, match=r"another extraction is writing the store .*/s: its lock"):
        StoreWriter(path, SETTINGS, IDS, SHARD, lock_timeout=0.3)
    assert 0.3 <= time.monotonic() - began < 5
    held.release()
    assert torch.equal(write(StoreWriter(path, SETTINGS, IDS, SHARD)).finalize().load(), TOKENS)


def test_the_writer_lock_is_released_by_with_by_errors_and_by_garbage_collection(tmp_path):
    def second_is_told_the_folder_holds_other_settings(path):
        with pytest.raises(VrlabError, match="holds different settings"):
            StoreWriter(path, OTHER, IDS, SHARD, lock_timeout=0.2)

    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "a", SETTINGS, IDS, SHARD):
        raise RuntimeError("the encoder failed")
    second_is_told_the_folder_holds_other_settings(tmp_path / "a")

    failing = StoreWriter(tmp_path / "b", SETTINGS, IDS, SHARD)
    with pytest.raises(AttributeError):
        failing.write_shard(0, torch.arange(4), "not a tensor", None)
    second_is_told_the_folder_holds_other_settings(tmp_path / "b")
    with pytest.raises(VrlabError, match="is closed"):
        write(failing, [0])

    dropped = StoreWriter(tmp_path / "c", SETTINGS, IDS, SHARD)
    del dropped
    gc.collect()
    second_is_told_the_folder_holds_other_settings(tmp_path / "c")


def test_ranks_of_one_extraction_write_one_folder_at_once(tmp_path):
    path, start = tmp_path / "s", threading.Barrier(2)
    writers: dict[int, StoreWriter] = {}
    errors: list[BaseException] = []

    def rank(r):
        try:
            start.wait()
            writers[r] = StoreWriter(path, SETTINGS, IDS, SHARD)
            start.wait()
            write(writers[r], [s for s in rank_shards(3, r, 2) if not writers[r].done(s)])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = writers[0].finalize()  # rank 1's writer is still open: same key, no conflict
    assert torch.equal(store.load(), TOKENS) and store.ids == IDS
    for entry in store.manifest["shards"]:
        data = (path / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_reader_refuses_a_shard_whose_key_is_not_the_manifests(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    other = complete_store(tmp_path / "other", OTHER)  # same shapes, another key
    foreign = (tmp_path / "other" / shard_name(1)).read_bytes()
    (path / shard_name(1)).write_bytes(foreign)
    manifest = json.loads((path / "manifest.json").read_text())
    # the digest matches the file, so only the key check can catch the mix-up
    manifest["shards"][1].update(bytes=len(foreign), sha256=hashlib.sha256(foreign).hexdigest())
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        VrlabError,
        match=rf"shard-00001\.safetensors belongs to another extraction \(key {other.manifest['key']}",
    ):
        EmbeddingStore(path).load()
    assert StoreWriter(path, SETTINGS, IDS, SHARD).missing() == [1]


def _as_written_before_digests(path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"] = [{"file": e["file"], "rows": e["rows"]} for e in manifest["shards"]]
    (path / "manifest.json").write_text(json.dumps(manifest))
    for record in path.glob("*.sha256"):
        record.unlink()


def test_a_store_written_before_digests_is_read_adopted_and_checked(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    _as_written_before_digests(path)
    assert torch.equal(EmbeddingStore(path).load(), TOKENS)
    again = StoreWriter(path, SETTINGS, IDS, SHARD)
    assert again.missing() == []  # adopted, not extracted again
    store = again.finalize()
    for entry in store.manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256((path / entry["file"]).read_bytes()).hexdigest()

    _as_written_before_digests(path)
    shard = path / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(VrlabError, match=r"shard-00000\.safetensors has \d+ bytes but its header describes"):
        EmbeddingStore(path).load()
    assert StoreWriter(path, SETTINGS, IDS, SHARD).missing() == [0]


def test_a_shard_safetensors_cannot_open_is_named(tmp_path):
    path = tmp_path / "s"
    complete_store(path)
    _as_written_before_digests(path)
    header = json.dumps({"tokens": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (path / shard_name(2)).write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(VrlabError, match=r"shard-00002\.safetensors cannot be read"):
        EmbeddingStore(path).load()


def test_a_foreign_shard_in_the_folder_is_replaced_on_resume(tmp_path):
    path = tmp_path / "s"
    write(StoreWriter(path, SETTINGS, IDS, SHARD), [0, 1])  # a run that stopped before finalize
    stray = save(
        {"index": torch.arange(2) + 8, "tokens": TOKENS[8:], "pooled": POOLED[8:]}, {"key": "x" * 16}
    )
    (path / shard_name(2)).write_bytes(stray)  # left by another run, with no record
    again = StoreWriter(path, SETTINGS, IDS, SHARD)
    assert again.missing() == [2]
    assert torch.equal(write(again, [2]).finalize().load(), TOKENS)


def test_finalize_removes_temporary_files_a_killed_writer_left(tmp_path):
    writer = StoreWriter(tmp_path / "s", SETTINGS, IDS, SHARD)
    left = tmp_path / "s" / ".shard-00001.safetensors.sha256.x1y2z3.tmp"  # as a SIGKILL mid-write leaves it
    left.write_bytes(b"half a record")
    store = write(writer).finalize()
    assert not left.exists() and torch.equal(store.load(), TOKENS)
