"""What a stored number was computed from, beyond its settings: the weight files and the data files.

A store key that hashed only the card and settings reused old embeddings after an encoder's weights were
replaced at the same path or an image changed on disk. These fingerprints go into the keys: for files and
folders named in a card (or a checkpoint folder), every file's relative path, size and modification time
(cheap: no file is read); for a hub id with a local cache, the cached snapshot's commit; for benchmark items,
each image's id, size and modification time. A file touched but not changed gives a new key too: that costs
a re-extraction, never a stale number.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vrlab.runtime import config_hash

_PREFIXES = ("local-dir:",)
_HUB_FILES = ("config.json", "model_index.json", "open_clip_config.json")


def path_fingerprint(path: str | Path) -> str:
    """Hash of (relative path, size, mtime) of a file, or of every file below a folder."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return config_hash([path.name, st.st_size, st.st_mtime_ns], 16)
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            st = full.stat()
            entries.append([str(full.relative_to(path)), st.st_size, st.st_mtime_ns])
    return config_hash(entries, 16)


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of a hub repository's snapshot in the local cache, if there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    for filename in _HUB_FILES:
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # not a valid repo id: not a hub reference
            return None
        if isinstance(found, str):
            return Path(found).parent.name
    return None


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def spec_fingerprint(spec: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprints of the local files and cached hub snapshots a card's spec points at."""
    out: dict[str, str] = {}
    for text in _strings(spec):
        raw = text
        for prefix in _PREFIXES:
            text = text.removeprefix(prefix)
        if not text.strip() or len(text) > 4096 or "\n" in text:
            continue  # '' would name the working directory (an empty prompt is not a path)
        path = Path(text).expanduser()
        try:
            # a folder must look like one ('a/b', '~/x'); a bare word counts only as an existing file
            exists = path.is_file() or (("/" in text or text.startswith("~")) and path.exists())
        except OSError:
            continue
        if exists:
            out[raw] = path_fingerprint(path)
        elif raw == spec.get("source") and "/" in text and not text.startswith((".", "/")):
            commit = _hub_commit(text, spec.get("revision"))
            if commit:
                out[raw] = f"hub:{commit}"
    weights = spec.get("weights")  # a timm card's file in a hub repository: {repo, file, revision}
    if isinstance(weights, Mapping) and weights.get("repo") and weights.get("file"):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(weights["repo"], weights["file"], revision=weights.get("revision"))
        if isinstance(found, str):
            out[f"{weights['repo']}/{weights['file']}"] = path_fingerprint(found)
    return out


def card_fingerprint(card: Mapping[str, Any]) -> dict[str, str]:
    """Fingerprints of a card dict (`EncoderCard.to_dict()`), members included."""
    out = spec_fingerprint(card.get("spec", {}))
    for member in card.get("members", ()):
        out |= card_fingerprint(member)
    return out


def items_fingerprint(paths: Sequence[str | Path]) -> str:
    """Hash of every image file's size and modification time, in order."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append([st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append(None)  # a missing file is the loader's or the decoder's error to report
    return config_hash(stats, 16)
