"""Resolution strategies: how an image becomes tokens when its tower does not see one fixed square.

- `fixed` (the default): the card's transform, one grid per encoder.
- `anyres` (LLaVA-NeXT): the best-fitting resolution of `grid_pinpoints` is chosen for the image's size
  (`select_best_resolution`), the image is resized into it keeping its aspect ratio and padded centred, cut
  into tiles of the tower's input size, and a base view (the image squashed to that size) goes first. The
  tiles' tokens are joined into one map, which is unpadded back to the image's aspect ratio; the adapter
  appends a learned newline token after each row of that map, as transformers' `LlavaNext` does.
- `native`: the image resized to its own aspect ratio on the tower's patch step, with at most `max_tokens`
  patches (the base grid's count by default), for towers with interpolable or 2D-RoPE positions (CLIP,
  SigLIP, DINOv2/v3, SigLIP 2 NaFlex, Qwen2.5-VL's ViT through the transformers backend).

The token count then differs per image. Every image carries a `Layout`: its views (token grids, in order)
and the affine map from its pixels to the last view's frame, which is what C uses to place keypoints. The
geometry below is written from the definitions in LLaVA-NeXT and checked in the tests against transformers'
own helpers (`select_best_resolution`, `get_anyres_image_grid_shape`, `unpad_image`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vrlab.encoders.base import Features, ImageTransform, VisionEncoder
from vrlab.errors import ShapeError, VrlabError

STRATEGIES = ("fixed", "anyres", "native")
# LLaVA-NeXT's pinpoints in tiles of the tower's input size (336 px: 336x672, 672x336, 672x672, 1008x336, 336x1008)
DEFAULT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that keeps most of an image of `size` (h, w), then wastes least."""
    h, w = size
    best, best_effective, best_waste = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(ph), int(pw)), effective, waste
    if best is None:
        raise VrlabError("anyres needs at least one grid pinpoint")
    return best


def fit_size(size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """The (h, w) an image of `size` is resized to inside `target`, aspect kept (LLaVA-NeXT rounds up)."""
    h, w = size
    th, tw = target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def unpad_crop(size: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of a `grid` feature map that LLaVA-NeXT keeps for an image of `size` (h, w)."""
    h, w = size
    rows, cols = grid
    if w / h > cols / rows:
        new = int(round(h * (cols / w), 7))
        pad = (rows - new) // 2
        return pad, 0, rows - 2 * pad, cols
    new = int(round(w * (rows / h), 7))
    pad = (cols - new) // 2
    return 0, pad, rows, cols - 2 * pad


@dataclass(frozen=True)
class Layout:
    """Where one image's tokens come from, and where its pixels land in the last view.

    `views` are token grids concatenated in order (anyres: the base view, then the unpadded tile map).
    A pixel (x, y) of the original image lies at `(x * scale[0] + offset[0], y * scale[1] + offset[1])` in
    the last view's frame, a `frame` (h, w) pixel area whose cells are the view's tokens.
    """

    size: tuple[int, int]  # the original image (h, w)
    views: tuple[tuple[int, int], ...]
    frame: tuple[float, float]
    scale: tuple[float, float]
    offset: tuple[float, float]
    tiles: tuple[int, int] | None = None  # anyres: tiles down and across
    newline: bool = False  # the adapter appends a newline token after each row of the last view

    @property
    def num_tokens(self) -> int:
        return sum(h * w for h, w in self.views)

    @property
    def num_vision_tokens(self) -> int:
        """Tokens the LLM reads: the encoder's, plus one newline per row of the last view under anyres."""
        return self.num_tokens + (self.views[-1][0] if self.newline else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        def pair(v: Any) -> tuple:
            return tuple(v) if v is not None else None

        return cls(
            size=pair(d["size"]),
            views=tuple(tuple(v) for v in d["views"]),
            frame=pair(d["frame"]),
            scale=pair(d["scale"]),
            offset=pair(d["offset"]),
            tiles=pair(d.get("tiles")),
            newline=bool(d.get("newline", False)),
        )


def anyres_layout(
    size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: Sequence[int], grid: Sequence[int]
) -> tuple[Layout, tuple[int, int], tuple[int, int]]:
    """The layout of an image of `size` (h, w) under anyres, its best resolution and its resized size."""
    h, w = size
    best = select_best_resolution((h, w), pinpoints)
    tiles = (best[0] // tile[0], best[1] // tile[1])
    rows, cols = tiles[0] * grid[0], tiles[1] * grid[1]
    top, left, kept_rows, kept_cols = unpad_crop((h, w), (rows, cols))
    new_h, new_w = fit_size((h, w), best)
    cell_h, cell_w = tile[0] / grid[0], tile[1] / grid[1]
    paste_y, paste_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    layout = Layout(
        size=(h, w),
        views=(tuple(grid), (kept_rows, kept_cols)),
        frame=(kept_rows * cell_h, kept_cols * cell_w),
        scale=(new_w / w, new_h / h),
        offset=(paste_x - left * cell_w, paste_y - top * cell_h),
        tiles=tiles,
        newline=True,
    )
    return layout, best, (new_h, new_w)


def native_grid(size: Sequence[int], max_tokens: int) -> tuple[int, int]:
    """The patch grid (rows, cols) closest to an image's aspect ratio with at most `max_tokens` patches."""
    h, w = size
    s = math.sqrt(max_tokens / (h * w))
    rows, cols = max(1, math.floor(h * s)), max(1, math.floor(w * s))
    while rows * cols > max_tokens:  # only when one side was raised to 1
        rows, cols = (rows - 1, cols) if rows > cols else (rows, cols - 1)
    return rows, cols


@dataclass
class ImageViews:
    """Encoder input under anyres or native: per image, its views' pixels `[V, 3, h, w]`, and its layout."""

    pixels: list[torch.Tensor]
    layouts: list[Layout]

    def __len__(self) -> int:
        return len(self.layouts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageViews:
        return ImageViews([p.to(device, non_blocking=non_blocking) for p in self.pixels], self.layouts)

    @staticmethod
    def collate(items: Sequence[ImageViews]) -> ImageViews:
        return ImageViews([p for it in items for p in it.pixels], [lay for it in items for lay in it.layouts])


class ViewsTransform(nn.Module):
    """uint8 image(s) -> `ImageViews` under a strategy; the base transform supplies interpolation and
    normalisation (its own resize policy is replaced by the strategy's)."""

    def __init__(
        self, base: ImageTransform, strategy: str, grid: Sequence[int], step: Sequence[int], **options: Any
    ) -> None:
        super().__init__()
        self.base, self.strategy = base, strategy
        self.grid, self.step = tuple(grid), tuple(step)
        tiles = options.get("grid_pinpoints_tiles") or DEFAULT_TILES
        pinpoints = options.get("grid_pinpoints") or [[a * base.size[0], b * base.size[1]] for a, b in tiles]
        self.pinpoints = [[int(a), int(b)] for a, b in pinpoints]
        self.max_tokens = int(options.get("max_tokens") or self.grid[0] * self.grid[1])
        if strategy == "anyres":
            bad = [p for p in self.pinpoints if p[0] % base.size[0] or p[1] % base.size[1]]
            if bad:
                raise VrlabError(
                    f"resolution.grid_pinpoints {bad} are not multiples of the tower's input size "
                    f"{list(base.size)}: anyres cuts each into whole tiles"
                )

    @property
    def size(self) -> tuple[int, int]:
        return self.base.size

    def settings(self) -> dict[str, Any]:
        out = {**self.base.settings(), "strategy": self.strategy}
        if self.strategy == "anyres":
            out["grid_pinpoints"] = self.pinpoints
        else:
            out["max_tokens"] = self.max_tokens
        return out

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.base.mean[0]) / self.base.std[0]

    def one(self, image: torch.Tensor) -> ImageViews:
        x = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        h, w = x.shape[-2:]
        if self.strategy == "native":
            rows, cols = native_grid((h, w), self.max_tokens)
            size = (rows * self.step[0], cols * self.step[1])
            pixels = self.base._interpolate(x[None], size)
            layout = Layout(
                size=(h, w),
                views=((rows, cols),),
                frame=(float(size[0]), float(size[1])),
                scale=(size[1] / w, size[0] / h),
                offset=(0.0, 0.0),
            )
            return ImageViews([self._normalize(pixels)], [layout])
        layout, best, (new_h, new_w) = anyres_layout((h, w), self.pinpoints, self.base.size, self.grid)
        canvas = x.new_zeros(3, *best)  # padded with black before normalising, as LLaVA-NeXT's processor does
        top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
        canvas[:, top : top + new_h, left : left + new_w] = self.base._interpolate(x[None], (new_h, new_w))[0]
        th, tw = self.base.size
        tiles = [
            canvas[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            for i in range(layout.tiles[0])
            for j in range(layout.tiles[1])
        ]
        base = self.base._interpolate(x[None], self.base.size)[0]  # the whole image squashed, first
        return ImageViews([self._normalize(torch.stack([base, *tiles]))], [layout])

    def forward(self, image: torch.Tensor) -> ImageViews:
        if image.dim() == 3:
            return self.one(image)
        return ImageViews.collate([self.one(im) for im in image])


class ResolutionEncoder(VisionEncoder):
    """A registry encoder run under the `anyres` or `native` strategy; `Features.layouts` says per image where
    its tokens come from (tokens are padded to the batch's longest, `Features.lengths` gives each count)."""

    def __init__(self, base: VisionEncoder, strategy: str, **options: Any) -> None:
        super().__init__()
        from vrlab.encoders.hf import HFVisionEncoder

        if strategy not in ("anyres", "native"):
            raise VrlabError(f"resolution strategy '{strategy}' is not one of {STRATEGIES}")
        if not isinstance(base.transform, ImageTransform):
            raise VrlabError(
                f"resolution={strategy} applies to one encoder with an image transform; '{base.name}' has none "
                "(composites and diffusion encoders keep resolution=fixed)"
            )
        if strategy == "native" and not isinstance(base, HFVisionEncoder):
            raise VrlabError(
                f"resolution=native needs a tower with interpolable or 2D-RoPE positions through the "
                f"transformers backend; '{base.name}' is a {type(base).__name__}"
            )
        allowed = {"anyres": {"grid_pinpoints", "grid_pinpoints_tiles"}, "native": {"max_tokens"}}[strategy]
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise VrlabError(
                f"resolution option(s) {unknown} do not apply to {strategy}; it takes {sorted(allowed)}"
            )
        self.base, self.strategy = base, strategy
        grid = base.grid
        step = (base.image_size[0] // grid[0], base.image_size[1] // grid[1])
        self.transform = ViewsTransform(base.transform, strategy, grid, step, **options)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.base.image_size

    def _shape(self) -> tuple[int, tuple[int, int]]:
        return self.base.dim, self.base.grid

    def backend_settings(self) -> dict[str, Any]:
        return {**self.base.backend_settings(), "resolution": self.strategy}

    def example_input(self, batch: int = 1, device: torch.device | str = "cpu") -> Any:
        image = torch.zeros(3, *self.image_size, dtype=torch.uint8)
        return ImageViews.collate([self.transform(image)] * batch).to(device)

    def forward(self, views: ImageViews) -> Features:
        if not isinstance(views, ImageViews):
            raise ShapeError(
                f"encoder '{self.name}' (resolution={self.strategy}) takes the ImageViews of its own transform"
            )
        per_image, pooled = [], []
        if self.strategy == "anyres":  # every view has the tower's input size: one batch
            counts = [len(p) for p in views.pixels]
            out = self.base(torch.cat(views.pixels))
            chunks = out.tokens.split(counts)
            firsts = torch.tensor([0, *counts[:-1]]).cumsum(0)
            pooled_all = out.pooled[firsts] if out.pooled is not None else None
            for chunk, lay in zip(chunks, views.layouts, strict=True):
                gh, gw = lay.views[0]
                th, tw = lay.tiles
                tiles = chunk[1:].reshape(th, tw, gh, gw, -1).permute(0, 2, 1, 3, 4)
                tiles = tiles.reshape(th * gh, tw * gw, -1)
                top, left, rows, cols = unpad_crop(lay.size, (th * gh, tw * gw))
                hires = tiles[top : top + rows, left : left + cols].reshape(rows * cols, tiles.shape[-1])
                per_image.append(torch.cat([chunk[0], hires]))
            pooled = pooled_all
        else:  # native: images of one size run as one batch
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(views.pixels):
                groups.setdefault(tuple(p.shape), []).append(i)
            tokens: list[Any] = [None] * len(views)
            pooled_rows: list[Any] = [None] * len(views)
            for members in groups.values():
                out = self.base(torch.cat([views.pixels[i] for i in members]))
                for k, i in enumerate(members):
                    tokens[i] = out.tokens[k]
                    pooled_rows[i] = out.pooled[k] if out.pooled is not None else None
            per_image = tokens
            pooled = torch.stack(pooled_rows) if all(p is not None for p in pooled_rows) else None
        return Features.ragged(per_image, views.layouts, pooled)
