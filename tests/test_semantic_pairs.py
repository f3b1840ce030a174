"""Semantic correspondence pairs: two instances of a category whose keypoints are the same parts, placed by
the similarity transform between the two recorded poses, on the object as rendered; read by the SPair
loader and scored by C."""

import json

import numpy as np
import pytest
from PIL import Image

from vrlab.data.loaders import SPairLoader
from vrlab.data.scenes import COLOURS
from vrlab.data.semantic_pairs import write_semantic_spair


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic")
    n = write_semantic_spair(root, np.random.default_rng(0), 3, (64, 64))
    assert n == 2 * 3 * 6
    return root


def test_keypoints_follow_the_similarity_transform_between_the_poses(pairs_root):
    files = sorted((pairs_root / "PairAnnotation" / "test").glob("*.json"))
    assert len(files) == 18
    for f in files:
        pair = json.loads(f.read_text())
        src, trg = pair["instances"]["source"], pair["instances"]["target"]
        assert src["colour"] != trg["colour"]  # another instance, not the same scene warped
        (cxs, cys, rs, a_s), (cxt, cyt, rt, a_t) = src["pose"], trg["pose"]
        turn = a_t - a_s
        rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        expected = (np.array(pair["src_kps"]) - [cxs, cys]) @ rot.T * (rt / rs) + [cxt, cyt]
        np.testing.assert_allclose(np.array(pair["trg_kps"]), expected, atol=2e-3)
        assert abs(turn) <= 0.6 and len(pair["src_kps"]) >= 3


def test_keypoints_lie_on_the_rendered_object(pairs_root):
    for f in sorted((pairs_root / "PairAnnotation" / "test").glob("*.json")):
        pair = json.loads(f.read_text())
        for side, name in (("source", "src"), ("target", "trg")):
            inst = pair["instances"][side]
            if inst["style"] != "flat":
                continue  # photo style jitters the colour and blurs
            image = np.asarray(
                Image.open(pairs_root / "JPEGImages" / pair["category"] / pair[f"{name}_imname"])
            )
            cx, cy = inst["pose"][:2]
            for x, y in pair[f"{name}_kps"]:
                # inside each part, towards the centre, the nearest palette colour is the object's (JPEG aside)
                inward = 0.2 if pair["category"] == "ring" else 0.4  # a ring's hole starts at 0.55 r
                px, py = x + inward * (cx - x), y + inward * (cy - y)
                colour = image[round(py), round(px)].astype(float)
                nearest = min(COLOURS, key=lambda c: np.abs(colour - COLOURS[c]).sum())
                assert nearest == inst["colour"], (f.name, side, (x, y), colour)


def test_the_spair_loader_reads_them_and_c_runs(pairs_root, registry):
    from vrlab.encoders.factory import load_encoder
    from vrlab.extract import extract
    from vrlab.scores.correspondence import correspondence

    loader = SPairLoader(pairs_root, split="test")
    assert len(loader.pairs) == 18 and len(loader.items) == 36
    store = extract(
        load_encoder("tiny/clip", {"resize": "letterbox"}, registry=registry),
        loader.items,
        pairs_root / "store",
        {"k": 1},
        num_workers=0,
        progress=False,
    )
    result = correspondence(store, loader.pairs, "standard")
    assert 0 <= result["C"] <= 100 and result["n_pairs"] == 18
