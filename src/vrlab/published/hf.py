"""Hugging Face's `LlavaForConditionalGeneration` folders (llava-hf, and vrlab's own `task=export_hf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vrlab.adapters import build_adapter
from vrlab.checkpoint import save_adapter
from vrlab.errors import VrlabError
from vrlab.mllm.conversation import IMAGE_TOKEN
from vrlab.published.common import ImportOptions, file_digests, model_config, read_json, template_name


def import_llava_hf(source: Path, out: Path, options: ImportOptions) -> dict[str, Any]:
    """A `LlavaForConditionalGeneration` folder: its tower saved as a local CLIP/SigLIP model, its LLM, its
    projector as a vrlab adapter (LLaVA's `linear_2` = identity with activation `linear` is vrlab's `linear`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from vrlab.encoders.factory import encoder_from_dict

    where = source / "config.json"
    llava = LlavaForConditionalGeneration.from_pretrained(str(source)).eval()
    cfg = llava.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise VrlabError(f"{where}: vision_feature_layer={layer} (several layers) is not supported")
    vision_type = cfg.vision_config.model_type
    if vision_type not in ("clip_vision_model", "siglip_vision_model"):
        raise VrlabError(f"{where}: the vision tower is {vision_type}; vrlab imports CLIP and SigLIP towers")
    tower = llava.model.vision_tower
    tower.save_pretrained(out / "tower")
    preprocessor = (
        read_json(source / "preprocessor_config.json")
        if (source / "preprocessor_config.json").is_file()
        else {}
    )
    spec: dict[str, Any] = {
        "_target_": "vrlab.encoders.hf.HFVisionEncoder",
        "source": "./tower",
        "layer": layer,
    }
    if preprocessor.get("image_mean") and preprocessor.get("image_std"):
        spec.update(mean=list(preprocessor["image_mean"]), std=list(preprocessor["image_std"]))
    card = {"name": f"{source.name}/vision_tower", "family": vision_type.split("_")[0], "spec": spec}
    encoder = encoder_from_dict({**card, "spec": {**spec, "source": str(out / "tower")}})
    with torch.no_grad():
        total = encoder.model(pixel_values=encoder.example_input()).last_hidden_state.shape[1]
    prefix = total - encoder.num_tokens
    if cfg.vision_feature_select_strategy == "full" and prefix:
        raise VrlabError(
            f"{where}: vision_feature_select_strategy='full' keeps {prefix} prefix token(s) (CLS)"
        )

    proj = llava.model.multi_modal_projector
    act = getattr(cfg, "projector_hidden_act", "gelu")
    w2 = proj.linear_2.weight
    b2 = proj.linear_2.bias if proj.linear_2.bias is not None else torch.zeros(w2.shape[0])
    b1 = proj.linear_1.bias if proj.linear_1.bias is not None else torch.zeros(proj.linear_1.weight.shape[0])
    llm_width = int(w2.shape[0])
    if act == "gelu":
        kind, state = (
            "mlp2x_gelu",
            {"net.0.weight": proj.linear_1.weight, "net.0.bias": b1, "net.2.weight": w2, "net.2.bias": b2},
        )
    elif act == "linear" and torch.equal(w2, torch.eye(llm_width, dtype=w2.dtype)) and not b2.any():
        kind, state = "linear", {"net.weight": proj.linear_1.weight, "net.bias": b1}
    else:
        raise VrlabError(
            f"{where}: projector_hidden_act='{act}' is not gelu (mlp2x_gelu) or vrlab's linear export"
        )
    adapter_cfg = {
        "type": kind,
        "in_dim": encoder.dim,
        "out_dim": llm_width,
        "encoder": card["name"],
        "llm": "llm",
    }
    adapter = build_adapter(adapter_cfg)
    adapter.load_state_dict({k: v.detach() for k, v in state.items()})
    save_adapter(adapter, out / "adapter", adapter_cfg)

    llm = AutoModelForCausalLM.from_config(cfg.text_config)
    llm.get_decoder().load_state_dict(llava.model.language_model.state_dict())
    llm.get_output_embeddings().load_state_dict(llava.lm_head.state_dict())
    llm.save_pretrained(out / "llm")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = getattr(cfg, "image_token_index", None)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_id:
        raise VrlabError(
            f"{where}: the tokenizer's '{IMAGE_TOKEN}' is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
            f"the config's image token is {image_id}"
        )
    tokenizer.save_pretrained(out / "llm")
    aspect = "pad" if preprocessor.get("do_pad") else "resize"
    model_cfg = model_config(encoder, adapter_cfg, template_name(options, "vicuna_v1"), aspect, {})
    model_cfg["encoder"] = card  # the relative source: the model folder can move
    files = [p for p in source.iterdir() if p.is_file()]
    return {"config": model_cfg, "files": file_digests(files, source), "tower": card["name"], "dropped": []}
