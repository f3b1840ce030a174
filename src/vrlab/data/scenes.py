"""Procedurally rendered scenes: a few shape classes in a few colours on varied backgrounds.

Deterministic from a `numpy.random.Generator`. Each scene comes with its objects (class, colour, bounding box)
and a one-sentence description, which the generated benchmark turns into labels, keypoints and captions.
Two styles: `flat` (clean synthetic renders) and `photo` (textured backgrounds, shading, noise and blur),
the two domains of the VisDA-style split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}


@dataclass
class SceneObject:
    """One shape: class, colour name, bounding box (x0, y0, x1, y1) in pixels, and its polygon or circle."""

    shape: str
    colour: str
    bbox: tuple[float, float, float, float]
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    style: str

    @property
    def description(self) -> str:
        parts = [f"a {o.colour} {o.shape}" for o in self.objects]
        joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{'A photo' if self.style == 'photo' else 'A drawing'} of {joined}."


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline polygon of a shape centred at (cx, cy) with radius r, rotated by `angle` radians."""
    if shape in ("circle", "ring"):
        k = 32
        return [
            (cx + r * np.cos(angle + 2 * np.pi * i / k), cy + r * np.sin(angle + 2 * np.pi * i / k))
            for i in range(k)
        ]
    if shape == "square":
        base = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r / np.sqrt(2)
    elif shape == "triangle":
        base = [(np.cos(a), np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
        scale = r
    elif shape == "diamond":
        base = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
        scale = r
    elif shape == "cross":
        t = 0.35
        base = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
        scale = r
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in base]


def _background(rng: np.random.Generator, size: tuple[int, int], style: str) -> Image.Image:
    h, w = size
    c0, c1 = rng.integers(40, 230, 3), rng.integers(40, 230, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    arr = c0[None, None] * (1 - t) + c1[None, None] * t
    arr = np.broadcast_to(arr, (h, w, 3)).astype(np.float64)
    if style == "photo":
        # Low-frequency texture: smoothed noise, upsampled.
        coarse = rng.normal(0, 40, (max(2, h // 16), max(2, w // 16), 3))
        tex = np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        )
        arr = arr + (tex.astype(np.float64) - 128) * 0.8 + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_shape(
    draw: ImageDraw.ImageDraw,
    background: Image.Image,
    rng: np.random.Generator,
    shape: str,
    colour: str,
    pose: tuple[float, float, float, float],
    style: str,
) -> SceneObject:
    """Draw one shape at `pose` (centre x, centre y, radius, angle); photo style jitters its colour."""
    cx, cy, r, angle = pose
    w, h = background.size
    pts = shape_points(shape, cx, cy, r, angle)
    fill = np.array(COLOURS[colour])
    if style == "photo":
        fill = np.clip(fill * rng.uniform(0.7, 1.1) + rng.normal(0, 10, 3), 0, 255)
    draw.polygon(pts, fill=tuple(int(v) for v in fill), outline=(20, 20, 20) if style == "flat" else None)
    if shape == "ring":
        hole = background.getpixel((min(int(cx), w - 1), min(int(cy), h - 1)))
        draw.polygon(shape_points("circle", cx, cy, r * 0.55, 0.0), fill=hole)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return SceneObject(shape, colour, (min(xs), min(ys), max(xs), max(ys)), pts)


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (96, 128),
    n_objects: int | tuple[int, int] = (1, 3),
    style: str = "flat",
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Scene:
    """One random scene of `size` (h, w) with a number of non-overlapping-ish shapes."""
    h, w = size
    img = _background(rng, size, style)
    background = img.copy()
    draw = ImageDraw.Draw(img)
    count = n_objects if isinstance(n_objects, int) else int(rng.integers(n_objects[0], n_objects[1] + 1))
    objects: list[SceneObject] = []
    for _ in range(count):
        for _attempt in range(20):
            r = float(rng.uniform(0.12, 0.22) * min(h, w))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            if all(
                np.hypot(cx - (o.bbox[0] + o.bbox[2]) / 2, cy - (o.bbox[1] + o.bbox[3]) / 2) > 1.6 * r
                for o in objects
            ):
                break
        shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
        angle = float(rng.uniform(0, 2 * np.pi))
        objects.append(draw_shape(draw, background, rng, shape, colour, (cx, cy, r, angle), style))
    if style == "photo":
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return Scene(img, objects, style)


def write_demo_images(
    folder: str | Path, count: int = 8, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> list[Path]:
    """A handful of scenes as PNG files (half flat, half photo-like); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        scene = render_scene(rng, size=size, style="flat" if i % 2 == 0 else "photo")
        path = folder / f"scene_{i:03d}.png"
        scene.image.save(path)
        paths.append(path)
    return paths


# --- the generated benchmark, written in the real datasets' layouts -------------------------------------
