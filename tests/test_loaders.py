"""Loaders on small hand-written files in each dataset's own layout, and on the generated benchmark."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import decode_image
from vrlab.data.loaders import (
    COCOLoader,
    ImageFolderLoader,
    ImageListLoader,
    ImageNetCLoader,
    LlavaJsonLoader,
    SPairLoader,
    VisDALoader,
    VOCLoader,
)
from vrlab.data.synthetic import SHAPES, make_benchmark
from vrlab.errors import UnknownNameError, VrlabError


def img(path: Path, size=(20, 16), colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- hand-written fixtures -----------------------------------------------------------------------
def test_spair_layout(tmp_path):
    root = tmp_path / "SPair-71k"
    img(root / "JPEGImages" / "cat" / "a.jpg", (40, 30))
    img(root / "JPEGImages" / "cat" / "b.jpg", (50, 20))
    pair = {
        "category": "cat",
        "src_imname": "a.jpg",
        "trg_imname": "b.jpg",
        "src_imsize": [40, 30, 3],
        "trg_imsize": [50, 20, 3],
        "src_bndbox": [1, 2, 30, 25],
        "trg_bndbox": [0, 0, 49, 19],
        "src_kps": [[3, 4], [10.5, 12]],
        "trg_kps": [[5, 6], [7, 8]],
    }
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    (root / "PairAnnotation" / "test" / "000001-a-b:cat.json").write_text(json.dumps(pair))
    loader = SPairLoader(root, "test")
    assert [it.id for it in loader.items] == ["cat/a", "cat/b"]
    (p,) = loader.pairs
    assert (p.source, p.target, p.category) == ("cat/a", "cat/b", "cat")
    assert p.source_kps == [(3.0, 4.0), (10.5, 12.0)] and p.target_kps == [(5.0, 6.0), (7.0, 8.0)]
    assert p.source_bbox == (1, 2, 30, 25) and p.target_bbox == (0, 0, 49, 19) and p.target_size == (50, 20)
    del pair["trg_kps"]
    (root / "PairAnnotation" / "test" / "000001-a-b:cat.json").write_text(json.dumps(pair))
    with pytest.raises(VrlabError, match=r"000001-a-b:cat\.json lacks key 'trg_kps'"):
        SPairLoader(root, "test")


def voc_xml(objects):
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation>{objs}</annotation>"


def test_voc_layout_multilabel_and_difficult(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n")
    (root / "Annotations" / "000001.xml").write_text(voc_xml([("dog", 0), ("person", 0), ("dog", 1)]))
    (root / "Annotations" / "000002.xml").write_text(voc_xml([("cat", 1), ("bus", 0)]))
    for i in ("000001", "000002"):
        img(root / "JPEGImages" / f"{i}.jpg")
    loader = VOCLoader(tmp_path / "VOCdevkit", "test")
    assert len(loader.classes) == 20
    idx = {c: i for i, c in enumerate(loader.classes)}
    assert loader.items[0].label == sorted([idx["dog"], idx["person"]])
    assert loader.items[1].label == [idx["bus"]] and loader.items[1].meta["difficult"] == [idx["cat"]]
    (root / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(VrlabError, match=r"malformed XML in .*000002\.xml"):
        VOCLoader(tmp_path / "VOCdevkit", "test")


def test_coco_layout_maps_sparse_ids_to_80_style_indices(tmp_path):
    root = tmp_path / "coco"
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    data = {
        "categories": cats,
        "images": [
            {"id": 7, "file_name": "b.jpg"},
            {"id": 3, "file_name": "a.jpg"},
            {"id": 9, "file_name": "c.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 90},
            {"id": 2, "image_id": 3, "category_id": 1},
            {"id": 3, "image_id": 7, "category_id": 18},
            {"id": 4, "image_id": 7, "category_id": 18},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        img(root / "val2017" / name)
    loader = COCOLoader(root, "val2017")
    assert loader.classes == ["person", "dog", "toothbrush"]  # ordered by id, indexed 0..C-1
    assert [(it.id, it.label) for it in loader.items] == [("3", [0, 2]), ("7", [1]), ("9", [])]
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(VrlabError, match="malformed JSON in .*instances_val2017.json"):
        COCOLoader(root, "val2017")


def test_image_folder_visda_and_imagenet_c_layouts(tmp_path):
    for cls in ("b_dog", "a_cat"):
        for i in range(2):
            img(tmp_path / "folder" / "train" / cls / f"{i}.png")
    loader = ImageFolderLoader(tmp_path / "folder", "train")
    assert loader.classes == ["a_cat", "b_dog"]
    assert [(it.id, it.label) for it in loader.items] == [
        ("a_cat/0", 0),
        ("a_cat/1", 0),
        ("b_dog/0", 1),
        ("b_dog/1", 1),
    ]

    visda = tmp_path / "visda" / "validation"
    img(visda / "plane" / "x.jpg")
    img(visda / "car" / "y.jpg")
    (visda / "image_list.txt").write_text("plane/x.jpg 1\ncar/y.jpg 0\n")
    v = VisDALoader(tmp_path / "visda", "validation")
    # with a listing, classes are VisDA-2017's 12 official names indexed by label (folder names do not count)
    assert v.classes[:2] == ["aeroplane", "bicycle"] and len(v.classes) == 12
    assert [(it.id, it.label) for it in v.items] == [
        ("plane/x", 1),
        ("car/y", 0),
    ]
    (visda / "image_list.txt").write_text("plane/x.jpg one\n")
    with pytest.raises(VrlabError, match=r"image_list.txt:1"):
        VisDALoader(tmp_path / "visda", "validation")

    for corruption in ("fog", "gaussian_noise"):
        for sev in (1, 3):
            for cls in ("n01", "n02"):
                img(tmp_path / "inc" / corruption / str(sev) / cls / "z.JPEG")
    c = ImageNetCLoader(tmp_path / "inc", severities=[3])
    assert len(c) == 4 and {it.meta["severity"] for it in c.items} == {3}
    assert {(it.meta["corruption"], it.meta["category"]) for it in c.items} == {
        ("fog", "weather"),
        ("gaussian_noise", "noise"),
    }
    with pytest.raises(VrlabError, match=r"corruptions \['snow'\] not found"):
        ImageNetCLoader(tmp_path / "inc", corruptions=["snow"])


def test_llava_json_and_image_list(tmp_path):
    img(tmp_path / "images" / "a.png")
    samples = [
        {
            "id": "s1",
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}],
        },
        {
            "id": "t1",
            "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}],
        },
    ]
    (tmp_path / "c.json").write_text(json.dumps(samples))
    loader = LlavaJsonLoader(tmp_path, "c.json")
    assert [it.id for it in loader.items] == ["s1"] and len(loader.samples) == 2
    samples.append({"id": "s2", "image": "missing.png", "conversations": []})
    (tmp_path / "c.json").write_text(json.dumps(samples))
    with pytest.raises(VrlabError, match="image of sample s2 not found"):
        LlavaJsonLoader(tmp_path, "c.json")
    (tmp_path / "list.txt").write_text(f"images/a.png\n# comment\n{tmp_path / 'images' / 'a.png'}\n")
    assert len(ImageListLoader(tmp_path, "list.txt")) == 2


def test_benchmark_errors_name_the_culprit(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown benchmark 'spiar'.*spair"):
        load_benchmark("spiar", tmp_path)
    with pytest.raises(VrlabError, match=r"'spair'.*dataset root .*SPair-71k does not exist"):
        load_benchmark("spair", tmp_path)


# --- the generated benchmark ---------------------------------------------------------------------
@pytest.fixture
def generated(data_root):
    return data_root


def test_generated_benchmark_reads_through_every_card(generated):
    expected = {
        "synth-spair": 24,
        "synth-voc-trainval": 12,
        "synth-voc-test": 12,
        "synth-folder-train": 12,
        "synth-folder-test": 12,
        "synth-visda-train": 12,
        "synth-visda-validation": 12,
        "synth-imagenet-c": 6 * 75,
        "synth-captions": 6,
        "synth-conversations": 6,
        "synth-retrieval": 16,
    }
    for name, count in expected.items():
        loader = load_benchmark(name, generated)
        assert len(loader) == count, name
        assert all(it.path.exists() for it in loader.items)
    captions = load_benchmark("synth-retrieval", generated)
    assert len(captions.captions) == 32 and captions.caption_image == [i // 2 for i in range(32)]
    voc = load_benchmark("synth-voc-test", generated)
    assert voc.classes == list(SHAPES) and all(1 <= len(it.label) <= 3 for it in voc.items)


def test_generated_pairs_have_exact_keypoints(generated):
    """The target is the source under the recorded warp: warped keypoints match, and pixels agree."""
    loader = load_benchmark("synth-spair", generated)
    paths = {it.id: it.path for it in loader.items}
    for pair in loader.pairs:
        ann = json.loads(
            next(
                (generated / "synthetic/spair/PairAnnotation/test").glob(
                    f"*{Path(paths[pair.source]).stem}-*"
                )
            ).read_text()
        )
        warp = np.array(ann["warp"])
        src = np.array(pair.source_kps)
        mapped = (warp @ np.c_[src, np.ones(len(src))].T).T[:, :2]
        np.testing.assert_allclose(mapped, np.array(pair.target_kps), atol=1e-2)
        # A point inside the shape (mean of its keypoints) has the same colour in both images.
        s_img, t_img = decode_image(paths[pair.source]).float(), decode_image(paths[pair.target]).float()
        cs, ct = src.mean(0), mapped.mean(0)
        s_rgb = s_img[:, round(cs[1]), round(cs[0])]
        t_rgb = t_img[:, round(ct[1]), round(ct[0])]
        assert (s_rgb - t_rgb).abs().max() < 40, (pair.id, s_rgb, t_rgb)
        x0, y0, x1, y1 = pair.target_bbox
        assert all(x0 - 1e-3 <= x <= x1 + 1e-3 and y0 - 1e-3 <= y <= y1 + 1e-3 for x, y in pair.target_kps)


def test_generation_is_deterministic_and_seeded(tmp_path):
    sizes = {
        "voc_per_split": 2,
        "folder_per_class": 1,
        "visda_per_class": 1,
        "llava": 2,
        "spair_pairs_per_category": 1,
        "imagenet_c_per_class": 1,
    }
    a = make_benchmark(tmp_path / "a", seed=3, sizes=sizes)
    make_benchmark(tmp_path / "b", seed=3, sizes=sizes)
    make_benchmark(tmp_path / "c", seed=4, sizes=sizes)
    assert a["imagenet_c"] == 6 * 75
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    voc = Path("voc/VOC2007/JPEGImages/000001.jpg")
    assert (tmp_path / "a" / voc).read_bytes() != (tmp_path / "c" / voc).read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary folder, then renamed
