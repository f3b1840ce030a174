"""Published checkpoints into vrlab's own format: the original LLaVA layout, TG-LLaVA's, and Hugging Face's.

Every project vrlab compares with is a fork of LLaVA-1.5 and saves in its format; the Law paper's, LMVR's
and TG-LLaVA's releases are such folders. `import_checkpoint` writes one of them once as a vrlab
checkpoint (`vrlab.checkpoint`: a model folder, or a stage-1 adapter folder), and `ensure_vrlab` does so on
demand for any task that takes `checkpoint=` or an adapter, keyed on the source's files.

Formats (`detect_format`, or named with `format=`):
- `llava`: LLaVA's `config.json` (`mm_vision_tower`, `mm_projector_type` = `linear` | `mlp<N>x_gelu`,
  `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size`, `image_aspect_ratio`,
  `mm_use_im_start_end`, `mm_use_im_patch_token`) and LLM shards (`pytorch_model-*.bin` or
  `model-*.safetensors`, with their index) that also hold `model.mm_projector.*`. LMVR's checkpoints are
  this format (a `linear` projector).
- `tg_llava`: the same plus `mm_text_tower`, `mm_text_hidden_size` and `model.mm_cross_attn.*` (the
  text-guided learnable-query branch: a LAVIS BERT Q-Former, mapped onto vrlab's `tg` adapter).
- `llava_stage1`: a stage-1 folder, `mm_projector.bin` (+ LLaVA's `config.json`; TG-LLaVA also saves
  `mm_cross_attn.bin`), or the `mm_projector.bin` file itself.
- `llava_hf`: a `LlavaForConditionalGeneration` folder (llava-hf, or vrlab's own `task=export_hf`).
- `llava_next_hf`: recognised and refused: AnyRes tiling needs per-image token counts, which vrlab lacks.

`.bin` files are read with `torch.load(weights_only=True)`, and anything in them but tensors is refused
with the file named, so importing never runs code. The vision tower is never taken from the checkpoint:
its name resolves through vrlab's registry (dot-joined composites included), and tower weights a
checkpoint carries must equal the registry tower's, or the import stops (a fine-tuned tower is not
silently replaced). What LLaVA's format says that vrlab cannot run (CLS kept, start/end tokens around the
image, AnyRes, TG-LLaVA's perceiver detail branch) is refused with the file and key named.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vrlab.checkpoint import VLM_CONFIG
from vrlab.errors import VrlabError
from vrlab.published.common import (
    FORMATS,
    IMPORT_RECORD,
    MODEL_FORMATS,
    ImportOptions,
    detect_format,
    read_tensors,
)
from vrlab.published.hf import import_llava_hf
from vrlab.published.llava import import_llava, import_stage1
from vrlab.runtime import atomic_write_json, config_hash, slug

__all__ = [
    "FORMATS",
    "IMPORT_RECORD",
    "MODEL_FORMATS",
    "ImportOptions",
    "detect_format",
    "ensure_vrlab",
    "import_checkpoint",
    "import_path",
    "read_tensors",
]

log = logging.getLogger(__name__)


def import_checkpoint(source: str | Path, out: str | Path, options: ImportOptions | None = None) -> Path:
    """Write `source` (a published checkpoint) to `out` as a vrlab model folder or stage-1 adapter folder.

    The folder is built under a temporary name and renamed when complete, so a failed or killed import
    never leaves a folder that looks like a checkpoint. `import.json` records the source, its format and
    the SHA-256 of every file read.
    """
    options = options or ImportOptions()
    source, out = Path(source), Path(out)
    fmt = detect_format(source) if options.format == "auto" else options.format
    if fmt not in FORMATS:
        raise VrlabError(f"import.format='{fmt}' is not one of {list(FORMATS)}")
    if fmt in ("vrlab", "vrlab_adapter"):
        raise VrlabError(f"{source} is already a vrlab checkpoint; nothing to import")
    if fmt == "llava_next_hf":
        raise VrlabError(
            f"{source} is a LlavaNextForConditionalGeneration folder: AnyRes tiling (image_grid_pinpoints, "
            "image_newline) needs per-image token counts, which vrlab does not support yet"
        )
    if out.exists():
        raise VrlabError(f"{out} already exists; import into a new folder")
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "llava_stage1":
            record = import_stage1(source, tmp, options)
        elif fmt in ("llava", "tg_llava"):
            record = import_llava(source, tmp, options, fmt)
        else:
            record = import_llava_hf(source, tmp, options)
        config = record.pop("config", None)
        record = {"source": str(source.resolve()), "format": fmt, "options": _plain(options), **record}
        atomic_write_json(tmp / IMPORT_RECORD, record)
        if config is not None:
            atomic_write_json(
                tmp / VLM_CONFIG, {**config, "imported": {"format": fmt, "source": str(source)}}
            )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s (%s) -> %s", source, fmt, out)
    return out


def _plain(options: ImportOptions) -> dict[str, Any]:
    from vrlab.runtime import to_plain

    return to_plain(asdict(options))


def import_path(path: str | Path, cache: str | Path, options: ImportOptions) -> Path:
    """Where `ensure_vrlab` keeps the import of `path`: keyed on its files (names, sizes, mtimes) and options."""
    from vrlab.fingerprint import path_fingerprint

    path = Path(path)
    key = config_hash(
        {"source": str(path.resolve()), "files": path_fingerprint(path), "options": _plain(options)}
    )
    return Path(cache) / f"{slug(path.name)}-{key}"


def ensure_vrlab(
    path: str | Path, kind: str, cache: str | Path, options: ImportOptions | None = None
) -> Path:
    """`path` as a vrlab checkpoint of `kind` (`model` or `adapter`), importing it into `cache` once.

    The import is keyed on the source's files (names, sizes, modification times) and the options, so a
    changed checkpoint is imported again and an unchanged one is reused. A vrlab model folder given where
    an adapter is wanted yields its `adapter/`.
    """
    options = options or ImportOptions()
    path = Path(path)
    fmt = detect_format(path) if options.format == "auto" else options.format
    if kind == "model":
        if fmt == "vrlab":
            return path
        if fmt not in MODEL_FORMATS:
            raise VrlabError(
                f"checkpoint {path} is a {fmt} checkpoint (a stage-1 projector); a model is needed here. "
                "Use it as train.init_from, extract.adapter or alignment.adapter"
            )
    elif kind == "adapter":
        if fmt == "vrlab_adapter":
            return path
        if fmt == "vrlab":
            return path / "adapter"
    else:  # pragma: no cover - a programming error
        raise ValueError(kind)
    out = import_path(path, cache, options)
    if not out.exists():
        import_checkpoint(path, out, options)
    # a full model where an adapter is wanted: its projector
    return out / "adapter" if kind == "adapter" and (out / VLM_CONFIG).is_file() else out
