"""A vision tower trained in stage 2 (`train.tune_encoder=true`, as LLaVA-NeXT, LLaVA-OneVision and Eagle do).

What trains: the whole tower, only its last N blocks (`last_blocks`; a block list is the tower's longest
`nn.ModuleList`, per member of a composite, counted back from the last block its tokens depend on), or LoRA adapters (`lora_r` > 0, peft's
`inject_adapter_in_model` on the tower's linear layers, merged back into them before saving). The tower gets
its own learning rate (LLaVA-NeXT: 2e-6, against 2e-5 for the LLM).

A model trained so carries its tower: `encoder/encoder.safetensors` in the model folder (the encoder
module's full state, LoRA merged), named in `vlm_config.json` (`tuned_encoder`, with how it was tuned) and
in the adapter's config (so extraction with that adapter, and so A, runs the tuned tower). The card still
names the released weights: the tower is rebuilt from them, then the tuned state is loaded strictly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrlab.checkpoint import TOWER_FILE
from vrlab.errors import VrlabError

TUNED_SUFFIX = "+tuned"  # the representation name of a tuned tower's results


def representation(label: str | None, encoder: str, tuned: Any) -> str:
    """A result's row name: the label, else the encoder's name, marked when its tower was tuned."""
    return label or (f"{encoder}{TUNED_SUFFIX}" if tuned else encoder)


def _members(encoder: nn.Module) -> list[nn.Module]:
    return list(getattr(encoder, "members", None) or [encoder])


def _blocks(member: nn.Module) -> nn.ModuleList:
    lists = [m for m in member.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise VrlabError(
            f"encoder '{getattr(member, 'name', type(member).__name__)}' has no list of blocks; "
            "train.encoder_tuning.last_blocks needs one (set it to null to tune the whole tower)"
        )
    return max(lists, key=len)


def _feeding(member: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The blocks the member's tokens depend on: with LLaVA's layer -2, the last block feeds nothing, so "the
    last N blocks" count back from the selected one. Found by one backward pass of a blank image."""
    member.requires_grad_(True)
    member.zero_grad(set_to_none=True)
    with torch.enable_grad():
        member(member.example_input()).tokens.float().sum().backward()
    used = [b for b in blocks if any(p.grad is not None for p in b.parameters())]
    member.zero_grad(set_to_none=True)
    return used


def tune_tower(encoder: nn.Module, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Make the tower (or the chosen part of it) trainable; returns the settings as recorded."""
    if any(getattr(m, "lazy_shape", False) for m in _members(encoder)):
        raise VrlabError(
            "train.tune_encoder=true trains a transformer or CNN tower; diffusion features are not trained"
        )
    last = settings.get("last_blocks")
    rank = int(settings.get("lora_r") or 0)
    scopes: list[nn.Module] = []
    for member in _members(encoder):
        if last:
            blocks = _feeding(member, _blocks(member))
            if not 0 < int(last) <= len(blocks):
                raise VrlabError(
                    f"train.encoder_tuning.last_blocks={last}, but '{member.name}' has {len(blocks)} blocks "
                    "up to the layer its tokens come from"
                )
            scopes.extend(blocks[-int(last) :])
        else:
            scopes.append(member)
    encoder.requires_grad_(False)
    if rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        scope_ids = {id(m) for s in scopes for m in s.modules()}
        targets = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and id(m) in scope_ids]
        if not targets:
            raise VrlabError("train.encoder_tuning.lora_r > 0, but the tower has no linear layers to adapt")
        config = LoraConfig(
            r=rank, lora_alpha=int(settings.get("lora_alpha") or 2 * rank), target_modules=targets
        )
        inject_adapter_in_model(config, encoder)
        for name, p in encoder.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for scope in scopes:
            scope.requires_grad_(True)
    if not any(p.requires_grad for p in encoder.parameters()):
        raise VrlabError("train.tune_encoder=true left no tower parameter to train")
    return {
        "weights": TOWER_FILE,
        "learning_rate": float(2e-6 if settings.get("learning_rate") is None else settings["learning_rate"]),
        "last_blocks": int(last) if last else None,
        "lora_r": rank,
    }


def merged_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's state with any LoRA merged into its base layers, under the untuned module's names."""
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in encoder.modules()):
        return encoder.state_dict()
    encoder = copy.deepcopy(encoder)
    for name, module in list(encoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(
                encoder.get_submodule(parent_name) if parent_name else encoder, child, module.get_base_layer()
            )
    return encoder.state_dict()


def save_tower(encoder: nn.Module, folder: str | Path) -> Path:
    """Write the tuned tower into a model folder (safetensors; shared tensors written once each)."""
    from safetensors.torch import save

    from vrlab.runtime import atomic_write_bytes

    path = Path(folder) / TOWER_FILE
    state = {k: v.detach().clone().contiguous() for k, v in merged_state(encoder).items()}
    atomic_write_bytes(path, save(state))
    return path
