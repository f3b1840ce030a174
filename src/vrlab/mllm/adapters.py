"""Adapters between a vision encoder and an LLM, and the stage-1 checkpoint format.

A stage-1 checkpoint is a folder with `adapter_config.json` (`type`, `in_dim`, `out_dim`, the encoder card
name, the LLM, anything else that rebuilds it) and `adapter.safetensors`. `extract.projector=<folder>` loads
it to store projected tokens, which the A score compares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from vrlab.errors import ShapeError, VrlabError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear` (LLaVA v0, LMVR) or `mlp2x_gelu` (LLaVA-1.5: Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise VrlabError(f"unknown projector type '{kind}'; choose linear or mlp2x_gelu")


def save_projector(module: nn.Module, folder: str | Path, config: Mapping[str, Any]) -> Path:
    """Write a stage-1 checkpoint folder (weights as safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("type", "in_dim", "out_dim"):
        if key not in config:
            raise VrlabError(f"projector config needs '{key}'")
    save_file(
        {k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(folder / WEIGHTS_FILE)
    )
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    return folder


def load_projector(
    folder: str | Path, expect_in_dim: int | None = None, encoder: str = ""
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a stage-1 checkpoint; a mismatch with the encoder's width is an error naming both."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists() or not (folder / WEIGHTS_FILE).exists():
        raise VrlabError(f"no projector checkpoint at {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(cfg_path.read_text())
    if expect_in_dim is not None and int(config["in_dim"]) != int(expect_in_dim):
        raise ShapeError(
            f"projector {folder} expects input width {config['in_dim']} (trained on '{config.get('encoder', '?')}') "
            f"but encoder '{encoder}' gives {expect_in_dim}"
        )
    module = build_projector(config["type"], int(config["in_dim"]), int(config["out_dim"]))
    module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return module.eval(), config


def file_digest(folder: str | Path) -> str:
    """SHA-256 of a checkpoint's weights, so a store keyed on a projector changes when the weights do."""
    import hashlib

    return hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
