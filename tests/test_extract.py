"""EmbeddingStore and extraction: round trips against direct encoder calls, crash safety (SIGKILL and
resume), a 2-process torchrun run, bad images, projectors, and config-hash keyed folders."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vrlab.adapters import build_mlp, load_token_adapter
from vrlab.checkpoint import save_adapter
from vrlab.cli import run_task
from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import decode_image
from vrlab.data.loaders import Item
from vrlab.encoders.factory import build_encoder
from vrlab.errors import ImageDecodeError, ShapeError, VrlabError
from vrlab.extract import extract, rank_shards
from vrlab.store import EmbeddingStore, StoreWriter

VRLAB = Path(sys.executable).parent / "vrlab"


def env() -> dict[str, str]:
    return dict(os.environ) | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder_items(data_root):
    return load_benchmark("synth-folder-train", data_root).items


def test_store_round_trip_equals_direct_encoding(registry, folder_items, tmp_path):
    encoder = build_encoder(registry, "tiny/clip")
    store = extract(
        encoder, folder_items, tmp_path / "s", {"t": 1}, batch_size=5, shard_size=4, num_workers=0
    )
    assert len(store) == len(folder_items) == 12 and store.ids == [it.id for it in folder_items]
    assert len(store.manifest["shards"]) == 3 and store.manifest["complete"]
    direct = encoder.encode_images([decode_image(it.path) for it in folder_items])
    torch.testing.assert_close(store.load("tokens"), direct.tokens)
    torch.testing.assert_close(store.load("pooled"), direct.pooled)
    torch.testing.assert_close(store.tokens(folder_items[7].id), direct.tokens[7])
    torch.testing.assert_close(store.tokens(-1), direct.tokens[-1])
    batches = list(store.batches(batch_size=3))
    assert [len(ids) for ids, _ in batches] == [3, 1, 3, 1, 3, 1]  # per shard, never across shards
    torch.testing.assert_close(torch.cat([t for _, t in batches]), direct.tokens)
    with pytest.raises(VrlabError, match="not in store"):
        store.tokens("nope")


def test_workers_and_batch_size_do_not_change_the_store(registry, folder_items, tmp_path):
    encoder = build_encoder(registry, "tiny/dinov2")
    a = extract(encoder, folder_items, tmp_path / "a", {}, batch_size=12, shard_size=12, num_workers=0)
    b = extract(encoder, folder_items, tmp_path / "b", {}, batch_size=2, shard_size=5, num_workers=2)
    torch.testing.assert_close(a.load(), b.load(), atol=1e-5, rtol=1e-5)


def test_incomplete_store_is_refused_and_resumed(registry, folder_items, tmp_path):
    encoder = build_encoder(registry, "tiny/siglip")
    writer = StoreWriter(tmp_path / "s", {"x": 1}, [it.id for it in folder_items], shard_size=4)
    with pytest.raises(VrlabError, match=r"incomplete \(0/3 shards\)"):
        EmbeddingStore(tmp_path / "s")
    with pytest.raises(VrlabError, match="shards \\[0, 1, 2\\] are missing"):
        writer.finalize()
    store = extract(encoder, folder_items, tmp_path / "s", {"x": 1}, shard_size=4, num_workers=0)
    assert len(store) == 12
    with pytest.raises(VrlabError, match="holds different settings"):
        StoreWriter(tmp_path / "s", {"x": 2}, [it.id for it in folder_items], shard_size=4)
    with pytest.raises(VrlabError, match="no embedding store"):
        EmbeddingStore(tmp_path / "nothing")


def test_unreadable_image_errors_or_is_skipped_and_listed(registry, folder_items, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    items = [*folder_items[:3], Item("broken", bad), *folder_items[3:5]]
    encoder = build_encoder(registry, "tiny/clip")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        extract(encoder, items, tmp_path / "e", {}, shard_size=4, num_workers=0)
    store = extract(encoder, items, tmp_path / "k", {}, shard_size=4, num_workers=0, on_bad_image="skip")
    assert store.skipped == ["broken"] and "broken" not in store.ids and len(store) == 5
    direct = encoder.encode_images([decode_image(it.path) for it in folder_items[:5]])
    torch.testing.assert_close(store.load(), direct.tokens)


def test_a_shard_whose_images_are_all_skipped(registry, folder_items, tmp_path):
    bad = []
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"not a png")
        bad.append(Item(name, tmp_path / name))
    items = [*bad, *folder_items[:3]]  # shard 0 = the two broken files, shard 1 = real images
    encoder = build_encoder(registry, "tiny/clip")
    store = extract(encoder, items, tmp_path / "s", {}, shard_size=2, num_workers=0, on_bad_image="skip")
    assert store.skipped == ["a.png", "b.png"] and store.ids == [it.id for it in folder_items[:3]]
    assert store.manifest["shapes"]["tokens"] == [16, 64]
    direct = encoder.encode_images([decode_image(it.path) for it in folder_items[:3]])
    torch.testing.assert_close(store.load(), direct.tokens)
    torch.testing.assert_close(torch.cat([t for _, t in store.batches(2)]), direct.tokens)
    assert folder_items[0].id in store and "a.png" not in store


def test_projector_checkpoint_is_applied_and_checked(registry, folder_items, tmp_path):
    encoder = build_encoder(registry, "tiny/clip.tiny/dinov2")
    torch.manual_seed(0)
    proj = build_mlp("mlp2x_gelu", encoder.dim, 48)
    save_adapter(
        proj,
        tmp_path / "stage1",
        {"type": "mlp2x_gelu", "in_dim": 128, "out_dim": 48, "encoder": encoder.name},
    )
    loaded, config = load_token_adapter(tmp_path / "stage1", expect_in_dim=128)
    assert config["encoder"] == "tiny/clip.tiny/dinov2"
    store = extract(encoder, folder_items[:4], tmp_path / "s", {}, num_workers=0, adapter=loaded)
    with torch.no_grad():
        expected = proj(encoder.encode_images([decode_image(it.path) for it in folder_items[:4]]).tokens)
    torch.testing.assert_close(store.load(), expected)
    assert store.manifest["shapes"]["tokens"] == [16, 48]
    with pytest.raises(ShapeError, match=r"expects input width 128 .*'tiny/clip' gives 64"):
        load_token_adapter(tmp_path / "stage1", expect_in_dim=64, encoder="tiny/clip")


def test_extract_task_keys_the_folder_on_settings(compose_cfg, tiny_root, data_root, tmp_path):
    base = [
        "task=extract",
        "encoder=tiny/clip",
        "benchmark=synth-folder-test",
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        "extract.num_workers=0",
    ]
    first = run_task(compose_cfg(*base))
    again = run_task(compose_cfg(*base))
    other_layer = run_task(compose_cfg(*base, "+encoder_args.layer=-1"))
    assert first["path"] == again["path"] != other_layer["path"]
    assert first["items"] == 12 and first["shapes"]["tokens"] == [16, 64]
    manifest = json.loads((Path(first["path"]) / "manifest.json").read_text())
    assert manifest["settings"]["encoder"]["backend"]["layer"] == -2
    assert (
        manifest["settings"]["benchmark"]["spec"]["split"] == "test"
        and "root" not in manifest["settings"]["benchmark"]["spec"]
    )
    with pytest.raises(VrlabError, match="does not exist"):
        run_task(compose_cfg(*base[:2], "benchmark=voc07-test", *base[3:]))


def test_rank_shards_cover_everything_once():
    for n in (1, 5, 8, 13):
        for world in (1, 2, 3):
            got = [s for r in range(world) for s in rank_shards(n, r, world)]
            assert got == list(range(n))


def _extract_cmd(data_root, tiny_root, out, encoder="tiny/sd", benchmark="synth-imagenet-c", extra=()):
    return [
        "task=extract",
        f"encoder={encoder}",
        f"benchmark={benchmark}",
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        f"extract.out={out}",
        "extract.shard_size=16",
        "extract.batch_size=4",
        "extract.num_workers=0",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(data_root, tiny_root, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [str(VRLAB), *_extract_cmd(data_root, tiny_root, killed)],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(killed.glob("shard-*.safetensors"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    done = sorted(killed.glob("shard-*.safetensors"))
    assert not manifest["complete"] and 2 <= len(done) < manifest["num_shards"], "the kill must land mid-run"
    with pytest.raises(VrlabError, match="incomplete"):
        EmbeddingStore(killed)
    for shard in done:  # every file named like a shard is a complete, readable shard
        with safe_open(str(shard), framework="pt") as f:
            assert f.get_tensor("tokens").shape[0] == f.get_tensor("index").shape[0] == 16
    subprocess.run(
        [str(VRLAB), *_extract_cmd(data_root, tiny_root, killed)], env=env(), check=True, capture_output=True
    )
    subprocess.run(
        [str(VRLAB), *_extract_cmd(data_root, tiny_root, clean)], env=env(), check=True, capture_output=True
    )
    a, b = EmbeddingStore(killed), EmbeddingStore(clean)
    assert a.ids == b.ids and len(a) == 450
    assert torch.equal(a.load(), b.load())  # bit for bit
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(data_root, tiny_root, tmp_path, torchrun):
    one, two = tmp_path / "one", tmp_path / "two"
    args = _extract_cmd(
        data_root,
        tiny_root,
        None,
        encoder="tiny/clip.tiny/dinov2",
        benchmark="synth-voc-trainval",
        extra=("extract.shard_size=4",),
    )
    args = [a for a in args if not a.startswith("extract.out")]
    subprocess.run(
        [str(VRLAB), *args, f"extract.out={one}"], env=env(), check=True, capture_output=True, timeout=300
    )
    run = subprocess.run(
        [*torchrun, *args, f"extract.out={two}"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = EmbeddingStore(one), EmbeddingStore(two)
    assert a.ids == b.ids and len(a) == 12
    assert torch.equal(a.load(), b.load()) and torch.equal(a.load("pooled"), b.load("pooled"))
    assert b.manifest["num_shards"] == 3


def test_bad_image_in_a_real_layout_is_named(tmp_path, registry):
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    (folder / "bad.png").write_bytes(b"nope")
    from vrlab.data.loaders import ImageFolderLoader

    items = ImageFolderLoader(tmp_path / "folder").items
    with pytest.raises(ImageDecodeError, match=r"bad\.png"):
        extract(build_encoder(registry, "tiny/clip"), items, tmp_path / "s", {}, num_workers=1)
