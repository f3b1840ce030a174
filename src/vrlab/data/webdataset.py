"""WebDataset tar shards as a benchmark: the layout img2dataset writes (`<key>.jpg|png|webp` beside
`<key>.json`, `<key>.cls`, `<key>.txt` in `.tar` files), read in place, never unpacked.

Members are grouped into samples by webdataset's own key rule (`base_plus_ext`). Listing a shard reads its
tar headers and the small label/caption members only. Each image is a `TarMember`: the byte range of the
image inside its tar, so extraction reads exactly those bytes. Every rank, batch and resumed run can
therefore take any slice of the images, without streaming a whole shard to reach one image. A `TarMember` is
path-like for the tar file, so file fingerprints see the shard's size and modification time.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vrlab.data.loaders import Item, Loader
from vrlab.errors import ImageDecodeError, VrlabError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TarMember:
    """One image inside a tar shard: the shard, the member's name and its bytes' offset and size."""

    tar: Path
    member: str
    offset: int
    size: int

    def __fspath__(self) -> str:  # stat() and fingerprints see the shard
        return str(self.tar)

    def __str__(self) -> str:
        return f"{self.tar}#{self.member}"

    def open(self) -> io.BytesIO:
        with open(self.tar, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise ImageDecodeError(f"{self}: the shard ends before the member does (truncated tar)")
        return io.BytesIO(data)


def expand_shards(root: Path, shards: str | list[str]) -> list[Path]:
    """Shard files from brace patterns relative to `root` (`train-{000000..000099}.tar`), in order."""
    from braceexpand import braceexpand

    patterns = [shards] if isinstance(shards, str) else list(shards)
    files = [root / name for p in patterns for name in braceexpand(p)]
    if not files:
        raise VrlabError(f"no WebDataset shards named by {shards!r} under {root}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise VrlabError(f"{len(missing)} of {len(files)} WebDataset shards do not exist, e.g. {missing[0]}")
    return files


class WebDatasetLoader(Loader):
    """Images of WebDataset tar shards; `label_key` (`cls`: a class index; `json`: its `label_field`) gives labels,
    `txt` members captions (`meta["caption"]`). Item ids are the sample keys."""

    task = "images"

    def __init__(
        self,
        root: str | Path,
        shards: str | list[str],
        label_key: str | None = "cls",
        label_field: str = "label",
        classes: list[str] | None = None,
    ) -> None:
        from webdataset.tariterators import base_plus_ext

        super().__init__(root, None)
        self.shards = expand_shards(self.root, shards)
        self.pattern, self.label_key, self.label_field = shards, label_key, label_field
        self.classes = list(classes or [])
        for tar_path in self.shards:
            samples: dict[str, dict[str, Any]] = {}
            try:
                with tarfile.open(tar_path, "r:") as tar:  # uncompressed, as webdataset writes them
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = base_plus_ext(member.name)
                        if key is None:
                            continue
                        sample = samples.setdefault(key, {})
                        ext = ext.lower()
                        if ext in IMAGE_EXTENSIONS:
                            if "image" in sample:
                                raise VrlabError(f"{tar_path}: sample '{key}' has two images")
                            sample["image"] = TarMember(
                                tar_path, member.name, member.offset_data, member.size
                            )
                        elif ext in ("cls", "json", "txt"):
                            sample[ext] = tar.extractfile(member).read().decode("utf-8").strip()
            except tarfile.TarError as exc:
                raise VrlabError(f"WebDataset shard {tar_path} is not a readable tar: {exc}") from exc
            for key, sample in samples.items():
                if "image" not in sample:
                    continue  # a sample without an image (metadata only) is not an image item
                self.items.append(
                    Item(key, sample["image"], self._label(sample, tar_path, key), self._meta(sample))
                )
        if not self.items:
            raise VrlabError(f"the WebDataset shards {shards!r} under {self.root} hold no images")
        self.check_ids()

    def _label(self, sample: dict[str, Any], tar_path: Path, key: str) -> int | None:
        if self.label_key == "cls" and "cls" in sample:
            try:
                return int(sample["cls"])
            except ValueError:
                raise VrlabError(
                    f"{tar_path}: sample '{key}'.cls is {sample['cls']!r}, not a class index"
                ) from None
        if self.label_key == "json" and "json" in sample:
            value = json.loads(sample["json"]).get(self.label_field)
            return int(value) if value is not None else None
        return None

    @staticmethod
    def _meta(sample: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if "txt" in sample:
            meta["caption"] = sample["txt"]
        if "json" in sample:
            meta["json"] = json.loads(sample["json"])
        return meta

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "shards": self.pattern, "n_shards": len(self.shards)}
