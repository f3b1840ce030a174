"""LLaVA's own layout (LLaVA-1.5, the Law paper's and LMVR's releases, TG-LLaVA's base): `config.json` with
`mm_*` fields, LLM shards holding `model.mm_projector.*`, and stage-1 folders with `mm_projector.bin`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vrlab.adapters import build_adapter
from vrlab.checkpoint import save_adapter
from vrlab.errors import ShapeError, VrlabError
from vrlab.mllm.conversation import IMAGE_TOKEN
from vrlab.published.common import (
    TOKENIZER_FILES,
    ImportOptions,
    aspect_policy,
    file_digests,
    llm_shards,
    model_config,
    read_json,
    read_tensors,
    strip_prefix,
    template_name,
)
from vrlab.published.tg import refuse_detail, tg_adapter
from vrlab.runtime import atomic_write_json

# Keys LLaVA adds to the LLM's config; the LLM folder vrlab writes is the plain LLM without them.
_LLAVA_KEYS = (
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_crop_resolution",
    "image_split_resolution",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "unfreeze_mm_vision_tower",
    "mm_vision_tower_lr",
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
)


def _check_llava_fields(config: Mapping[str, Any], where: Path) -> None:
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise VrlabError(
            f"{where}: mm_vision_select_feature='{feature}' keeps the CLS token; vrlab's towers give patch "
            "tokens only ('patch')"
        )
    if config.get("mm_use_im_start_end"):
        raise VrlabError(
            f"{where}: mm_use_im_start_end=true wraps the image in <im_start>/<im_end> tokens, which vrlab's "
            "models do not emit; only checkpoints trained without them (LLaVA-1.5, LMVR) are imported"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise VrlabError(f"{where}: mm_patch_merge_type='{merge}' (AnyRes) is not supported; only 'flat'")


def _projector_type(keys: list[str], declared: str | None, where: Path) -> str:
    """LLaVA's projector type from its config, checked against the weight names (`0.weight`, `2.weight`...)."""
    if declared is not None and declared != "linear" and not re.fullmatch(r"mlp\d+x_gelu", declared):
        raise VrlabError(
            f"{where}: mm_projector_type='{declared}' is not linear or mlp<N>x_gelu, the projectors vrlab builds"
        )
    layers = sorted({int(k.split(".")[0]) for k in keys if k.split(".")[0].isdigit()})
    inferred = "linear" if not layers else f"mlp{len(layers)}x_gelu"
    if layers and layers != list(range(0, 2 * len(layers), 2)):
        raise VrlabError(f"{where}: projector weights {sorted(keys)} are not a Linear/GELU stack")
    if declared is not None and declared != inferred:
        raise VrlabError(
            f"{where}: mm_projector_type='{declared}' but the weights hold a {inferred} projector ({sorted(keys)})"
        )
    return inferred


# The Law paper's diffusion towers record their feature settings in config.json (its only record of them):
# config key -> the diffusion card's option.
DIFFUSION_KEYS = {
    "img_size": "image_size",
    "t": "t",
    "up_ft_index": "block",
    "ensemble_size": "ensemble_size",
}


def registry_tower(
    name: str, config: Mapping[str, Any], options: ImportOptions, where: Path
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The registry encoder named by the checkpoint, with the settings its config records: LLaVA's select
    layer on members whose card has a `layer`, the Law paper's diffusion settings on diffusion members.
    Returns the encoder and the overrides per member (what a projector trained on it needs again)."""
    from vrlab.encoders.factory import build_encoder
    from vrlab.registry import Registry

    registry = Registry.from_config(dict(options.registry))
    try:
        cards = registry.resolve(name)
    except VrlabError as exc:
        raise VrlabError(
            f"{where}: vision tower '{name}' is not a registered encoder ({exc}); give its registry name "
            "with import.tower=<name>, or add a card for it"
        ) from exc
    overrides: dict[str, dict[str, Any]] = {}
    select_layer = config.get("mm_vision_select_layer")
    for card in cards:
        own = {}
        if select_layer is not None and "layer" in card.spec:
            own["layer"] = int(select_layer)
        if "t" in card.spec and "block" in card.spec:  # a diffusion card
            own.update({ours: config[theirs] for theirs, ours in DIFFUSION_KEYS.items() if theirs in config})
        changed = {k: v for k, v in own.items() if card.spec.get(k) != v}
        if changed:
            overrides[card.name] = changed
    encoder = build_encoder(registry, name, overrides, dict(options.compose) or None).eval()
    return encoder, overrides


def _check_tower_weights(encoder: Any, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Tower weights saved in a checkpoint must be the registry tower's: vrlab builds the tower by name."""
    if not state:
        return
    model = getattr(encoder, "model", None)
    theirs = {k.rsplit("vision_tower.", 1)[-1]: v for k, v in state.items()}
    ours = model.state_dict() if model is not None else {}
    differ = [k for k, v in theirs.items() if k not in ours or not torch.equal(ours[k].to(v.dtype), v)]
    if differ:
        raise VrlabError(
            f"{where}: the checkpoint carries vision tower weights ({len(theirs)} tensors) that differ from "
            f"encoder '{encoder.name}' (first: '{differ[0]}'); a fine-tuned tower cannot be imported by name"
        )


def _adapter_from_llava(
    projector: Mapping[str, torch.Tensor], config: Mapping[str, Any], encoder: Any, llm: str, where: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not projector:
        raise VrlabError(f"{where}: no model.mm_projector.* weights found")
    kind = _projector_type(list(projector), config.get("mm_projector_type"), where)
    first = projector["0.weight" if kind != "linear" else "weight"]
    in_dim, out_dim = int(first.shape[1]), int(first.shape[0])
    declared = config.get("mm_hidden_size")
    if declared is not None and int(declared) != in_dim:
        raise ShapeError(f"{where}: mm_hidden_size={declared} but the projector takes {in_dim}")
    if in_dim != encoder.dim:
        raise ShapeError(
            f"{where}: the projector takes width {in_dim} but tower '{encoder.name}' gives {encoder.dim}"
        )
    cfg = {"type": kind, "in_dim": in_dim, "out_dim": out_dim, "encoder": encoder.name, "llm": llm}
    module = build_adapter(cfg)
    module.load_state_dict({f"net.{k}": v for k, v in projector.items()})
    return module, cfg


# LAVIS/BERT Q-Former names (TG-LLaVA's mm_cross_attn.Qformer.bert) -> transformers' Blip2QFormerModel names.
def _llm_type(model_type: str, where: Path) -> str:
    """The transformers model type of a LLaVA config's LLM: `llava` (LLaVA-1.5's releases) is Llama."""
    from transformers import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING and model_type != "llava":
        return model_type
    parts = [p for p in model_type.split("_") if p != "llava"]
    if not parts:
        return "llama"
    for n in range(len(parts), 0, -1):
        candidate = "_".join(parts[:n])
        if candidate in CONFIG_MAPPING:
            return candidate
    if parts[0] == "qwen":
        return "qwen2"
    raise VrlabError(
        f"{where}: model_type '{model_type}' names no language model transformers knows; LLaVA's "
        "llava/llava_llama (Llama), llava_mistral, llava_qwen2 ... are recognised"
    )


def _write_llm(
    source: Path, config: Mapping[str, Any], shards: list[Path], out: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The plain LLM (config, tokenizer with `<image>`, safetensors shards) from LLaVA's shards.

    Shards are rewritten one at a time, so a 7B checkpoint never sits in memory twice. Returns the
    multimodal parts by prefix and the names of the recomputed buffers dropped (`rotary_emb.inv_freq`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = source / "config.json"
    fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in _LLAVA_KEYS}
    llm_config = AutoConfig.for_model(_llm_type(str(config.get("model_type", "llava")), where), **fields)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(llm_config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    embed_name = next(
        n for n, p in reference.named_parameters() if p is reference.get_input_embeddings().weight
    )
    head = reference.get_output_embeddings()
    head_name = next(
        (n for n, p in reference.named_parameters() if head is not None and p is head.weight), None
    )
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    rows = int(llm_config.vocab_size)
    grow = max(0, len(tokenizer) - rows)

    parts: dict[str, dict[str, torch.Tensor]] = {
        "mm_projector": {},
        "mm_cross_attn": {},
        "mm_patch_encoder": {},
        "vision_tower": {},
    }
    dropped, seen, weight_map, total = [], set(), {}, 0
    out.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        llm_part = {}
        for key, value in read_tensors(shard).items():
            part = next((p for p in parts if key.startswith((f"model.{p}.", f"{p}."))), None)
            if part is not None:
                parts[part][key] = value
            elif key.endswith("rotary_emb.inv_freq"):
                dropped.append(key)
            elif key in ("model.image_newline", "image_newline"):
                raise VrlabError(f"{shard}: '{key}' belongs to AnyRes (LLaVA-NeXT), which vrlab does not run")
            else:
                if key not in expected:
                    raise VrlabError(
                        f"{shard}: '{key}' is neither a weight of the {llm_config.model_type} LLM its config "
                        "describes nor a LLaVA module vrlab imports (mm_projector, mm_cross_attn, vision_tower)"
                    )
                if tuple(value.shape) != expected[key]:
                    raise ShapeError(
                        f"{shard}: '{key}' has shape {list(value.shape)}; config.json makes it {list(expected[key])}"
                    )
                if grow and key in (embed_name, head_name):  # room for <image>: the rows' mean, deterministic
                    value = torch.cat(
                        [value, value.float().mean(0, keepdim=True).to(value.dtype).repeat(grow, 1)]
                    )
                llm_part[key] = value.contiguous()
                seen.add(key)
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(llm_part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(llm_part, name))
        total += sum(v.numel() * v.element_size() for v in llm_part.values())
    missing = sorted(set(expected) - seen - ({head_name} if tied and head_name else set()))
    if missing:
        raise VrlabError(
            f"{source}: the LLM shards lack {len(missing)} weight(s) its config needs, e.g. {missing[:3]}"
        )
    atomic_write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    if grow:
        llm_config.vocab_size = rows + grow
    llm_config.architectures = [type(reference).__name__]
    llm_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return parts, dropped


def import_llava(source: Path, out: Path, options: ImportOptions, fmt: str) -> dict[str, Any]:
    where = source / "config.json"
    config = read_json(where)
    _check_llava_fields(config, where)
    tower = options.tower or config.get("mm_vision_tower")
    if not tower:
        raise VrlabError(f"{where} has no mm_vision_tower; name the tower with import.tower=<registry name>")
    encoder, tower_args = registry_tower(str(tower), config, options, where)
    aspect = aspect_policy(config.get("image_aspect_ratio"), str(where))
    shards = llm_shards(source)
    parts, dropped = _write_llm(source, config, shards, out / "llm")
    _check_tower_weights(encoder, parts["vision_tower"], where)
    projector, adapter_cfg = _adapter_from_llava(
        strip_prefix(parts["mm_projector"], "mm_projector"), config, encoder, "llm", where
    )
    text_tower: dict[str, Any] = {}
    if fmt == "tg_llava":
        refuse_detail(parts["mm_patch_encoder"], where)
        given = options.text_tower or config.get("mm_text_tower")
        if not given:
            raise VrlabError(f"{where} has no mm_text_tower; give import.text_tower=<CLIP checkpoint>")
        text_tower = dict(given) if isinstance(given, Mapping) else {"source": str(given)}
        projector, adapter_cfg, unused = tg_adapter(
            strip_prefix(parts["mm_cross_attn"], "mm_cross_attn"),
            projector,
            adapter_cfg,
            encoder,
            config.get("mm_text_hidden_size"),
            options,
            where,
        )
        dropped += unused
    elif parts["mm_cross_attn"] or parts["mm_patch_encoder"]:
        raise VrlabError(
            f"{where}: weights hold mm_cross_attn/mm_patch_encoder (TG-LLaVA) but no mm_text_tower"
        )
    save_adapter(projector, out / "adapter", adapter_cfg)
    model_cfg = model_config(encoder, adapter_cfg, template_name(options, "vicuna_v1"), aspect, text_tower)
    files = [where, *shards, *(source / f for f in TOKENIZER_FILES if (source / f).is_file())]
    return {
        "config": model_cfg,
        "files": file_digests(files, source),
        "tower": str(tower),
        "encoder_args": tower_args,
        "dropped": dropped,
    }


def import_stage1(source: Path, out: Path, options: ImportOptions) -> dict[str, Any]:
    folder = source if source.is_dir() else source.parent
    weights = source if source.is_file() else folder / "mm_projector.bin"
    if not weights.is_file():
        raise VrlabError(f"{folder} has no mm_projector.bin")
    where = folder / "config.json"
    config = read_json(where) if where.is_file() else {}
    if config:
        _check_llava_fields(config, where)
    tower = options.tower or config.get("mm_vision_tower")
    if not tower:
        raise VrlabError(
            f"{weights}: no config.json with mm_vision_tower beside it; name the tower with import.tower=<name>"
        )
    encoder, tower_args = registry_tower(str(tower), config, options, where)
    state = read_tensors(weights)
    module, cfg = _adapter_from_llava(
        strip_prefix(state, "mm_projector"), config, encoder, str(config.get("_name_or_path", "")), weights
    )
    files, dropped = [weights, *([where] if config else [])], []
    cross_file = folder / "mm_cross_attn.bin"
    if cross_file.is_file() and source.is_dir():
        detail = folder / "mm_patch_encoder.bin"
        if detail.is_file():
            refuse_detail(read_tensors(detail), detail)
        module, cfg, dropped = tg_adapter(
            strip_prefix(read_tensors(cross_file), "mm_cross_attn"),
            module,
            cfg,
            encoder,
            config.get("mm_text_hidden_size"),
            options,
            cross_file,
        )
        files.append(cross_file)
    # the tower settings the projector was trained on, applied again wherever the adapter is used
    extra = {"encoder_args": tower_args} if tower_args else {}
    save_adapter(module, out, {**cfg, "template": template_name(options, "plain"), **extra})
    return {
        "files": file_digests(files, folder),
        "tower": str(tower),
        "encoder_args": tower_args,
        "dropped": dropped,
    }
