"""Resolution strategies: AnyRes geometry against transformers' own helpers, ragged stores (round trip, resume
after a kill), C under anyres against C under fixed where they coincide, native aspect ratios, and the MLLM
training and exporting with anyres."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrlab.data.loaders import Item, Pair
from vrlab.encoders.factory import load_encoder
from vrlab.encoders.resolution import anyres_layout, native_grid, select_best_resolution, unpad_crop
from vrlab.errors import VrlabError
from vrlab.extract import extract
from vrlab.scores.correspondence import correspondence
from vrlab.store import EmbeddingStore

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's
SMALL = [[32, 64], [64, 32], [64, 64]]  # in tiles of the tiny tower's 32 px
SIZES = [(336, 336), (480, 640), (640, 480), (1000, 200), (200, 1000), (37, 911), (768, 1024), (333, 335)]


@pytest.mark.parametrize("size", SIZES)
def test_anyres_geometry_equals_transformers_helpers(size):
    from transformers.image_processing_utils import select_best_resolution as hf_best
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    assert select_best_resolution(size, PINPOINTS) == tuple(hf_best(size, PINPOINTS))
    layout, _, _ = anyres_layout(size, PINPOINTS, (336, 336), (24, 24))
    assert layout.tiles == tuple(get_anyres_image_grid_shape(size, PINPOINTS, 336))
    rows, cols = layout.tiles[0] * 24, layout.tiles[1] * 24
    grid = torch.arange(rows * cols, dtype=torch.float32).reshape(1, rows, cols)
    kept = unpad_image(grid, size)
    top, left, n_rows, n_cols = unpad_crop(size, (rows, cols))
    assert layout.views[1] == (n_rows, n_cols) == tuple(kept.shape[1:])
    assert torch.equal(kept, grid[:, top : top + n_rows, left : left + n_cols])
    # the token count the LLaVA-NeXT processor expands <image> to (its CLS-less count, newlines included)
    processor = object.__new__(LlavaNextProcessor)
    processor.patch_size, processor.num_additional_image_tokens = 14, 0
    processor.image_processor = type("P", (), {"image_grid_pinpoints": PINPOINTS})()
    assert layout.num_vision_tokens == processor._get_number_of_features(*size, 336, 336)


def test_native_grid_keeps_the_aspect_under_the_budget():
    for size, budget in [((480, 640), 576), ((1000, 200), 576), ((37, 911), 64), ((10, 10), 1)]:
        rows, cols = native_grid(size, budget)
        assert rows * cols <= budget and rows >= 1 and cols >= 1
        if min(rows, cols) > 2:
            assert abs(np.log((rows / cols) / (size[0] / size[1]))) < 0.35


def _images(root: Path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        path = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        items.append(Item(id=f"im{i}", path=path, label=None))
    return items


@pytest.fixture
def tiny(registry):
    def build(**args):
        return load_encoder("tiny/clip", args, registry=registry)

    return build


def test_ragged_store_round_trips(tiny, tmp_path):
    enc = tiny(resolution="anyres")
    items = _images(tmp_path, [(40, 90), (64, 64), (32, 32), (100, 30), (50, 50)])
    store = extract(
        enc, items, tmp_path / "s", {"k": 1}, batch_size=2, shard_size=2, num_workers=0, progress=False
    )
    assert store.ragged and len(store) == 5
    again = EmbeddingStore(tmp_path / "s")
    for i, item in enumerate(items):
        image = torch.from_numpy(np.array(Image.open(item.path))).permute(2, 0, 1)
        direct = enc.encode_images([image])
        assert torch.allclose(again.tokens(i), direct.per_image()[0], atol=1e-6)
        assert again.layout(i) == direct.layouts[0]
        assert len(again.tokens(i)) == direct.layouts[0].num_tokens
    assert len({len(again.tokens(i)) for i in range(5)}) > 2  # token counts differ per image
    with pytest.raises(VrlabError, match="tokens\\(i\\)"):
        again.load("tokens")


KILL_SCRIPT = """
import sys, time, torch
from vrlab.encoders.factory import load_encoder
from vrlab.extract import extract
from vrlab.store import StoreWriter
from vrlab.data.loaders import Item
from pathlib import Path
root = Path(sys.argv[1]); cards = sys.argv[2]
items = [Item(id=p.stem, path=p, label=None) for p in sorted(root.glob("im*.png"))]
enc = load_encoder("tiny/clip", {"resolution": "anyres"}, registry={"encoder_dirs": [cards]})
write = StoreWriter.write_shard
def slow(self, shard, *a, **k):
    write(self, shard, *a, **k)
    if shard == 1:
        print("WROTE", flush=True); time.sleep(60)
StoreWriter.write_shard = slow
extract(enc, items, root / "store", {"k": 1}, batch_size=2, shard_size=2, num_workers=0, progress=False)
"""


def test_ragged_store_resumes_after_a_kill(tiny, tiny_root, tmp_path):
    items = _images(tmp_path, [(40, 90), (64, 64), (32, 32), (100, 30), (50, 50), (70, 20)])
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(tiny_root / "cards")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == b"WROTE"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(VrlabError, match="incomplete"):
        EmbeddingStore(tmp_path / "store")
    done = {p.name for p in (tmp_path / "store").glob("shard-*.safetensors")}
    assert "shard-00001.safetensors" in done and "shard-00002.safetensors" not in done
    mtime = (tmp_path / "store" / "shard-00001.safetensors").stat().st_mtime_ns
    enc = tiny(resolution="anyres")
    store = extract(
        enc, items, tmp_path / "store", {"k": 1}, batch_size=2, shard_size=2, num_workers=0, progress=False
    )
    assert (tmp_path / "store" / "shard-00001.safetensors").stat().st_mtime_ns == mtime  # kept, not redone
    fresh = extract(
        enc, items, tmp_path / "fresh", {"k": 1}, batch_size=2, shard_size=2, num_workers=0, progress=False
    )
    for i in range(len(items)):
        assert torch.equal(store.tokens(i), fresh.tokens(i)) and store.layout(i) == fresh.layout(i)


def _pairs(items, rng):
    pairs = []
    for k in range(6):
        s, t = items[k % len(items)], items[(k + 1) % len(items)]
        kps = rng.uniform(2, 30, size=(5, 2)).tolist()
        pairs.append(
            Pair(
                id=f"p{k}",
                category="c",
                source=s.id,
                target=t.id,
                source_kps=kps,
                target_kps=rng.uniform(2, 30, size=(5, 2)).tolist(),
                source_bbox=(1.0, 1.0, 30.0, 28.0),
                target_bbox=(1.0, 1.0, 30.0, 28.0),
                source_size=(32, 32),
                target_size=(32, 32),
            )
        )
    return pairs


def test_c_under_anyres_equals_c_under_fixed_on_square_images(tiny, tmp_path):
    # square images at the tower's size: one tile, unpadded to itself, the same pixels as the fixed letterbox
    items = _images(tmp_path, [(32, 32)] * 4)
    pairs = _pairs(items, np.random.default_rng(1))
    fixed = extract(tiny(resize="letterbox"), items, tmp_path / "f", {"k": 1}, num_workers=0, progress=False)
    anyres = extract(
        tiny(resize="letterbox", resolution={"strategy": "anyres", "grid_pinpoints": [[32, 32], *SMALL]}),
        items,
        tmp_path / "a",
        {"k": 2},
        num_workers=0,
        progress=False,
    )
    for i in range(4):
        assert anyres.layout(i).tiles == (1, 1)
        assert torch.allclose(anyres.tokens(i)[16:], fixed.tokens(i), atol=1e-5)
    c_fixed, c_anyres = correspondence(fixed, pairs, "standard"), correspondence(anyres, pairs, "standard")
    assert c_anyres["resolution"] == "anyres" and c_fixed["resolution"] == "fixed"
    for alpha in ("pck@0.1", "pck@0.05"):
        assert c_anyres["summary"][alpha] == c_fixed["summary"][alpha]
    assert [r["pck@0.1"] for r in c_anyres["per_pair"]] == [r["pck@0.1"] for r in c_fixed["per_pair"]]
    with pytest.raises(VrlabError, match="law protocol is defined for one fixed grid"):
        correspondence(anyres, pairs, "law")


def test_c_under_anyres_places_keypoints_through_each_images_geometry(tiny, tmp_path):
    # a wide image: matching an image with itself puts every keypoint in its own cell of the unpadded tiles
    items = _images(tmp_path, [(40, 90)])
    store = extract(
        tiny(resize="letterbox", resolution="anyres"),
        items,
        tmp_path / "a",
        {"k": 3},
        num_workers=0,
        progress=False,
    )
    lay = store.layout(0)
    rng = np.random.default_rng(0)
    kps = np.stack([rng.uniform(0, 90, 20), rng.uniform(0, 40, 20)], 1).tolist()
    box = (0.0, 0.0, 90.0, 40.0)
    pair = Pair("p", "c", "im0", "im0", kps, kps, box, box, (90, 40), (90, 40))
    result = correspondence(store, [pair], "standard")
    assert result["summary"]["pck@0.1"]["per_image"] == 100.0
    # the frame maps the image onto the kept cells: its corners land inside, at most one cell outside
    corner = np.array([90.0, 40.0]) * np.array(lay.scale) + np.array(lay.offset)
    assert 0 <= corner[0] <= lay.frame[1] + 8 and 0 <= corner[1] <= lay.frame[0] + 8


def test_native_gives_each_image_its_own_grid(tiny, registry):
    enc = tiny(resolution={"strategy": "native", "max_tokens": 24})
    wide, square = torch.zeros(3, 40, 90, dtype=torch.uint8), torch.zeros(3, 64, 64, dtype=torch.uint8)
    feats = enc.encode_images([wide, square])
    assert [lay.views[0] for lay in feats.layouts] == [(3, 7), (4, 4)]
    assert feats.lengths == [21, 16] and feats.tokens.shape == (2, 21, 64)
    # images of one size run as one batch: the same tokens as one by one, in the order given
    other = torch.full((3, 40, 90), 200, dtype=torch.uint8)
    mixed = enc.encode_images([wide, square, other])
    for got, image in zip(mixed.per_image(), [wide, square, other], strict=True):
        torch.testing.assert_close(got, enc.encode_images([image]).per_image()[0])
    assert not torch.equal(mixed.per_image()[0], mixed.per_image()[2])
    with pytest.raises(VrlabError, match="not one of"):
        tiny(resolution="tiles")
    with pytest.raises(VrlabError, match="native needs a tower"):
        load_encoder("tiny/eva02-timm", {"resolution": "native"}, registry=registry)


def test_composites_keep_one_grid(registry):
    with pytest.raises(VrlabError, match="apply to single encoders"):
        load_encoder("tiny/clip.tiny/siglip", {"resolution": "anyres"}, registry=registry)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from vrlab.demo.tiny_llm import build_llm, default_corpus

    return build_llm(tmp_path_factory.mktemp("llm") / "llama", corpus=default_corpus())


@pytest.mark.slow
def test_stage1_and_stage2_train_with_anyres(compose_cfg, tiny_root, data_root, llm_dir, tmp_path):
    from conftest import task_args

    from vrlab.cli import run_task
    from vrlab.encoders.resolution import ResolutionEncoder
    from vrlab.mllm.model import VisionLanguageModel

    common = [
        *task_args(data_root, tiny_root / "cards", llm_dir, small_batches=True),
        "+encoder_args.resolution=anyres",
    ]
    s1 = run_task(
        compose_cfg(
            "task=train", "stage=1", "train.data=synth-captions", f"train.out={tmp_path / 's1'}", *common
        )
    )
    config = json.loads(Path(s1["saved"], "adapter_config.json").read_text())
    assert config["newline"] is True
    s2 = run_task(
        compose_cfg(
            "task=train",
            "stage=2",
            "train.data=synth-conversations",
            f"train.out={tmp_path / 's2'}",
            f"train.init_from={s1['saved']}",
            *common,
        )
    )
    assert all(np.isfinite(s1["losses"])) and all(np.isfinite(s2["losses"]))
    model = VisionLanguageModel.from_pretrained(s2["saved"])
    assert isinstance(model.encoder, ResolutionEncoder) and model.encoder.strategy == "anyres"
    # stage 2 started from stage 1's newline and trained it further
    from safetensors.torch import load_file

    stage1 = load_file(Path(s1["saved"]) / "adapter.safetensors")["image_newline"]
    assert not torch.equal(model.adapter.image_newline.detach(), stage1)
    # A tg or Q-Former adapter cannot follow a token count per image
    with pytest.raises(VrlabError, match="must map token by token"):
        VisionLanguageModel.build(
            "tiny/clip",
            str(llm_dir),
            {"type": "qformer", "num_queries": 4, "hidden": 32, "layers": 1, "heads": 4},
            registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
            encoder_args={"resolution": "anyres"},
        )


@pytest.mark.parametrize(
    "experiment,settings",
    [
        ("resolution", ["s224", "s336", "s448", "anyres"]),
        ("demo_resolution", ["s32", "s48", "s64", "anyres"]),
    ],
)
def test_the_resolution_study_sweeps_its_settings(compose_cfg, experiment, settings):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["study.setting"].split(",") == settings
    seen = set()
    for setting in settings:
        cfg = compose_cfg(f"experiment={experiment}", f"study.setting={setting}", "stage=1")
        args = OmegaConf.to_container(cfg.encoder_args, resolve=True)
        assert args == ({"resolution": "anyres"} if setting == "anyres" else {"image_size": int(setting[1:])})
        labels = {cfg.correspondence.label, cfg.alignment.label, cfg.eval.label}
        assert labels == {f"{cfg.encoder}@{setting}"} and cfg.correspondence.protocol == "standard"
        seen.add((cfg.train.out, cfg.checkpoint, cfg.alignment.adapter))
    assert len(seen) == len(settings)  # each setting trains and reads its own models


@pytest.fixture(scope="module")
def anyres_vlm(tiny_root, llm_dir):
    from vrlab.mllm.model import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.build(
        "tiny/clip",
        str(llm_dir),
        {"type": "mlp2x_gelu"},
        registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
        encoder_args={"resolution": "anyres"},
    ).eval()


def test_attention_maps_and_lmvr_features_under_anyres(anyres_vlm, photo_files, tmp_path):
    from conftest import decode_photo

    from vrlab.probes.attention import overlay, word_attention
    from vrlab.probes.lmvr import lmvr_batch, prompt_batch

    image = decode_photo(photo_files[0])  # 427 x 640: two tiles across, unpadded rows
    layout = prompt_batch(anyres_vlm, [image], "Hi")["pixel_values"].layouts[0]
    res = word_attention(anyres_vlm, image, "What is in the image?", layer=-1, max_new_tokens=6)
    assert res["maps"] and all(m.shape == layout.views[-1] for m in res["maps"].values())
    assert len(res["image_positions"]) == layout.views[-1][0] * layout.views[-1][1]  # newlines left out
    assert res["padded"] is False
    path = overlay(image, next(iter(res["maps"].values())), tmp_path / "m.png", "t", padded=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # LMVR rows: the encoder's mean is each image's own tokens' mean, not the padded batch's
    images = [image, decode_photo(photo_files[1])]
    out = lmvr_batch(anyres_vlm, images, "Describe it.", [-1], ["image"], ["mean"], ["before"], 2)
    feats = anyres_vlm.encoder(prompt_batch(anyres_vlm, images, "x")["pixel_values"])
    assert feats.lengths[0] != feats.lengths[1]
    for i, tokens in enumerate(feats.per_image()):
        torch.testing.assert_close(out["encoder"][i, 0], tokens.float().mean(0))


def test_c_flip_test_under_anyres(tiny, tmp_path):
    from vrlab.scores.correspondence import protocol_settings

    # the source is the target's mirror image: the flipped source is the target itself, so with the flip
    # test every keypoint (mirrored through the source's own layout) lands on its ground truth
    items = _images(tmp_path, [(40, 90)])
    image = torch.from_numpy(np.array(Image.open(items[0].path))).permute(2, 0, 1)
    mirror = tmp_path / "mirror.png"
    Image.fromarray(image.flip(-1).permute(1, 2, 0).numpy()).save(mirror)
    items.append(Item(id="mirror", path=mirror, label=None))
    enc = tiny(resize="letterbox", resolution="anyres")
    store = extract(enc, items, tmp_path / "a", {"k": 4}, num_workers=0, progress=False)
    images = {"im0": image, "mirror": image.flip(-1)}

    def flipped(item_id):
        return enc.encode_images([images[item_id].flip(-1)]).per_image()[0]

    rng = np.random.default_rng(0)
    kps = np.stack([rng.uniform(0, 89, 12), rng.uniform(0, 39, 12)], 1)
    target = np.stack([90 - kps[:, 0], kps[:, 1]], 1)
    box = (0.0, 0.0, 90.0, 40.0)
    pair = Pair("p", "c", "mirror", "im0", kps.tolist(), target.tolist(), box, box, (90, 40), (90, 40))
    flip = correspondence(store, [pair], protocol_settings("standard", flip=True), flipped)
    assert flip["per_pair"][0]["flipped"] is True
    assert flip["summary"]["pck@0.1"]["per_image"] == 100.0


@pytest.mark.parametrize("name", ["tiny/clip", "tiny/siglip", "tiny/dinov2", "tiny/dinov2-reg"])
def test_native_equals_the_tower_run_at_the_images_own_grid(registry, name):
    native = load_encoder(name, {"resolution": {"strategy": "native", "max_tokens": 24}}, registry=registry)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 40, 90), dtype=np.uint8))
    feats = native.encode_images([image])
    rows, cols = feats.layouts[0].views[0]
    assert (rows, cols) == (3, 7)
    direct = load_encoder(name, {"image_size": [rows * 8, cols * 8], "resize": "squash"}, registry=registry)
    torch.testing.assert_close(feats.per_image()[0], direct.encode_images([image]).tokens[0])


def test_a_compares_each_images_own_tokens(tiny, tmp_path):
    from vrlab.scores.alignment import store_alignment

    items = _images(tmp_path, [(40, 90), (64, 64), (100, 30)])
    bench = {"benchmark": {"name": "b"}}
    anyres = extract(tiny(resolution="anyres"), items, tmp_path / "a", bench, num_workers=0, progress=False)
    fixed = extract(tiny(), items, tmp_path / "f", bench, num_workers=0, progress=False)
    result = store_alignment(anyres, fixed)
    by_hand = []
    for i in range(3):  # mean over the candidate's tokens of the best cosine to any reference token, in NumPy
        c, r = anyres.tokens(i).double().numpy(), fixed.tokens(i).double().numpy()
        c, r = c / np.linalg.norm(c, axis=1, keepdims=True), r / np.linalg.norm(r, axis=1, keepdims=True)
        by_hand.append((c @ r.T).max(axis=1).mean())
    assert result["A"] == pytest.approx(float(np.mean(by_hand)), abs=1e-6)
