"""The on-disk format of adapters and vision-language models, read by extraction and by the MLLM alike.

- An adapter (stage-1 checkpoint) is a folder with `adapter_config.json` (`type`, `in_dim`, `out_dim`, the
  adapter's options, the encoder card name, the LLM) and `adapter.safetensors`.
- A vision-language model (stage 2) is a folder with `vlm_config.json` (the encoder's full card, the adapter
  config, the template), `adapter/` in the format above and `llm/` (the LLM's own `save_pretrained`); where
  stage 2 trained the tower, also `encoder/encoder.safetensors`, the encoder module's state.

Weights are safetensors only, so loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_bytes

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
VLM_CONFIG = "vlm_config.json"
TOWER_FILE = "encoder/encoder.safetensors"  # a tower trained in stage 2 (see vrlab.mllm.tower)


def save_adapter(module: torch.nn.Module, folder: str | Path, config: Mapping[str, Any]) -> Path:
    """Write an adapter checkpoint folder (weights as safetensors)."""
    folder = Path(folder)
    for key in ("type", "in_dim", "out_dim"):
        if key not in config:
            raise VrlabError(f"adapter config needs '{key}'")
    state = module.state_dict()
    if isinstance(module, torch.nn.Sequential | torch.nn.Linear):  # a bare projection: the adapter layout
        state = {f"net.{k}": v for k, v in state.items()}
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, save({k: v.detach().contiguous() for k, v in state.items()}))
    atomic_write_bytes(folder / ADAPTER_CONFIG, json.dumps(dict(config), indent=2, sort_keys=True).encode())
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and state dict of an adapter checkpoint folder."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists() or not (folder / ADAPTER_WEIGHTS).exists():
        raise VrlabError(f"no adapter checkpoint at {folder} (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return json.loads((folder / ADAPTER_CONFIG).read_text()), load_file(str(folder / ADAPTER_WEIGHTS))


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The config of an adapter checkpoint folder, without loading its weights."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise VrlabError(f"no adapter checkpoint at {folder} ({ADAPTER_CONFIG} missing)")
    return json.loads(path.read_text())


def file_digest(folder: str | Path) -> str:
    """SHA-256 of an adapter's weights, so a store keyed on an adapter changes when the weights do."""
    return hashlib.sha256((Path(folder) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over every file below a model folder (relative path and contents): what an eval ran on."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def tower_file(path: str | Path) -> Path:
    """The tuned-tower file of a model folder, or the file itself."""
    path = Path(path)
    file = path / TOWER_FILE if path.is_dir() else path
    if not file.is_file():
        raise VrlabError(
            f"no tuned tower at {path} (expected {TOWER_FILE} in a stage-2 model trained with "
            "train.tune_encoder=true)"
        )
    return file


def load_tower(encoder: torch.nn.Module, path: str | Path) -> str:
    """Load a tuned tower's state into a freshly built encoder, strictly; returns the file's digest."""
    file = tower_file(path)
    state = load_file(str(file))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VrlabError(
            f"the tuned tower {file} does not fit encoder '{getattr(encoder, 'name', '?')}': missing "
            f"{sorted(missing)[:3]} ({len(missing)}), unexpected {sorted(unexpected)[:3]} ({len(unexpected)})"
        )
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
