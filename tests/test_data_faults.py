"""Bad data in, a clear error out: duplicate item ids, VisDA labels, decompression bombs."""

import time

import pytest
from PIL import Image

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import decode_image
from vrlab.data.loaders import VISDA_CLASSES, ImageFolderLoader, VisDALoader
from vrlab.errors import ImageDecodeError, VrlabError


def _img(path, size=(8, 8), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_two_files_under_one_item_id_are_refused_naming_both(tmp_path):
    a, b = _img(tmp_path / "train" / "cat" / "a.png"), _img(tmp_path / "train" / "cat" / "a.jpg")
    _img(tmp_path / "train" / "cat" / "c.png")
    loader = ImageFolderLoader(tmp_path, "train")
    with pytest.raises(VrlabError, match="share the item id 'cat/a'") as err:
        loader.check_ids()
    assert str(a) in str(err.value) and str(b) in str(err.value)
    card = tmp_path / "cards" / "dup.yaml"
    card.parent.mkdir()
    card.write_text(
        f"name: dup\n_target_: vrlab.data.loaders.ImageFolderLoader\nroot: {tmp_path}\nsplit: train\n"
    )
    with pytest.raises(VrlabError, match="share the item id 'cat/a'"):
        load_benchmark("dup", tmp_path, {"benchmark_dirs": [str(tmp_path / "cards")]})


def test_visda_classes_follow_labels_even_when_a_class_is_missing(tmp_path):
    root = tmp_path / "visda" / "train"
    _img(root / "aeroplane" / "1.jpg")
    _img(root / "truck" / "2.jpg")
    (root / "image_list.txt").write_text("aeroplane/1.jpg 0\ntruck/2.jpg 11\n")
    v = VisDALoader(tmp_path / "visda", "train")
    assert v.classes == list(VISDA_CLASSES)
    assert [v.classes[it.label] for it in v.items] == ["aeroplane", "truck"]  # was: label 11 of a 2-name list
    (root / "image_list.txt").write_text("aeroplane/1.jpg 0\ntruck/2.jpg 12\n")
    with pytest.raises(VrlabError, match=r"image_list.txt:2: label 12 is not a VisDA-2017 class"):
        VisDALoader(tmp_path / "visda", "train")


def test_a_decompression_bomb_is_refused_fast_naming_the_file(tmp_path):
    path = _img(tmp_path / "bomb.png", size=(6000, 6000), colour=(0, 0, 0))
    assert path.stat().st_size < 200_000  # small on disk, 36 megapixels decoded
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"bomb.png is 6000x6000 pixels.*data.max_pixels") as err:
        decode_image(path, max_pixels=10_000_000)
    assert time.perf_counter() - start < 1.0 and "bomb.png" in str(err.value)
    assert decode_image(path, max_pixels=None).shape == (3, 6000, 6000)


def test_pil_bomb_errors_become_decode_errors(tmp_path, monkeypatch):
    path = _img(tmp_path / "big.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL raises past twice its limit
    with pytest.raises(ImageDecodeError, match="big.png"):
        decode_image(path, max_pixels=None)


def test_a_jpeg_decodes_reduced_when_asked(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.effect_noise((1600, 1200), 40).convert("RGB").save(path, quality=90)
    full = decode_image(path)
    small = decode_image(path, reduce_to=300)
    assert full.shape == (3, 1200, 1600)
    assert small.shape[1:] < full.shape[1:] and max(small.shape[1:]) >= 300


def test_extraction_skips_a_bomb_under_skip_and_names_it_under_error(registry, tmp_path):
    from vrlab.data.loaders import Item
    from vrlab.encoders.factory import build_encoder
    from vrlab.extract import extract

    good = _img(tmp_path / "good.png", size=(32, 32))
    bomb = _img(tmp_path / "bomb.png", size=(3000, 3000), colour=(0, 0, 0))
    items = [Item("good", good, 0, {}), Item("bomb", bomb, 0, {})]
    encoder = build_encoder(registry, "tiny/clip")
    with pytest.raises(ImageDecodeError, match="bomb.png is 3000x3000 pixels"):
        extract(encoder, items, tmp_path / "e", {}, num_workers=1, max_pixels=1_000_000)
    store = extract(
        encoder, items, tmp_path / "s", {}, num_workers=1, max_pixels=1_000_000, on_bad_image="skip"
    )
    assert store.ids == ["good"] and store.skipped == ["bomb"]
