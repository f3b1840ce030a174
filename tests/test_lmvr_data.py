"""LMVR's data sets in their published layouts, written here by hand from each format: DeepFashion-MultiModal
(NA codes, the neckline list's missing code, the fixed split, captions as conversations), ImageNet val with the
devkit (ids in meta.mat order, not sorted WNIDs), VisDA-2017's test split with its separate labels; and the
attribute probes' NA handling."""

import numpy as np
import pytest
import torch
from PIL import Image

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.lmvr_sets import DeepFashionLoader, ImageNetLoader, in_test_split
from vrlab.data.loaders import VisDALoader
from vrlab.errors import VrlabError
from vrlab.probes.linear import attribute_probes


def _image(path, colour=(120, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


# --- DeepFashion-MultiModal --------------------------------------------------------------------------------
def _deepfashion(root, shape_rows, fabric_rows, pattern_rows, captions=None):
    for rows in (shape_rows, fabric_rows, pattern_rows):
        for line in rows:
            _image(root / "image" / line.split()[0])
    (root / "labels" / "shape").mkdir(parents=True)
    (root / "labels" / "texture").mkdir(parents=True)
    (root / "labels" / "shape" / "shape_anno_all.txt").write_text("\n".join(shape_rows) + "\n")
    (root / "labels" / "texture" / "fabric_ann.txt").write_text("\n".join(fabric_rows) + "\n")
    (root / "labels" / "texture" / "pattern_ann.txt").write_text("\n".join(pattern_rows) + "\n")
    if captions is not None:
        import json

        (root / "captions.json").write_text(json.dumps(captions))


def test_deepfashion_reads_codes_na_and_the_neckline_gap(tmp_path):
    # sleeve 5 = NA; neckline codes 0 1 2 4 5 6 (no 3), 7 = NA: code 4 ("standing") is the 4th value, index 3
    _deepfashion(
        tmp_path,
        ["MEN-a.jpg 1 3 0 1 2 0 1 0 1 4 1 0", "MEN-b.jpg 5 4 3 2 4 2 2 2 4 7 2 2"],
        ["MEN-a.jpg 0 1 7", "MEN-b.jpg 7 7 7"],
        ["MEN-a.jpg 3 2 7"],  # MEN-b has no pattern row: unknown, as NA
        {"MEN-a.jpg": "A man in a denim shirt.", "MEN-b.jpg": "Another one."},
    )
    df = DeepFashionLoader(tmp_path, split="all")
    a, b = (it.meta["attributes"] for it in df.items)
    assert a["sleeve_length"] == 1 and a["lower_length"] == 3 and a["glasses"] == 2
    assert a["neckline"] == 3 and df.values["neckline"][3] == "standing"
    assert a["fabric_upper"] == 0 and a["fabric_outer"] is None and a["pattern_upper"] == 3
    assert all(v is None for v in b.values())  # every code of b is its attribute's NA, or b has no row
    assert df.na_counts["sleeve_length"] == 1 and df.na_counts["fabric_outer"] == 2
    assert df.na_counts["pattern_upper"] == 1
    assert [s["conversations"][1]["value"] for s in df.samples] == ["A man in a denim shirt.", "Another one."]
    assert df.samples[0]["conversations"][0]["value"].startswith("<image>\n")
    assert df.groups["object"][0] == "sleeve_length" and len(df.groups["object"]) == 12


def test_deepfashion_split_is_fixed_by_name_and_disjoint(tmp_path):
    names = [f"WOMEN-{i}.jpg" for i in range(40)]
    _deepfashion(tmp_path, [f"{n} 0 0 0 0 0 0 0 0 0 0 0 0" for n in names], [f"{n} 0 0 0" for n in names], [])
    train, test = DeepFashionLoader(tmp_path, "train"), DeepFashionLoader(tmp_path, "test")
    ids = {it.id for it in train.items}, {it.id for it in test.items}
    assert not ids[0] & ids[1] and len(ids[0]) + len(ids[1]) == 40 and ids[1]
    assert ids[1] == {n[:-4] for n in names if in_test_split(n, 0.2)}


@pytest.mark.parametrize(
    ("shape_row", "match"),
    [
        ("MEN-a.jpg 1 3 0 1 2 0 1 0 1 3 1 0", r"shape_anno_all.txt:1: code 3 is not a value of 'neckline'"),
        ("MEN-a.jpg 1 3 0", r"shape_anno_all.txt:1: expected '<img_name>' and 12 integer codes"),
    ],
)
def test_deepfashion_refuses_codes_outside_the_definitions(tmp_path, shape_row, match):
    _deepfashion(tmp_path, [shape_row], ["MEN-a.jpg 0 1 7"], [])
    with pytest.raises(VrlabError, match=match):
        DeepFashionLoader(tmp_path, "all")


def test_deepfashion_names_an_annotated_image_that_is_missing(tmp_path):
    _deepfashion(tmp_path, [], ["MEN-a.jpg 0 1 7"], [])
    (tmp_path / "labels" / "texture" / "fabric_ann.txt").write_text("MEN-a.jpg 0 1 7\nMEN-gone.jpg 0 0 0\n")
    with pytest.raises(VrlabError, match="MEN-gone.jpg is annotated"):
        DeepFashionLoader(tmp_path, "all")


# --- attribute probes --------------------------------------------------------------------------------------
def test_attribute_probes_leave_na_rows_out_and_average_each_group():
    rng = np.random.default_rng(0)
    n = 120
    colour = rng.integers(0, 3, n)
    x = torch.tensor(np.eye(3)[colour] * 4 + rng.normal(0, 0.1, (n, 3)), dtype=torch.float32)
    # "a" follows the features exactly; "b" is NA on every third row; "c" has one value only (not probed)
    attrs = [{"a": int(c), "b": None if i % 3 == 0 else int(c), "c": 0} for i, c in enumerate(colour)]
    train, test = slice(0, 80), slice(80, None)
    res = attribute_probes(
        x[train],
        attrs[train],
        {"t": (x[test], attrs[test])},
        {"a": ["x", "y", "z"], "b": ["x", "y", "z"], "c": ["only", "other"]},
        {"g": ["a", "b", "c"]},
        weight_decays=[1e-3],
    )
    b = res["attributes"]["b"]
    assert b["train"]["n"] == sum(i % 3 != 0 for i in range(80)) and b["train"]["na_excluded"] == 27
    assert b["test"]["t"]["n"] + b["test"]["t"]["na_excluded"] == 40
    assert b["test"]["t"]["na_excluded"] == sum(i % 3 == 0 for i in range(80, 120))
    assert res["attributes"]["a"]["test"]["t"]["accuracy"] == pytest.approx(100.0)
    assert "c" in res["skipped"] and "c" not in res["attributes"]
    expected = np.mean([res["attributes"][k]["test"]["t"]["accuracy"] for k in ("a", "b")])
    assert res["test"]["t"]["g"] == pytest.approx(expected)


# --- ImageNet with the devkit ------------------------------------------------------------------------------
def _devkit(root, order, truth, non_leaf=None):
    from scipy.io import savemat

    rows = [(k + 1, w, 0) for k, w in enumerate(order)] + (
        [(len(order) + 1, non_leaf, 3)] if non_leaf else []
    )
    synsets = np.zeros(len(rows), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, r in enumerate(rows):
        synsets[k] = r
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))


def test_imagenet_flat_val_maps_devkit_ids_through_meta_mat_not_sorted_wnids(tmp_path):
    # meta.mat order: id 1 = n03, id 2 = n01, id 3 = n02 (id 4 is a non-leaf synset, not a class)
    _devkit(tmp_path, ["n03000000", "n01000000", "n02000000"], [1, 3, 2, 1, 2], non_leaf="n00000001")
    for k in (1, 2, 3, 4):  # image 5 is not on disk: a subset of the val images is allowed
        _image(tmp_path / "val" / f"ILSVRC2012_val_{k:08d}.JPEG")
    for w in ("n01000000", "n02000000", "n03000000"):
        _image(tmp_path / "train" / w / f"{w}_1.JPEG")
    val, train = ImageNetLoader(tmp_path, "val"), ImageNetLoader(tmp_path, "train")
    assert val.classes == train.classes == ["n01000000", "n02000000", "n03000000"]
    # ids 1, 3, 2, 1 -> n03, n02, n01, n03 -> sorted indices 2, 1, 0, 2
    assert [it.label for it in val.items] == [2, 1, 0, 2]
    assert [it.id for it in val.items] == [f"ILSVRC2012_val_{k:08d}" for k in (1, 2, 3, 4)]


def test_imagenet_val_in_class_folders_and_a_recorded_subset(tmp_path):
    for w in ("n02", "n01"):
        for i in range(3):
            _image(tmp_path / "val" / w / f"{i}.JPEG")
    val = ImageNetLoader(tmp_path, "val", max_per_class=2)
    assert val.classes == ["n01", "n02"] and [it.label for it in val.items] == [0, 0, 1, 1]
    assert val.settings()["max_per_class"] == 2


@pytest.mark.parametrize(
    ("truth", "match"),
    [
        ([1, 9], r"ILSVRC2012_validation_ground_truth.txt:2: '9' is not an ILSVRC2012 class id"),
        (None, "meta.mat"),
    ],
)
def test_imagenet_devkit_faults_name_the_file_and_line(tmp_path, truth, match):
    if truth is not None:
        _devkit(tmp_path, ["n01", "n02"], truth)
    _image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(VrlabError, match=match):
        ImageNetLoader(tmp_path, "val")


# --- VisDA-2017 test ---------------------------------------------------------------------------------------
def test_visda_test_takes_labels_from_the_released_list(tmp_path):
    rels = ["trunk01/ab12.jpg", "trunk02/cd34.jpg", "trunk01/ef56.jpg"]
    for rel in rels:
        _image(tmp_path / "test" / rel)
    (tmp_path / "test" / "image_list.txt").write_text("".join(f"{r}\n" for r in rels))
    (tmp_path / "test" / "ground_truth.txt").write_text(
        "trunk01/ab12.jpg 11\ntrunk02/cd34.jpg 0\ntrunk01/ef56.jpg 4\n"
    )
    test = VisDALoader(tmp_path, "test", ground_truth="ground_truth.txt")
    assert [(it.id, it.label) for it in test.items] == [
        ("trunk01/ab12", 11),
        ("trunk02/cd34", 0),
        ("trunk01/ef56", 4),
    ]
    assert test.classes[11] == "truck" and test.classes[4] == "horse"
    with pytest.raises(VrlabError, match=r"image_list.txt:1: a path without a label.*ground_truth"):
        VisDALoader(tmp_path, "test")


def test_generated_lmvr_parts_read_through_their_cards(data_root):
    df = load_benchmark("synth-deepfashion-test", data_root)
    assert df.task == "attributes" and df.items and all(it.label is None for it in df.items)
    val = load_benchmark("synth-imagenet-val", data_root)
    assert val.classes == load_benchmark("synth-imagenet-c", data_root).classes  # one probe reads both
    assert {it.label for it in val.items} == set(range(len(val.classes)))
    coco = load_benchmark("synth-coco-val", data_root)
    assert coco.task == "multilabel" and all(it.label for it in coco.items)
    visda = load_benchmark("synth-visda-test", data_root)
    assert len({it.label for it in visda.items}) == 6
