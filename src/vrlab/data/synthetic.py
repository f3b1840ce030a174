"""The generated benchmark: rendered scenes written in the real datasets' layouts (SPair-71k pairs under an exact
similarity warp, VOC multi-label scenes, ImageFolder classes, two VisDA domains, ImageNet-C copies, LLaVA
captions and conversations, the local lmms-eval tasks, a caption set in the Flickr30k/COCO Karpathy
retrieval layout, and LMVR's data sets from `vrlab.data.lmvr_synthetic`), deterministic from a seed. Scenes themselves come
from `vrlab.data.scenes`, their questions from `vrlab.data.questions`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vrlab.data.lmvr_synthetic import write_coco, write_deepfashion, write_imagenet, write_visda_test
from vrlab.data.questions import ONE_WORD, pick_question, scene_questions, write_lmms_tasks
from vrlab.data.scenes import COLOURS, SHAPES, Scene, SceneObject, render_scene, write_demo_images
from vrlab.data.semantic_pairs import write_semantic_spair
from vrlab.data.spair_layout import keypoints_of, write_layout, write_pair

__all__ = ["COLOURS", "SHAPES", "make_benchmark", "write_demo_images"]


# bumped whenever the generator's output changes: a benchmark written by another version is written again
GENERATOR_VERSION = 4
DEFAULT_SIZES = {
    "spair_pairs_per_category": 4,  # correspondence pairs (SPair-71k layout, test split)
    "semantic_pairs_per_category": 4,  # pairs of two instances of a category, at 64 px (synth-spair-semantic)
    "voc_per_split": 48,  # multi-label scenes per split (VOC2007 layout, trainval and test)
    "folder_per_class": 8,  # single-label images per class and split (ImageFolder layout, train and test)
    "visda_per_class": 8,  # per class and domain (VisDA-2017 layout, train = flat, validation = photo)
    "imagenet_c_per_class": 1,  # clean test images per class, each corrupted 15 x 5 times (ImageNet-C layout)
    "llava": 48,  # LLaVA JSON samples (captions and conversations share the images)
    "lmms": 48,  # questions of each local lmms-eval task (synth_vqa, synth_mc), on scenes of their own
    "lmms_per_kind": 48,  # questions of each per-kind task (synth_colour, _shape, _count, _position), at 64 px
    "captions": 64,  # images with a short and a long caption (retrieval and LLM2CLIP), on scenes of their own
    "coco_per_split": 24,  # multi-label scenes per split (COCO layout, train2017 and val2017)
    "visda_test_per_class": 4,  # photo-like scenes per class (VisDA-2017 test layout, labels apart)
    "imagenet_train_per_class": 8,  # ImageNet layout: train in class folders
    "imagenet_val_per_class": 2,  # ... and val flat with a devkit
    "deepfashion": 160,  # scenes with attribute files and captions (DeepFashion-MultiModal layout)
}


def _affine_warp(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random similarity transform (rotation, scale, shift) about the image centre, as a 3x3 matrix."""
    h, w = size
    angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.8, 1.15)
    tx, ty = rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.1, 0.1) * h
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    cx, cy = w / 2, h / 2
    return np.array([[c, -s, cx - c * cx + s * cy + tx], [s, c, cy - s * cx - c * cy + ty], [0, 0, 1]])


def warp_image(image: Image.Image, matrix: np.ndarray) -> Image.Image:
    """Apply `matrix` (source -> target pixel coordinates) to an image; uncovered pixels are grey."""
    inv = np.linalg.inv(matrix)
    return image.transform(
        image.size, Image.AFFINE, tuple(inv[:2].flatten()), resample=Image.BILINEAR, fillcolor=(128, 128, 128)
    )


def write_spair(root: Path, rng: np.random.Generator, pairs_per_category: int, size: tuple[int, int]) -> int:
    """Pairs in SPair-71k layout; the target is the source under a known warp, so keypoints are exact."""
    h, w = size
    names = []
    for cat in SHAPES:
        made = 0
        while made < pairs_per_category:
            scene = render_scene(rng, size, n_objects=1, style="flat", shapes=(cat,))
            obj = scene.objects[0]
            matrix = _affine_warp(rng, size)
            src_kps = keypoints_of(obj)
            trg_all = [tuple((matrix @ np.array([x, y, 1.0]))[:2]) for x, y in src_kps]
            keep = [i for i, (x, y) in enumerate(trg_all) if 0 <= x < w and 0 <= y < h]
            if len(keep) < 3:
                continue
            poly = np.array([(matrix @ np.array([x, y, 1.0]))[:2] for x, y in obj.points])
            write_pair(
                root,
                names,
                cat,
                (scene.image, warp_image(scene.image, matrix)),
                size,
                (obj.bbox, (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())),
                ([src_kps[i] for i in keep], [trg_all[i] for i in keep]),
                keep,
                warp=matrix.tolist(),
            )
            made += 1
    return write_layout(root, names)


def _voc_xml(image_id: str, scene: Scene, size: tuple[int, int]) -> str:
    h, w = size
    objs = "".join(
        f"<object><name>{o.shape}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{int(o.bbox[0])}</xmin><ymin>{int(o.bbox[1])}</ymin><xmax>{int(np.ceil(o.bbox[2]))}</xmax>"
        f"<ymax>{int(np.ceil(o.bbox[3]))}</ymax></bndbox></object>"
        for o in scene.objects
    )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>"
    )


def write_voc(root: Path, rng: np.random.Generator, per_split: int, size: tuple[int, int]) -> int:
    """Multi-label scenes (1-3 shapes) in VOC2007 layout; the shape names are the classes."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for split in ("trainval", "test"):
        ids = []
        for _ in range(per_split):
            n += 1
            image_id = f"{n:06d}"
            scene = render_scene(rng, size, n_objects=(1, 3), style="flat" if rng.random() < 0.5 else "photo")
            scene.image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, scene, size))
            ids.append(image_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return n


def write_image_folder(
    root: Path,
    rng: np.random.Generator,
    per_class: int,
    size: tuple[int, int],
    splits: dict[str, str],
    list_file: bool = False,
) -> int:
    """One shape per image, `<root>/<split>/<class>/`; `splits` maps split name to render style."""
    n = 0
    for split, style in splits.items():
        lines = []
        for label, cls in enumerate(SHAPES):
            for i in range(per_class):
                scene = render_scene(rng, size, n_objects=1, style=style, shapes=(cls,))
                rel = Path(cls) / f"{cls}_{i:04d}.png"
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                scene.image.save(root / split / rel)
                lines.append(f"{rel} {label}")
                n += 1
        if list_file:
            (root / split / "image_list.txt").write_text("\n".join(lines) + "\n")
    return n


def write_imagenet_c(root: Path, clean: Path, per_class: int, seed: int) -> int:
    """Corrupted copies of clean ImageFolder images: `<corruption>/<severity>/<class>/` (15 x 5)."""
    import inspect

    from imagecorruptions import corrupt, corruption_dict, get_corruption_names

    n = 0
    files = [(cls, sorted((clean / cls).glob("*.png"))[:per_class]) for cls in SHAPES]
    for c_index, corruption in enumerate(get_corruption_names("common")):
        for severity in range(1, 6):
            # Most corruptions draw from NumPy's global generator; glass_blur (numba) and impulse_noise
            # (skimage) have their own and take a seed argument instead.
            cell_seed = (seed * 1000 + c_index * 10 + severity) % 2**32
            np.random.seed(cell_seed)
            kwargs = (
                {"seed": cell_seed}
                if "seed" in inspect.signature(corruption_dict[corruption]).parameters
                else {}
            )
            for cls, paths in files:
                out = root / corruption / str(severity) / cls
                out.mkdir(parents=True, exist_ok=True)
                for path in paths:
                    arr = np.asarray(Image.open(path).convert("RGB"))
                    bad = np.uint8(
                        np.clip(corrupt(arr, corruption_name=corruption, severity=severity, **kwargs), 0, 255)
                    )
                    Image.fromarray(bad[: arr.shape[0], : arr.shape[1]]).save(
                        out / f"{path.stem}.JPEG", format="JPEG", quality=90
                    )
                    n += 1
    return n


def write_llava(root: Path, rng: np.random.Generator, count: int, size: tuple[int, int]) -> int:
    """Captions (stage-1 `plain` format) and question-answer conversations in LLaVA JSON, and `qa.json`: every
    one-word question each scene answers (the per-kind tasks' four kinds) and then its caption, one
    conversation per image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    captions, conversations, qa = [], [], []
    numbers = ["zero", "one", "two", "three"]
    for i in range(count):
        scene = render_scene(rng, size, n_objects=(1, 3), style="flat" if i % 2 == 0 else "photo")
        name = f"{i:05d}.png"
        scene.image.save(root / "images" / name)
        sid = f"synth-{i:05d}"
        captions.append(
            {
                "id": sid,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\n"},
                    {"from": "gpt", "value": scene.description},
                ],
            }
        )
        # every question, in a fixed order: no draw from `rng`, so the other files stay as they were
        turns = [
            turn
            for q in scene_questions(scene, size[1])
            for turn in (
                {"from": "human", "value": f"{q['question']} {ONE_WORD}"},
                {"from": "gpt", "value": q["answer"]},
            )
        ]
        turns[0]["value"] = f"<image>\n{turns[0]['value']}"
        # the caption last: a model trained on these keeps captioning, and no answer can be read off it
        turns += [
            {"from": "human", "value": "Describe the image."},
            {"from": "gpt", "value": scene.description},
        ]
        qa.append({"id": sid, "image": name, "conversations": turns})
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        k = len(scene.objects)
        one_word = pick_question(scene, size[1], rng)
        conversations.append(
            {
                "id": sid,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the image?"},
                    {"from": "gpt", "value": scene.description},
                    {"from": "human", "value": "How many shapes are there?"},
                    {
                        "from": "gpt",
                        "value": f"There {'is' if k == 1 else 'are'} {numbers[k]} shape{'s' if k > 1 else ''}.",
                    },
                    {"from": "human", "value": f"What colour is the {obj.shape}?"},
                    {"from": "gpt", "value": f"It is {obj.colour}."},
                    # the one-word answers the local lmms-eval tasks ask for
                    {"from": "human", "value": f"{one_word['question']} {ONE_WORD}"},
                    {"from": "gpt", "value": one_word["answer"]},
                ],
            }
        )
    conversations.append(
        {
            "id": "text-only-0",
            "conversations": [
                {"from": "human", "value": "Name a shape with three corners."},
                {"from": "gpt", "value": "A triangle."},
            ],
        }
    )
    (root / "captions.json").write_text(json.dumps(captions, indent=1))
    (root / "conversations.json").write_text(json.dumps(conversations, indent=1))
    (root / "qa.json").write_text(json.dumps(qa, indent=1))
    return count


def _where(obj: SceneObject, size: tuple[int, int]) -> str:
    h, w = size
    cx, cy = (obj.bbox[0] + obj.bbox[2]) / (2 * w), (obj.bbox[1] + obj.bbox[3]) / (2 * h)
    row = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    col = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    return "at the " + " ".join(p for p in (row, col) if p) if row or col else "in the middle"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def write_captions(root: Path, rng: np.random.Generator, count: int, size: tuple[int, int]) -> int:
    """Images with two captions each, `[{"image", "caption": [short, long]}]` (the retrieval layout).

    The short caption names the shapes and colours; the long one adds where each shape is and the style,
    as LLM2CLIP's short and dense captions differ in detail, not in subject.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        scene = render_scene(rng, size, n_objects=(1, 3), style="flat" if i % 2 == 0 else "photo")
        name = f"{i:05d}.png"
        scene.image.save(root / "images" / name)
        short = " and ".join(_a(f"{o.colour} {o.shape}") for o in scene.objects)
        parts = [f"{_a(o.colour)} {o.shape} {_where(o, size)}" for o in scene.objects]
        style = "A photo with a textured background" if scene.style == "photo" else "A flat drawing"
        count_words = ["no shapes", "one shape", "two shapes", "three shapes"]
        long = f"{style} showing {count_words[len(parts)]}: " + ", ".join(parts)
        records.append({"image": name, "caption": [short.capitalize() + ".", long + "."]})
    (root / "captions.json").write_text(json.dumps(records, indent=1))
    return count


def make_benchmark(
    root: str | Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: tuple[int, int] = (96, 128),
    overwrite: bool = False,
) -> dict[str, int]:
    """Write every layout under `root`, deterministically from `seed`; returns image counts per part.

    Written to a temporary sibling folder and renamed at the end, so an interrupted run never leaves a
    benchmark that looks complete.
    """
    import shutil

    root = Path(root)
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    done = root / "benchmark.json"
    if done.exists() and not overwrite:
        info = json.loads(done.read_text())
        if (
            info.get("generator") == GENERATOR_VERSION
            and info.get("seed") == seed
            and info.get("sizes") == sizes
            and info.get("image_size") == list(image_size)
        ):
            return info["counts"]
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {
        "spair": write_spair(
            tmp / "spair", np.random.default_rng([seed, 1]), sizes["spair_pairs_per_category"], image_size
        ),
        "spair_semantic": write_semantic_spair(
            tmp / "spair_semantic",
            np.random.default_rng([seed, 9]),
            sizes["semantic_pairs_per_category"],
            (64, 64),
        ),
        "voc": write_voc(tmp / "voc", np.random.default_rng([seed, 2]), sizes["voc_per_split"], image_size),
        "folder": write_image_folder(
            tmp / "folder",
            np.random.default_rng([seed, 3]),
            sizes["folder_per_class"],
            image_size,
            {"train": "flat", "test": "flat"},
        ),
        "visda": write_image_folder(
            tmp / "visda",
            np.random.default_rng([seed, 4]),
            sizes["visda_per_class"],
            image_size,
            {"train": "flat", "validation": "photo"},
            list_file=True,
        ),
        "llava": write_llava(tmp / "llava", np.random.default_rng([seed, 6]), sizes["llava"], image_size),
        "lmms": write_lmms_tasks(
            tmp / "lmms", np.random.default_rng([seed, 7]), sizes["lmms"], image_size, sizes["lmms_per_kind"]
        ),
        "captions": write_captions(
            tmp / "captions", np.random.default_rng([seed, 8]), sizes["captions"], image_size
        ),
    }
    counts["coco"] = write_coco(
        tmp / "coco", np.random.default_rng([seed, 10]), sizes["coco_per_split"], image_size
    )
    counts["visda_test"] = write_visda_test(
        tmp / "visda", np.random.default_rng([seed, 11]), sizes["visda_test_per_class"], image_size
    )
    counts["imagenet"] = write_imagenet(
        tmp / "imagenet",
        np.random.default_rng([seed, 12]),
        sizes["imagenet_train_per_class"],
        sizes["imagenet_val_per_class"],
        image_size,
    )
    counts["deepfashion"] = write_deepfashion(
        tmp / "deepfashion", np.random.default_rng([seed, 13]), sizes["deepfashion"], image_size
    )
    counts["imagenet_c"] = write_imagenet_c(
        tmp / "imagenet_c", tmp / "folder" / "test", sizes["imagenet_c_per_class"], seed
    )
    info = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "sizes": sizes,
        "image_size": list(image_size),
        "counts": counts,
        "classes": list(SHAPES),
    }
    (tmp / "benchmark.json").write_text(json.dumps(info, indent=1))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return counts
