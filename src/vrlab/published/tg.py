"""TG-LLaVA's text-guided branch (`mm_cross_attn`: query_tokens, resize_linear, a LAVIS BERT Q-Former,
zero_layer) mapped onto vrlab's `tg` adapter; its perceiver detail branch (`mm_patch_encoder`) is refused."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vrlab.adapters import build_adapter
from vrlab.errors import ShapeError, VrlabError
from vrlab.published.common import ImportOptions

_LAVIS_TO_HF = (
    (r"^embeddings\.LayerNorm\.", "layernorm."),
    (r"\.attention\.self\.", ".attention.attention."),
    (r"\.crossattention\.self\.", ".crossattention.attention."),
)
# The Q-Former's text path, which a query-only forward (TG-LLaVA's) never runs.
_LAVIS_UNUSED = re.compile(
    r"^(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
    r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def tg_adapter(
    cross: Mapping[str, torch.Tensor],
    projector_module: torch.nn.Module,
    projector_cfg: Mapping[str, Any],
    encoder: Any,
    text_dim: int | None,
    options: ImportOptions,
    where: Path,
) -> tuple[torch.nn.Module, dict[str, Any], list[str]]:
    """TG-LLaVA's `mm_cross_attn` (query_tokens, resize_linear, Qformer, zero_layer) as vrlab's `tg` adapter."""
    if projector_cfg["type"] != "mlp2x_gelu":
        raise VrlabError(f"{where}: TG-LLaVA's projector is mlp2x_gelu; this one is {projector_cfg['type']}")
    needed = ("query_tokens", "resize_linear.weight", "resize_linear.bias", "zero_layer.weight")
    missing = [k for k in needed if k not in cross]
    if missing:
        raise VrlabError(f"{where}: mm_cross_attn lacks {['model.mm_cross_attn.' + k for k in missing]}")
    hidden, n_latents = int(cross["query_tokens"].shape[-1]), int(cross["query_tokens"].shape[1])
    text_in = int(cross["resize_linear.weight"].shape[1])
    if text_dim is not None and int(text_dim) != text_in:
        raise ShapeError(f"{where}: mm_text_hidden_size={text_dim} but resize_linear takes {text_in}")
    state = {
        "latents": cross["query_tokens"],
        "text_proj.weight": cross["resize_linear.weight"],
        "text_proj.bias": cross["resize_linear.bias"],
        "zero.weight": cross["zero_layer.weight"],
        "zero.bias": cross["zero_layer.bias"],
    }
    state.update({f"projector.{k[len('net.') :]}": v for k, v in projector_module.state_dict().items()})
    dropped, unmapped = [], []
    for key, value in cross.items():
        if not key.startswith("Qformer."):
            if key.split(".")[0] not in ("query_tokens", "resize_linear", "zero_layer"):
                unmapped.append(key)
            continue
        inner = key[len("Qformer.") :]
        if _LAVIS_UNUSED.match(inner):
            dropped.append(f"model.mm_cross_attn.{key}")
            continue
        if not inner.startswith("bert."):
            unmapped.append(key)
            continue
        name = inner[len("bert.") :]
        for pattern, repl in _LAVIS_TO_HF:
            name = re.sub(pattern, repl, name)
        state[f"qformer.{name}"] = value
    layers = {int(m.group(1)) for k in state if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    cfg = {
        "type": "tg",
        "in_dim": int(projector_cfg["in_dim"]),
        "out_dim": int(projector_cfg["out_dim"]),
        "encoder": encoder.name,
        "llm": projector_cfg["llm"],
        "num_tokens": n_latents,
        "text_dim": text_in,
        "hidden": hidden,
        "layers": len(layers),
        "heads": int(options.qformer_heads),
    }
    if n_latents != encoder.num_tokens:
        raise ShapeError(
            f"{where}: mm_cross_attn has {n_latents} latents but tower '{encoder.name}' gives "
            f"{encoder.num_tokens} tokens"
        )
    module = build_adapter(cfg)
    expected = set(module.state_dict())
    surplus = sorted(set(state) - expected)
    absent = sorted(expected - set(state))
    if unmapped or surplus or absent:
        named = [f"model.mm_cross_attn.{k}" for k in unmapped] + surplus + [f"(missing) {k}" for k in absent]
        raise VrlabError(
            f"{where}: TG-LLaVA's mm_cross_attn does not map onto vrlab's tg adapter: {named[:6]}"
            + (f" and {len(named) - 6} more" if len(named) > 6 else "")
        )
    module.load_state_dict(state)
    return module, cfg, dropped


def refuse_detail(state: Mapping[str, torch.Tensor], where: Path) -> None:
    keys = sorted(state)
    if keys:
        raise VrlabError(
            f"{where}: TG-LLaVA's detail branch ({len(keys)} tensors: {keys[:3]}...) is an Idefics2-style "
            "perceiver over text then tile tokens; vrlab's tg detail branch is a Q-Former, so these weights "
            "do not map onto it. Import a checkpoint without model.mm_patch_encoder.*"
        )
