"""Semantic correspondence pairs in the SPair-71k layout: two different instances of one shape category.

The source and the target are separate renders: another colour, size, position and background (and style),
a rotation within `max_turn` of the source's. Keypoints are the shape's parts (its corners; evenly spaced
points on round shapes) in the same order on both, so keypoint k is the same part of each instance. This is
what C is meant to measure, as on SPair-71k; a scene matched with its own warp (`synth-spair`) rewards
pixel-local features instead. Each annotation records both poses, from which the target keypoints follow
by the similarity transform target = c_t + (r_t / r_s) R(a_t - a_s) (source - c_s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vrlab.data.scenes import COLOURS, SHAPES, SceneObject, _background, draw_shape
from vrlab.data.spair_layout import keypoints_of, write_layout, write_pair


def _instance(
    rng: np.random.Generator,
    size: tuple[int, int],
    shape: str,
    colour: str,
    r: float,
    angle: float,
    style: str,
) -> tuple[Image.Image, SceneObject, tuple[float, float, float, float]]:
    h, w = size
    m = 1.1 * r  # a cross's corners reach 1.06 r: every keypoint stays inside the image
    cx, cy = float(rng.uniform(m, w - m)), float(rng.uniform(m, h - m))
    background = _background(rng, size, style)
    image = background.copy()
    obj = draw_shape(ImageDraw.Draw(image), background, rng, shape, colour, (cx, cy, r, angle), style)
    return image, obj, (cx, cy, r, angle)


def write_semantic_spair(
    root: Path,
    rng: np.random.Generator,
    pairs_per_category: int,
    size: tuple[int, int],
    max_turn: float = 0.6,
) -> int:
    """`pairs_per_category` pairs per shape under `root` in SPair-71k's layout; returns the image count."""
    h, w = size
    names: list[str] = []
    colours = list(COLOURS)
    for cat in SHAPES:
        for _ in range(pairs_per_category):
            c_src = str(rng.choice(colours))
            c_trg = str(rng.choice([c for c in colours if c != c_src]))
            r_src = float(rng.uniform(0.22, 0.32) * min(h, w))
            r_trg = float(np.clip(r_src * rng.uniform(0.75, 1.3), 0.18 * min(h, w), 0.4 * min(h, w)))
            a_src = float(rng.uniform(0, 2 * np.pi))
            a_trg = a_src + float(rng.uniform(-max_turn, max_turn))
            styles = [str(rng.choice(["flat", "photo"])) for _ in range(2)]
            src_img, src, src_pose = _instance(rng, size, cat, c_src, r_src, a_src, styles[0])
            trg_img, trg, trg_pose = _instance(rng, size, cat, c_trg, r_trg, a_trg, styles[1])
            src_kps, trg_kps = keypoints_of(src), keypoints_of(trg)
            write_pair(
                root,
                names,
                cat,
                (src_img, trg_img),
                size,
                (src.bbox, trg.bbox),
                (src_kps, trg_kps),
                range(len(src_kps)),
                instances={
                    "source": {"colour": c_src, "pose": list(src_pose), "style": styles[0]},
                    "target": {"colour": c_trg, "pose": list(trg_pose), "style": styles[1]},
                },
            )
    return write_layout(root, names)
