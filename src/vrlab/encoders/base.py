"""The encoder contract every backend implements: `Features`, the image transform and `VisionEncoder`.

A `VisionEncoder` is an `nn.Module` with a `transform` (uint8 image tensor -> model input, itself a module so
it can run batched on the device), `forward(pixels) -> Features`, and the properties `dim`, `grid`,
`image_size` and `card`. Tokens are always `[B, N, D]` in raster order over `grid = (h, w)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vrlab.errors import ShapeError, VrlabError

if TYPE_CHECKING:
    from vrlab.registry import EncoderCard

# Per-channel statistics of the published preprocessors. `diffusion` maps [0, 1] to [-1, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "diffusion": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
RESIZE_POLICIES = ("squash", "letterbox", "center_crop")


@dataclass
class Features:
    """What an encoder returns: patch tokens in raster order over `grid`, and an optional pooled vector.

    Under the `anyres` and `native` resolution strategies the count differs per image: `layouts` holds each
    image's `vrlab.encoders.resolution.Layout`, `tokens` is zero-padded to the longest and `lengths` gives
    each image's count; `per_image()` returns the unpadded tokens either way.
    """

    tokens: torch.Tensor  # [B, N, D], N = h * w (ragged: the longest image's count)
    grid: tuple[int, int]
    pooled: torch.Tensor | None = None  # [B, D'] or None
    layouts: list[Any] | None = None
    lengths: list[int] | None = None
    layers: dict[int, torch.Tensor] | None = None  # more hidden layers' tokens, when `record_layers` asks

    def __post_init__(self) -> None:
        h, w = self.grid
        n = max(self.lengths) if self.lengths else h * w
        if self.tokens.dim() != 3 or self.tokens.shape[1] != n:
            raise ShapeError(f"tokens of shape {tuple(self.tokens.shape)} do not fit grid {h}x{w}")

    @classmethod
    def ragged(
        cls, per_image: Sequence[torch.Tensor], layouts: Sequence[Any], pooled: Any = None
    ) -> Features:
        """Features of images with their own token counts (`[n_i, D]` each), zero-padded into one batch."""
        lengths = [len(t) for t in per_image]
        tokens = torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
        return cls(tokens, tuple(layouts[0].views[0]), pooled, list(layouts), lengths)

    def per_image(self) -> list[torch.Tensor]:
        """Each image's tokens `[n_i, D]`, without padding."""
        if self.lengths is None:
            return list(self.tokens)
        return [t[:n] for t, n in zip(self.tokens, self.lengths, strict=True)]

    def mean(self) -> torch.Tensor:
        """The mean token of each image `[B, D]`, over its own tokens only."""
        if self.lengths is None:
            return self.tokens.mean(1)
        return torch.stack([t.mean(0) for t in self.per_image()])

    def check_finite(self, encoder: str) -> Features:
        """Raise a clear error naming `encoder` if any value is NaN or infinite."""
        hint = "check the weights and, on GPU, try dtype=float32"
        for key, value in (("tokens", self.tokens), ("pooled", self.pooled)):
            if value is not None:
                check_finite(value, f"encoder '{encoder}' produced non-finite {key}", hint)
        return self

    def to_grid(self) -> torch.Tensor:
        """Tokens as a `[B, D, h, w]` feature map (one grid per encoder: the `fixed` strategy)."""
        if self.layouts is not None:
            raise ShapeError("ragged features (anyres or native resolution) have one grid per image")
        b, _, d = self.tokens.shape
        return self.tokens.transpose(1, 2).reshape(b, d, *self.grid)


def check_finite(value: torch.Tensor, what: str, hint: str) -> None:
    """Raise `VrlabError` "<what> for batch rows [...]; <hint>" if any value of `value` is NaN or infinite."""
    bad_mask = ~torch.isfinite(value)
    if bad_mask.any():
        rows = bad_mask.reshape(value.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        raise VrlabError(f"{what} for batch rows {rows}; {hint}")


def resolve_normalization(
    normalize: str | None, mean: Sequence[float] | None, std: Sequence[float] | None, default: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from explicit values, else a named preset (`clip`, `imagenet`, `siglip`, `diffusion`, `none`)."""
    if mean is not None and std is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    name = normalize or default
    if name not in NORMALIZATIONS:
        raise VrlabError(
            f"unknown normalize='{name}'; choose one of {sorted(NORMALIZATIONS)} or give mean and std"
        )
    return NORMALIZATIONS[name]


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def letterbox_geometry(height: int, width: int, size: tuple[int, int]) -> tuple[float, int, int, int, int]:
    """Scale and placement of an image letterboxed into `size`: (scale, new_h, new_w, top, left)."""
    scale = min(size[0] / height, size[1] / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return scale, new_h, new_w, (size[0] - new_h) // 2, (size[1] - new_w) // 2


class ImageTransform(nn.Module):
    """uint8 image(s) `[3, H, W]` or `[B, 3, H, W]` -> normalised float input at `image_size`.

    Resize policies: `squash` (ignore the aspect ratio, as the law code does), `letterbox` (keep the aspect
    ratio, pad centred with `fill`), `center_crop` (scale the short side to `size / crop_pct`, crop the centre,
    as the Hugging Face CLIP and DINOv2 processors do).
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        resize: str = "center_crop",
        mean: Sequence[float] = NORMALIZATIONS["clip"][0],
        std: Sequence[float] = NORMALIZATIONS["clip"][1],
        interpolation: str = "bicubic",
        crop_pct: float = 1.0,
        fill: float = 0.0,
    ) -> None:
        super().__init__()
        if resize not in RESIZE_POLICIES:
            raise VrlabError(f"unknown resize policy '{resize}'; choose one of {RESIZE_POLICIES}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise VrlabError(f"unknown interpolation '{interpolation}'; choose bilinear, bicubic or nearest")
        self.size = as_size(image_size)
        self.resize, self.interpolation, self.crop_pct, self.fill = (
            resize,
            interpolation,
            float(crop_pct),
            float(fill),
        )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, resize={self.resize}, interpolation={self.interpolation}, crop_pct={self.crop_pct}"

    def settings(self) -> dict[str, Any]:
        """Everything that changes the numbers, for manifests and result files."""
        return {
            "image_size": list(self.size),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "fill": self.fill,
            "mean": [round(v, 8) for v in self.mean.flatten().tolist()],
            "std": [round(v, 8) for v in self.std.flatten().tolist()],
        }

    def _interpolate(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        # Antialiasing matches PIL when shrinking; clamp undoes bicubic overshoot.
        return F.interpolate(
            x, size=size, mode=self.interpolation, antialias=True, align_corners=False
        ).clamp(0, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        single = image.dim() == 3
        x = image.unsqueeze(0) if single else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise ShapeError(f"expected an image tensor [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        h, w = x.shape[-2:]
        if self.resize == "squash":
            x = self._interpolate(x, self.size)
        elif self.resize == "letterbox":
            _, new_h, new_w, top, left = letterbox_geometry(h, w, self.size)
            canvas = x.new_full((x.shape[0], 3, *self.size), self.fill)
            canvas[:, :, top : top + new_h, left : left + new_w] = self._interpolate(x, (new_h, new_w))
            x = canvas
        else:
            short = min(h, w)
            target = max(self.size) / self.crop_pct
            scale = target / short
            new_h, new_w = max(self.size[0], round(h * scale)), max(self.size[1], round(w * scale))
            x = self._interpolate(x, (new_h, new_w))
            top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
            x = x[:, :, top : top + self.size[0], left : left + self.size[1]]
        x = (x - self.mean) / self.std
        return x[0] if single else x


TRANSFORM_OPTIONS = ("resize", "crop_pct", "interpolation", "normalize", "mean", "std")


def image_transform(
    image_size: int | Sequence[int],
    default_normalize: str,
    default_resize: str = "center_crop",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> ImageTransform:
    """A backend's `ImageTransform` from the card's transform options (`TRANSFORM_OPTIONS`).

    Every backend takes these options as keyword arguments and passes them here, so they are defined and
    checked in one place; `mean`/`std` given by the backend (a checkpoint's own statistics) apply unless
    the card names `normalize` or its own `mean`/`std`.
    """
    unknown = sorted(set(options) - set(TRANSFORM_OPTIONS))
    if unknown:
        raise VrlabError(
            f"unknown encoder option(s) {unknown}; image transform options are {list(TRANSFORM_OPTIONS)}"
        )
    m, s = resolve_normalization(options.get("normalize"), mean, std, default_normalize)
    return ImageTransform(
        image_size,
        resize=options.get("resize") or default_resize,
        mean=m,
        std=s,
        interpolation=options.get("interpolation") or "bicubic",
        crop_pct=options.get("crop_pct") if options.get("crop_pct") is not None else 1.0,
    )


def autocast_context(device: torch.device | str, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when `dtype` is auto or bfloat16; a no-op on the CPU or with float32."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in ("auto", "bfloat16", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class VisionEncoder(nn.Module):
    """Base class of every encoder. Subclasses set `self.transform` and implement `forward`.

    `dim` and `grid` default to one dry forward pass at `image_size` (cached); backends that know them
    analytically override `_shape`.
    """

    transform: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.card: EncoderCard | None = None
        self._shape_cache: tuple[int, tuple[int, int]] | None = None

    @property
    def name(self) -> str:
        return self.card.name if self.card is not None else type(self).__name__

    @property
    def image_size(self) -> tuple[int, int]:
        return self.transform.size

    @property
    def dim(self) -> int:
        return self._cached_shape()[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self._cached_shape()[1]

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    def _cached_shape(self) -> tuple[int, tuple[int, int]]:
        if self._shape_cache is None:
            self._shape_cache = self._shape()
        return self._shape_cache

    def _shape(self) -> tuple[int, tuple[int, int]]:
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            out = self(self.example_input(device=device))
        return out.tokens.shape[-1], out.grid

    def example_input(self, batch: int = 1, device: torch.device | str = "cpu") -> Any:
        """A zero input of the right shape after the transform (a tuple for composites)."""
        return torch.zeros(batch, 3, *self.image_size, device=device)

    def settings(self) -> dict[str, Any]:
        """Card, transform and backend settings: everything that changes the numbers."""
        return {
            "card": self.card.to_dict() if self.card is not None else None,
            "transform": self.transform.settings(),
            "backend": self.backend_settings(),
        }

    def backend_settings(self) -> dict[str, Any]:
        return {}

    def forward(self, pixels: Any) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def encode_images(self, images: Sequence[torch.Tensor], dtype: str = "auto") -> Features:
        """Transform a list of uint8 images (any sizes), batch them and run the encoder."""
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        pixels = collate_pixels([self.transform(img) for img in images])
        pixels = move_pixels(pixels, device)
        with autocast_context(device, dtype):
            out = self(pixels)
        return out.check_finite(self.name)


def collate_pixels(items: Sequence[Any]) -> Any:
    """Stack transformed images; composites give tuples, which are stacked member by member; the views of
    the anyres and native strategies are joined (they know how)."""
    if hasattr(items[0], "collate"):
        return type(items[0]).collate(items)
    if isinstance(items[0], tuple | list):
        return tuple(torch.stack([it[k] for it in items]) for k in range(len(items[0])))
    return torch.stack(list(items))


def move_pixels(pixels: Any, device: torch.device | str) -> Any:
    """Move a tensor, a tuple of tensors or image views to `device`."""
    if hasattr(pixels, "collate"):
        return pixels.to(device, non_blocking=True)
    if isinstance(pixels, tuple | list):
        return tuple(p.to(device, non_blocking=True) for p in pixels)
    return pixels.to(device, non_blocking=True)
