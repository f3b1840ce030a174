"""Bad data in, a clear error out: duplicate item ids, VisDA labels, decompression bombs."""

import time

import pytest
from PIL import Image

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import decode_image
from vrlab.data.loaders import VISDA_CLASSES, ImageFolderLoader, ImageListLoader, ImageNetCLoader, VisDALoader
from vrlab.errors import ImageDecodeError, VrlabError


def _img(path, size=(8, 8), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_two_files_under_one_item_id_are_refused_naming_both(tmp_path):
    a, b = _img(tmp_path / "train" / "cat" / "a.png"), _img(tmp_path / "train" / "cat" / "a.jpg")
    _img(tmp_path / "train" / "cat" / "c.png")
    with pytest.raises(VrlabError, match="share the item id 'cat/a'") as err:
        ImageFolderLoader(tmp_path, "train")  # built directly, not only through a card
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


def test_the_briefs_bomb_is_refused_by_vrlabs_cap_naming_the_setting(tmp_path):
    """A 9600x9600 PNG (11 KB on disk, 92 megapixels) is past PIL's warning threshold (89.5 MP): the refusal
    must still be vrlab's, naming data.max_pixels, not PIL's generic warning."""
    path = tmp_path / "huge.png"
    Image.new("1", (9600, 9600)).save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(
        ImageDecodeError, match=r"huge.png is 9600x9600 pixels, more than data.max_pixels=50000000"
    ):
        decode_image(path)


def test_raising_max_pixels_past_pils_warning_threshold_decodes(tmp_path, monkeypatch):
    path = _img(tmp_path / "wide.png", size=(300, 200), colour=(1, 2, 3))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 60,000 pixels: PIL warns, below twice: no error
    with pytest.raises(
        ImageDecodeError, match=r"wide.png is 300x200 pixels, more than data.max_pixels=55000"
    ):
        decode_image(path, max_pixels=55_000)
    out = decode_image(path, max_pixels=60_000)  # the explicit cap governs, PIL's warning threshold does not
    assert out.shape == (3, 200, 300) and out[:, 0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ImageDecodeError, match="wide.png"):
        decode_image(path, max_pixels=None)  # no vrlab cap: PIL's own threshold is the cap


def test_pils_hard_limit_says_what_to_do(tmp_path, monkeypatch):
    path = _img(tmp_path / "big.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageDecodeError, match=r"big.png.*MAX_IMAGE_PIXELS.*data.on_bad_image=skip"):
        decode_image(path, max_pixels=10**9)


def test_reduce_to_must_be_positive(tmp_path):
    path = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48)).save(path)
    with pytest.raises(VrlabError, match="reduce_to=-5"):
        decode_image(path, reduce_to=-5)


def test_listing_and_nested_loaders_refuse_duplicate_ids_when_built(tmp_path):
    visda = tmp_path / "visda" / "validation"
    _img(visda / "car" / "x.png")
    _img(visda / "car" / "x.jpg")
    (visda / "image_list.txt").write_text("car/x.png 3\ncar/x.jpg 3\n")
    with pytest.raises(VrlabError, match="share the item id 'car/x'"):
        VisDALoader(tmp_path / "visda", "validation")
    _img(tmp_path / "inc" / "fog" / "1" / "n01" / "z.JPEG")
    _img(tmp_path / "inc" / "fog" / "1" / "n01" / "z.png")
    with pytest.raises(VrlabError, match="share the item id 'n01/z'"):
        ImageNetCLoader(tmp_path / "inc")
    _img(tmp_path / "folder" / "cat" / "a.png")
    (tmp_path / "list.txt").write_text("folder/cat/a.png\nfolder/cat/a.png\n")
    assert len(ImageListLoader(tmp_path, "list.txt")) == 2  # one file listed twice: same image, same row


def test_visda_label_that_is_a_digit_but_not_a_number_is_named(tmp_path):
    root = tmp_path / "visda" / "train"
    _img(root / "car" / "1.jpg")
    (root / "image_list.txt").write_text("car/1.jpg \u00b2\n")  # superscript two: str.isdigit() says yes
    with pytest.raises(VrlabError, match=r"image_list.txt:1: expected 'relative/path label'"):
        VisDALoader(tmp_path / "visda", "train")


def test_a_phone_mpo_jpeg_decodes_reduced_when_asked(tmp_path):
    """Phones write multi-picture JPEGs (PIL's format 'MPO'); they decode at a reduced scale like any JPEG."""
    path = tmp_path / "phone.jpg"
    frame = Image.effect_noise((1600, 1200), 40).convert("RGB")
    frame.save(path, format="MPO", save_all=True, append_images=[frame.resize((160, 120))])
    assert Image.open(path).format == "MPO"
    small = decode_image(path, reduce_to=300)
    assert small.shape == (3, 300, 400)  # 1/4 scale: the smallest JPEG scale with a side >= 300


def test_llava_mixtures_that_reuse_an_id_keep_both_samples_apart(tmp_path):
    import json

    from vrlab.data.loaders import LlavaJsonLoader

    a, b = _img(tmp_path / "images" / "a.png"), _img(tmp_path / "images" / "b.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}]
    samples = [
        {"id": "7", "image": "a.png", "conversations": turns},
        {"id": "7", "image": "b.png", "conversations": turns},
    ]
    samples.append({"id": "7", "image": "a.png", "conversations": turns})  # the same image again: same id
    (tmp_path / "conversations.json").write_text(json.dumps(samples))
    loader = LlavaJsonLoader(tmp_path)
    assert [(it.id, it.path) for it in loader.items] == [("7", a), ("7@1", b), ("7", a)]
