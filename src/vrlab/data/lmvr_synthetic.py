"""The generated benchmark's parts for LMVR's tables, each in its real data set's published layout, so the
loaders read them exactly as they read the real files: COCO (sparse category ids), VisDA-2017's test split
(trunk folders, an unlabelled list, the labels in a separate ground-truth list), ImageNet (train in class
folders, val flat with a devkit whose `meta.mat` is not in sorted order) and DeepFashion-MultiModal
(attribute files with NA codes, captions).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from vrlab.data.scenes import COLOURS, SHAPES, render_scene


def write_coco(root: Path, rng: np.random.Generator, per_split: int, size: tuple[int, int]) -> int:
    """Multi-shape scenes in COCO layout; category ids 1, 3, 5, ... (sparse, as COCO's are)."""
    cats = [{"id": 2 * i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {c["name"]: c["id"] for c in cats}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    n = 0
    for split in ("train2017", "val2017"):
        images, anns = [], []
        (root / split).mkdir(parents=True, exist_ok=True)
        for _ in range(per_split):
            n += 1
            scene = render_scene(rng, size, n_objects=(1, 3), style="photo" if n % 2 else "flat")
            name = f"{n:012d}.jpg"
            scene.image.save(root / split / name, quality=95)
            images.append({"id": n, "file_name": name, "height": size[0], "width": size[1]})
            for obj in scene.objects:
                x0, y0, x1, y1 = obj.bbox
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": n,
                        "category_id": cat_id[obj.shape],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "iscrowd": 0,
                    }
                )
        data = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return n


def write_visda_test(root: Path, rng: np.random.Generator, per_class: int, size: tuple[int, int]) -> int:
    """VisDA-2017's test layout: `test/trunk01/<hash>.jpg`, `image_list.txt` with paths only (as the download
    has it) and `ground_truth.txt` with "path label" lines (as the organisers released the labels)."""
    paths, truth = [], []
    # the generator draws shapes; VisDA's first classes stand in for them, as the other VisDA splits do
    for label, shape in enumerate(SHAPES):
        for i in range(per_class):
            scene = render_scene(rng, size, n_objects=1, style="photo", shapes=(shape,))
            rel = f"trunk{1 + i % 2:02d}/{hashlib.md5(f'{shape}-{i}'.encode()).hexdigest()}.jpg"
            (root / "test" / rel).parent.mkdir(parents=True, exist_ok=True)
            scene.image.save(root / "test" / rel, quality=95)
            paths.append(rel)
            truth.append(f"{rel} {label}")
    order = rng.permutation(len(paths))  # the released list is in no class order
    (root / "test" / "image_list.txt").write_text("".join(f"{paths[k]}\n" for k in order))
    (root / "test" / "ground_truth.txt").write_text("".join(f"{truth[k]}\n" for k in order))
    return len(paths)


def write_imagenet(
    root: Path, rng: np.random.Generator, train_per_class: int, val_per_class: int, size: tuple[int, int]
) -> int:
    """`train/<class>/*.JPEG` and flat `val/ILSVRC2012_val_<n>.JPEG` with `ILSVRC2012_devkit_t12/data/`
    (`meta.mat` listing the classes in a shuffled order, and the ground truth as 1-based ids into it)."""
    from scipy.io import savemat

    n = 0
    for cls in SHAPES:
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            scene = render_scene(rng, size, n_objects=1, style="flat", shapes=(cls,))
            scene.image.save(root / "train" / cls / f"{cls}_{i:05d}.JPEG", quality=95)
            n += 1
    order = [SHAPES[k] for k in rng.permutation(len(SHAPES))]
    if order == sorted(order):  # the devkit's order must differ from the sorted one, or nothing is tested
        order = order[::-1]
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True, exist_ok=True)
    synsets = np.zeros(len(order), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, cls in enumerate(order):
        synsets[k] = (k + 1, cls, 0)
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    # the MAT header's 116 text bytes carry a creation time; a fixed text keeps the benchmark byte-identical
    header = b"MATLAB 5.0 MAT-file, written by vrlab's generated benchmark".ljust(116)
    (devkit / "meta.mat").write_bytes(header + buf.getvalue()[116:])
    labels = [cls for cls in SHAPES for _ in range(val_per_class)]
    labels = [labels[k] for k in rng.permutation(len(labels))]
    (root / "val").mkdir(parents=True, exist_ok=True)
    for k, cls in enumerate(labels, 1):
        scene = render_scene(rng, size, n_objects=1, style="flat", shapes=(cls,))
        scene.image.save(root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG", quality=95)
    ids = {cls: k + 1 for k, cls in enumerate(order)}
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for c in labels))
    return n + len(labels)


def write_deepfashion(root: Path, rng: np.random.Generator, count: int, size: tuple[int, int]) -> int:
    """DeepFashion-MultiModal's layout on single-shape scenes. Each attribute's value is read off the scene
    (shape, colour or style, modulo the attribute's number of values), or NA (about one in eight); the
    caption names shape, colour, fabric and pattern, so stage 2 on the captions teaches what the probes test."""
    from vrlab.data.lmvr_sets import DEEPFASHION_FABRIC, DEEPFASHION_PATTERN, DEEPFASHION_SHAPE

    for sub in ("image", "labels/shape", "labels/texture"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    colours = tuple(COLOURS)
    shape_rows, fabric_rows, pattern_rows, captions = [], [], [], {}
    for i in range(count):
        style = "photo" if rng.random() < 0.5 else "flat"
        scene = render_scene(rng, size, n_objects=1, style=style)
        obj = scene.objects[0]
        s, c, t = SHAPES.index(obj.shape), colours.index(obj.colour), int(style == "photo")
        name = f"WOMEN-Synth-id_{i:08d}-01_1_front.jpg"
        scene.image.save(root / "image" / name, quality=95)
        codes = []
        for k, values in enumerate(DEEPFASHION_SHAPE.values()):
            valid = sorted(values) if isinstance(values, dict) else list(range(len(values)))
            valid, na = valid[:-1], valid[-1]
            source = (s, c, s + t)[k % 3]
            codes.append(na if rng.random() < 0.125 else valid[source % len(valid)])
        fabric = [c % 7, (c + 1) % 7, 7 if rng.random() < 0.5 else (c + 2) % 7]
        pattern = [(s + 3 * t) % 7, (s + 1) % 7, 7 if rng.random() < 0.5 else s % 7]
        shape_rows.append(f"{name} {' '.join(map(str, codes))}")
        fabric_rows.append(f"{name} {' '.join(map(str, fabric))}")
        pattern_rows.append(f"{name} {' '.join(map(str, pattern))}")
        captions[name] = (
            f"{'A photo' if style == 'photo' else 'A drawing'} of a {obj.colour} {obj.shape}. The upper "
            f"clothes are {DEEPFASHION_FABRIC[fabric[0]]} with a {DEEPFASHION_PATTERN[pattern[0]]} pattern."
        )
    (root / "labels" / "shape" / "shape_anno_all.txt").write_text("\n".join(shape_rows) + "\n")
    (root / "labels" / "texture" / "fabric_ann.txt").write_text("\n".join(fabric_rows) + "\n")
    (root / "labels" / "texture" / "pattern_ann.txt").write_text("\n".join(pattern_rows) + "\n")
    (root / "captions.json").write_text(json.dumps(captions, indent=1))
    return count
