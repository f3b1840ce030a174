"""One loader per dataset layout, each reading the dataset's own files: SPair-71k, PASCAL VOC2007, COCO,
ImageFolder, VisDA-2017 (train, validation, test), ImageNet-C, LLaVA-style JSON, and a plain list of image paths
(DeepFashion-MultiModal and ImageNet-1k with its devkit are in `vrlab.data.lmvr_sets`).

Every loader exposes `items` (one `Item` per image, in a fixed order, no id shared by two files), `classes`,
`task` and `split`; errors name the file and key at fault.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vrlab.data.images import IMAGE_SUFFIXES
from vrlab.errors import VrlabError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
VISDA_CLASSES = (
    "aeroplane",
    "bicycle",
    "bus",
    "car",
    "horse",
    "knife",
    "motorcycle",
    "person",
    "plant",
    "skateboard",
    "train",
    "truck",
)
IMAGENET_C_CATEGORIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}


@dataclass
class Item:
    """One image of a benchmark: a stable id, its file, its label (class index, list of indices, or None)."""

    id: str
    path: Path
    label: int | list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    """A correspondence pair (SPair-71k): keypoints [K, 2] in pixels of the original images, bboxes x0 y0 x1 y1."""

    id: str
    category: str
    source: str  # item id
    target: str
    source_kps: list[tuple[float, float]]
    target_kps: list[tuple[float, float]]
    source_bbox: tuple[float, float, float, float]
    target_bbox: tuple[float, float, float, float]
    source_size: tuple[int, int]  # (w, h)
    target_size: tuple[int, int]


def first_per_class(items: Sequence[Item], n: int | None) -> list[Item]:
    """The first `n` items of each label, in order (a documented subset); every item when `n` is falsy."""
    if not n:
        return list(items)
    seen: dict[Any, int] = {}
    kept = []
    for it in items:
        seen[it.label] = seen.get(it.label, 0) + 1
        if seen[it.label] <= n:
            kept.append(it)
    return kept


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise VrlabError(f"{what} not found: {path}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_need(path, "annotation file").read_text())
    except json.JSONDecodeError as exc:
        raise VrlabError(f"malformed JSON in {path}: {exc}") from exc


def _key(obj: dict[str, Any], key: str, path: Path) -> Any:
    if key not in obj:
        raise VrlabError(f"annotation file {path} lacks key '{key}'")
    return obj[key]


class Loader:
    """Base: `items`, `classes`, `task`, `split`, and `root`."""

    task = "images"

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise VrlabError(f"dataset root {self.root} does not exist (set VRLAB_DATA or the card's root)")
        self.classes: list[str] = []
        self.items: list[Item] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        return self.items[index]

    def check_ids(self) -> None:
        """Refuse two different files under one item id (`a.png` and `a.jpg` both become `a`): a store keyed
        by id would hold one of them under the other's name. Every loader calls it once `items` is built.

        One file under one id twice (a listing that repeats a line) is the same image, so it is allowed.
        """
        seen: dict[str, Path] = {}
        for item in self.items:
            first = seen.setdefault(item.id, item.path)
            if first is not item.path and str(first) != str(item.path):  # str: tar members too
                raise VrlabError(
                    f"two images share the item id '{item.id}': {first} and {item.path}; rename one of them"
                )

    def settings(self) -> dict[str, Any]:
        return {
            "loader": type(self).__name__,
            "split": self.split,
            "classes": self.classes,
            "n": len(self.items),
        }


class SPairLoader(Loader):
    """SPair-71k: `PairAnnotation/<split>/<pair>.json`, images in `JPEGImages/<category>/`."""

    task = "correspondence"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        categories: Sequence[str] | None = None,
        max_pairs: int | None = None,
    ) -> None:
        super().__init__(root, split)
        folder = _need(self.root / "PairAnnotation" / split, "SPair pair folder")
        files = sorted(folder.glob("*.json"))
        if not files:
            raise VrlabError(f"no pair annotations in {folder}")
        self.pairs: list[Pair] = []
        seen: dict[str, Item] = {}
        for path in files:
            ann = _read_json(path)
            cat = _key(ann, "category", path)
            if categories and cat not in categories:
                continue
            ids = []
            for side in ("src", "trg"):
                name = _key(ann, f"{side}_imname", path)
                image = self.root / "JPEGImages" / cat / name
                item_id = f"{cat}/{Path(name).stem}"
                if item_id not in seen:
                    seen[item_id] = Item(
                        item_id, _need(image, f"image of {path.name}"), None, {"category": cat}
                    )
                ids.append(item_id)
            src_kps, trg_kps = _key(ann, "src_kps", path), _key(ann, "trg_kps", path)
            if len(src_kps) != len(trg_kps):
                raise VrlabError(f"{path}: src_kps has {len(src_kps)} points but trg_kps has {len(trg_kps)}")
            w_s, h_s = _key(ann, "src_imsize", path)[:2]
            w_t, h_t = _key(ann, "trg_imsize", path)[:2]
            self.pairs.append(
                Pair(
                    id=path.stem,
                    category=cat,
                    source=ids[0],
                    target=ids[1],
                    source_kps=[tuple(map(float, p)) for p in src_kps],
                    target_kps=[tuple(map(float, p)) for p in trg_kps],
                    source_bbox=tuple(map(float, _key(ann, "src_bndbox", path))),
                    target_bbox=tuple(map(float, _key(ann, "trg_bndbox", path))),
                    source_size=(int(w_s), int(h_s)),
                    target_size=(int(w_t), int(h_t)),
                )
            )
            if max_pairs and len(self.pairs) >= max_pairs:
                break
        self.classes = sorted({p.category for p in self.pairs})
        self.items = list(seen.values())
        self.check_ids()


class VOCLoader(Loader):
    """PASCAL VOC: `ImageSets/Main/<split>.txt`, `Annotations/<id>.xml`, `JPEGImages/<id>.jpg`; multi-label.

    A class is positive when the image has at least one non-difficult object of it; classes present only as
    difficult objects are listed in `meta['difficult']` (the VOC07 evaluation ignores them).
    """

    task = "multilabel"

    def __init__(
        self, root: str | Path, split: str = "trainval", classes: Sequence[str] = VOC_CLASSES
    ) -> None:
        super().__init__(root, split)
        if (self.root / "VOC2007").is_dir():
            self.root = self.root / "VOC2007"
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        ids = _need(self.root / "ImageSets" / "Main" / f"{split}.txt", "VOC split file").read_text().split()
        for image_id in ids:
            xml = _need(self.root / "Annotations" / f"{image_id}.xml", "VOC annotation")
            try:
                tree = ET.parse(xml)
            except ET.ParseError as exc:
                raise VrlabError(f"malformed XML in {xml}: {exc}") from exc
            positive, difficult = set(), set()
            for obj in tree.findall("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in index:
                    raise VrlabError(f"{xml}: unknown class '{name}' (known: {', '.join(self.classes)})")
                (difficult if obj.findtext("difficult", "0").strip() == "1" else positive).add(index[name])
            image = _need(self.root / "JPEGImages" / f"{image_id}.jpg", "VOC image")
            self.items.append(
                Item(image_id, image, sorted(positive), {"difficult": sorted(difficult - positive)})
            )
        self.check_ids()


class COCOLoader(Loader):
    """COCO: `annotations/instances_<split>.json`, images in `<split>/`; multi-label over the categories present
    in the file (80 for COCO), indexed 0..C-1 in category-id order, not by the sparse ids (1..90)."""

    task = "multilabel"

    def __init__(self, root: str | Path, split: str = "val2017") -> None:
        super().__init__(root, split)
        path = self.root / "annotations" / f"instances_{split}.json"
        data = _read_json(path)
        cats = sorted(_key(data, "categories", path), key=lambda c: c["id"])
        self.classes = [c["name"] for c in cats]
        index = {c["id"]: i for i, c in enumerate(cats)}
        labels: dict[int, set[int]] = {}
        for ann in _key(data, "annotations", path):
            if ann["category_id"] not in index:
                raise VrlabError(
                    f"{path}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
                )
            labels.setdefault(ann["image_id"], set()).add(index[ann["category_id"]])
        for img in sorted(_key(data, "images", path), key=lambda im: im["id"]):
            file = _need(self.root / split / img["file_name"], "COCO image")
            self.items.append(Item(str(img["id"]), file, sorted(labels.get(img["id"], ())), {}))
        self.check_ids()


class ImageFolderLoader(Loader):
    """`<root>/<split>/<class>/<image>` (or `<root>/<class>/<image>` without a split); single-label."""

    task = "classification"

    def __init__(
        self, root: str | Path, split: str | None = None, classes: Sequence[str] | None = None
    ) -> None:
        super().__init__(root, split)
        base = _need(self.root / split, "split folder") if split else self.root
        self.classes = list(classes) if classes else sorted(p.name for p in base.iterdir() if p.is_dir())
        if not self.classes:
            raise VrlabError(f"no class folders in {base}")
        for i, cls in enumerate(self.classes):
            for file in sorted((base / cls).rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    self.items.append(
                        Item(f"{cls}/{file.relative_to(base / cls).with_suffix('')}", file, i, {})
                    )
        if not self.items:
            raise VrlabError(f"no images below {base}")
        self.check_ids()


class VisDALoader(ImageFolderLoader):
    """VisDA-2017 classification: `train/` (synthetic renders), `validation/` (real photos, COCO) and `test/`
    (real, YouTube-BB: `trunkNN/<hash>.jpg`); "path label" lines in `image_list.txt` fix the order and labels
    when present. The test download lists paths only; its labels are the organisers' released list (same
    format), named by `ground_truth` (a file in the split folder)."""

    def __init__(self, root: str | Path, split: str = "train", ground_truth: str | None = None) -> None:
        listing = Path(root) / split / (ground_truth or "image_list.txt")
        if not listing.exists() and not ground_truth:
            super().__init__(root, split)
            return
        Loader.__init__(self, root, split)
        base = self.root / split
        rows = [line.split() for line in _need(listing, "VisDA label list").read_text().splitlines()]
        rows = [row for row in rows if row]
        for n, row in enumerate(rows, 1):
            if len(row) == 1 and not ground_truth:
                raise VrlabError(
                    f"{listing}:{n}: a path without a label; the test split's labels are the released "
                    "ground-truth list: save it in the split folder and name it in the card's ground_truth"
                )
            if len(row) != 2 or not (row[1].isascii() and row[1].isdigit()):  # '²'.isdigit() is True
                raise VrlabError(f"{listing}:{n}: expected 'relative/path label', got {' '.join(row)!r}")
            if not 0 <= int(row[1]) < len(VISDA_CLASSES):
                raise VrlabError(
                    f"{listing}:{n}: label {row[1]} is not a VisDA-2017 class (0..{len(VISDA_CLASSES) - 1})"
                )
        # the official names, indexed by label: a list that lacks a class must not shift the others
        self.classes = list(VISDA_CLASSES)
        self.items = [
            Item(str(Path(rel).with_suffix("")), _need(base / rel, "VisDA image"), int(lbl), {})
            for rel, lbl in rows
        ]
        self.check_ids()


class ImageNetCLoader(Loader):
    """ImageNet-C: `<root>/<corruption>/<severity>/<class>/<image>`; single-label, with corruption and severity
    (and its category: noise, blur, weather, digital) in each item's meta."""

    task = "classification"

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | None = None,
        severities: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        max_per_class: int | None = None,
    ) -> None:
        super().__init__(root, None)
        self.max_per_class = max_per_class  # the first N images of each class in each cell (a subset)
        available = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        chosen = list(corruptions) if corruptions else available
        missing = [c for c in chosen if c not in available]
        if missing:
            raise VrlabError(f"corruptions {missing} not found in {self.root} (found: {available})")
        category = {c: cat for cat, names in IMAGENET_C_CATEGORIES.items() for c in names}
        for corruption in chosen:
            for sev_dir in sorted((self.root / corruption).iterdir()):
                if not sev_dir.name.isdigit() or (severities and int(sev_dir.name) not in severities):
                    continue
                folder = ImageFolderLoader(sev_dir, classes=classes)
                self.classes = self.classes or folder.classes
                if folder.classes != self.classes:
                    raise VrlabError(f"{sev_dir} has classes {folder.classes}, expected {self.classes}")
                meta = {
                    "corruption": corruption,
                    "severity": int(sev_dir.name),
                    "category": category.get(corruption, "other"),
                }
                self.items += [
                    Item(f"{corruption}/{sev_dir.name}/{it.id}", it.path, it.label, dict(meta))
                    for it in first_per_class(folder.items, max_per_class)
                ]
        self.check_ids()


class LlavaJsonLoader(Loader):
    """LLaVA-style JSON: a list of `{id, image?, conversations: [{from, value}, ...]}`; images relative to
    `image_folder`. `items` are the samples with an image; `samples` keeps every record, text-only ones too."""

    task = "instructions"

    def __init__(
        self, root: str | Path, file: str = "conversations.json", image_folder: str = "images"
    ) -> None:
        super().__init__(root, None)
        self.image_folder = str(image_folder)
        path = self.root / file
        data = _read_json(path)
        if not isinstance(data, list):
            raise VrlabError(f"{path} must hold a JSON list of samples")
        self.samples = data
        images_of: dict[str, Path] = {}
        for n, sample in enumerate(data):
            convs = _key(sample, "conversations", path)
            if not isinstance(convs, list) or not all({"from", "value"} <= set(c) for c in convs):
                raise VrlabError(
                    f"{path}: sample {n} ('{sample.get('id')}') needs conversations of {{from, value}}"
                )
            if "image" in sample:
                image = _need(
                    self.root / image_folder / sample["image"], f"image of sample {sample.get('id', n)}"
                )
                item_id = str(sample.get("id", n))
                # instruction mixtures reuse ids across sources; such a sample keeps its index in its id
                if images_of.setdefault(item_id, image) != image:
                    item_id = f"{item_id}@{n}"
                self.items.append(Item(item_id, image, None, {"sample": n}))
        self.check_ids()


class ImageListLoader(Loader):
    """A text file with one image path per line (relative to the file's folder unless absolute)."""

    def __init__(self, root: str | Path, file: str = "images.txt") -> None:
        super().__init__(root, None)
        listing = _need(self.root / file, "image list")
        for line in listing.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                path = Path(line.strip())
                path = path if path.is_absolute() else self.root / path
                self.items.append(Item(line.strip(), _need(path, f"image listed in {listing}")))
        self.check_ids()
