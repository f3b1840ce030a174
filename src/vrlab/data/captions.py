"""Image-caption sets for retrieval: the annotation layout of the Flickr30k and COCO Karpathy test files that
LLM2CLIP's and CLIP_benchmark's retrieval evaluations read, and of vrlab's generated caption set.

The file is a JSON list of `{"image": "<path relative to image_folder>", "caption": [str, ...]}` records (a
single string caption is accepted too). An image named by several records is one item holding all their
captions, so a file with one record per caption reads the same as one with a caption list per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vrlab.data.loaders import Item, Loader, _need, _read_json
from vrlab.errors import VrlabError
from vrlab.runtime import config_hash


def _record_field(record: Any, key: str, path: Path, n: int) -> Any:
    if not isinstance(record, dict):
        raise VrlabError(
            f"annotation file {path}: record {n} is a {type(record).__name__}, not an object with "
            "'image' and 'caption'"
        )
    if key not in record:
        raise VrlabError(f"annotation file {path}: record {n} lacks key '{key}'")
    return record[key]


def _captions_of(record: dict[str, Any], path: Path, n: int) -> list[str]:
    value = _record_field(record, "caption", path, n)
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions:
        raise VrlabError(
            f"annotation file {path}: record {n} ('{record.get('image')}') needs 'caption' as a string or a "
            "non-empty list of strings"
        )
    for j, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise VrlabError(
                f"annotation file {path}: record {n} ('{record.get('image')}') has an empty or non-string "
                f"caption at index {j}"
            )
    return captions


class CaptionLoader(Loader):
    """Images with one or more captions each: `items` (one per image, in first-appearance order; `meta`
    holds `captions`, the indices of its captions), `captions` (every caption, in file order within each
    record) and `caption_image` (for each caption, the index into `items` of its image)."""

    task = "retrieval"

    def __init__(self, root: str | Path, file: str = "captions.json", image_folder: str = "") -> None:
        super().__init__(root, None)
        self.file, self.image_folder = str(file), str(image_folder or "")
        path = self.root / self.file
        data = _read_json(path)
        if not isinstance(data, list) or not data:
            raise VrlabError(f"{path} must hold a non-empty JSON list of {{image, caption}} records")
        base = self.root / self.image_folder if self.image_folder else self.root
        self.captions: list[str] = []
        self.caption_image: list[int] = []
        index_of: dict[str, int] = {}
        for n, record in enumerate(data):
            image = _record_field(record, "image", path, n)
            if not isinstance(image, str) or not image.strip():
                raise VrlabError(f"annotation file {path}: record {n} has an empty or non-string 'image'")
            captions = _captions_of(record, path, n)
            if image not in index_of:
                file = base / image
                if not file.exists() and self.image_folder and (self.root / image).exists():
                    # files like BLIP's carry the folder in each path: the card's image_folder is one too many
                    raise VrlabError(
                        f"image of record {n} in {path} not found: {file}; it exists at {self.root / image}, "
                        "so set the card's image_folder to '' (+benchmark_args.image_folder='')"
                    )
                _need(file, f"image of record {n} in {path}")
                index_of[image] = len(self.items)
                self.items.append(Item(Path(image).with_suffix("").as_posix(), file, None, {"captions": []}))
            i = index_of[image]
            for caption in captions:
                self.items[i].meta["captions"].append(len(self.captions))
                self.captions.append(caption)
                self.caption_image.append(i)
        self.check_ids()

    def settings(self) -> dict[str, Any]:
        """What changes the numbers: the file, the image folder, the counts and a digest of the captions."""
        return {
            **super().settings(),
            "file": self.file,
            "image_folder": self.image_folder,
            "n_captions": len(self.captions),
            "captions_digest": config_hash([self.captions, self.caption_image], 16),
        }
