"""Writing pairs in SPair-71k's layout, shared by the generated benchmark's pair sets (`synth-spair`, the
warped pairs, and `synth-spair-semantic`): images under `JPEGImages/<category>/`, one annotation JSON per
pair under `PairAnnotation/test/`, and the pair list `Layout/large/test.txt`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vrlab.data.scenes import SceneObject


def keypoints_of(obj: SceneObject) -> list[tuple[float, float]]:
    """Semantic keypoints of a shape: its polygon's corners (8 evenly spaced points on round shapes)."""
    return obj.points[::4] if obj.shape in ("circle", "ring") else list(obj.points)


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


def _r(points: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[round(float(x), 3), round(float(y), 3)] for x, y in points]


def write_pair(
    root: Path,
    names: list[str],
    category: str,
    images: tuple[Image.Image, Image.Image],
    size: tuple[int, int],
    bboxes: tuple[Sequence[float], Sequence[float]],
    kps: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]],
    kps_ids: Sequence[int],
    **extra: Any,
) -> None:
    """Save one pair's two images and its annotation (pair `len(names) + 1` of `category`); appends its name."""
    h, w = size
    k = sum(1 for n in names if n.endswith(f":{category}"))
    src_name, trg_name = f"{category}_{k:03d}_a.jpg", f"{category}_{k:03d}_b.jpg"
    save_jpeg(images[0], root / "JPEGImages" / category / src_name)
    save_jpeg(images[1], root / "JPEGImages" / category / trg_name)
    pair = {
        "pair_id": len(names) + 1,
        "category": category,
        "src_imname": src_name,
        "trg_imname": trg_name,
        "src_imsize": [w, h, 3],
        "trg_imsize": [w, h, 3],
        "src_bndbox": [round(float(v), 3) for v in bboxes[0]],
        "trg_bndbox": [round(float(v), 3) for v in bboxes[1]],
        "src_kps": _r(kps[0]),
        "trg_kps": _r(kps[1]),
        "kps_ids": [str(i) for i in kps_ids],
        **extra,
    }
    name = f"{len(names) + 1:06d}-{Path(src_name).stem}-{Path(trg_name).stem}:{category}"
    (root / "PairAnnotation" / "test").mkdir(parents=True, exist_ok=True)
    (root / "PairAnnotation" / "test" / f"{name}.json").write_text(json.dumps(pair, indent=1))
    names.append(name)


def write_layout(root: Path, names: Sequence[str]) -> int:
    """The pair list; returns the number of images written."""
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "Layout" / "large" / "test.txt").write_text("\n".join(names) + "\n")
    return 2 * len(names)
