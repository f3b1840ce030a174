"""Decode any image file into a uint8 RGB tensor `[3, H, W]`, whatever its mode.

Handles RGB, grayscale, RGBA/LA and palette images (alpha is dropped, as PIL's `convert('RGB')` and the
published pipelines do), CMYK, 16-bit and 32-bit integer and float images (rescaled to 8 bits, not clipped),
and EXIF orientation. A file that cannot be decoded, or whose header promises more than `max_pixels` pixels,
raises `ImageDecodeError` naming it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vrlab.errors import ImageDecodeError, VrlabError

# 50 megapixels (data.max_pixels' default): far above any benchmark image; decoding one costs ~1 GB at most.
DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_strict = threading.Lock()
_strict_users = 0
_saved_truncated = False


@contextlib.contextmanager
def _truncated_images_refused():
    """PIL's `LOAD_TRUNCATED_IMAGES` off while vrlab decodes, whoever set it process-wide.

    lmms-eval sets it on at import (`lmms_eval.api.task`), which would let a cut file decode into partly
    grey pixels silently. Counted, so that concurrent decodes neither hold a lock while decoding nor leave
    the flag off for the code that turned it on.
    """
    global _strict_users, _saved_truncated
    with _strict:
        if _strict_users == 0:
            _saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else float(arr.max())
        else:  # 32-bit integers: often 16-bit data stored wide
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_image(
    path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None
) -> torch.Tensor:
    """uint8 tensor `[3, H, W]` of the image at `path`, upright per its EXIF orientation.

    An image of more than `max_pixels` pixels is refused from its header, before any pixel is decoded, so a
    small file that expands to gigabytes costs nothing. With `max_pixels=None` vrlab sets no cap and PIL's
    own threshold (`Image.MAX_IMAGE_PIXELS`) is the cap; PIL's hard limit (twice that) always holds. Both of
    PIL's refusals become an `ImageDecodeError` naming the file. `reduce_to` (the longest side the caller
    needs) lets a JPEG decode at a reduced scale that still has at least that many pixels on its longest
    side; by default every image decodes at full resolution.
    """
    # an image inside a tar shard (vrlab.data.webdataset.TarMember) reads its own bytes; messages name it
    member = path.open if hasattr(path, "member") else None
    path = path if member else Path(path)
    if reduce_to is not None and (
        isinstance(reduce_to, bool) or not isinstance(reduce_to, int) or reduce_to < 1
    ):
        raise VrlabError(
            f"decode_image({path}): reduce_to={reduce_to!r} must be a positive number of pixels or None"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns from the header past its threshold, before vrlab can look at the size: an explicit
            # cap is checked below and governs instead, so its refusal names data.max_pixels and raising
            # the setting works; without one, PIL's warning is the refusal.
            action = "ignore" if max_pixels is not None else "error"
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            with Image.open(member() if member else path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageDecodeError(
                        f"image {path} is {w}x{h} pixels, more than data.max_pixels={max_pixels}; raise "
                        "data.max_pixels to decode it (or data.on_bad_image=skip to leave it out)"
                    )
                if reduce_to and im.format in ("JPEG", "MPO") and max(w, h) > reduce_to:
                    scale = reduce_to / max(w, h)
                    im.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
                with _truncated_images_refused():
                    im.load()
                with contextlib.suppress(Exception):  # a corrupt EXIF block should not cost the pixels
                    im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except Image.DecompressionBombWarning as exc:  # only raised without a cap of vrlab's own
        raise ImageDecodeError(
            f"image {path} is too large to decode safely: {exc} (PIL's Image.MAX_IMAGE_PIXELS); set "
            "data.max_pixels above its size to decode it, or data.on_bad_image=skip to leave it out"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"image {path} is too large to decode safely: {exc} (twice PIL's Image.MAX_IMAGE_PIXELS, a hard "
            "limit that data.max_pixels does not lift); downscale the file, or set data.on_bad_image=skip "
            "to leave it out"
        ) from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"image {path} decoded to an unusable shape {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def list_images(folder: str | Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files below `folder`, sorted, so the order is the same on every machine."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VrlabError(f"image folder {folder} does not exist")
    wanted = {s.lower() for s in suffixes}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise VrlabError(f"no images ({', '.join(sorted(wanted))}) found below {folder}")
    return files


def pad_to_square(image: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """LLaVA-1.5's expand2square: centre the image on a square canvas of the mean colour (uint8 in and out)."""
    _, h, w = image.shape
    side = max(h, w)
    canvas = (
        torch.tensor([round(f * 255) for f in fill], dtype=torch.uint8)
        .view(3, 1, 1)
        .expand(3, side, side)
        .clone()
    )
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top : top + h, left : left + w] = image
    return canvas
