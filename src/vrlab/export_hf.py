"""Export a vrlab VisionLanguageModel to the Hugging Face LLaVA format (`LlavaForConditionalGeneration`), or
to LLaVA-NeXT's (`LlavaNextForConditionalGeneration`) for a model trained with resolution=anyres: the same
tower, projector and LLM, plus the pinpoints and the adapter's learned newline (`image_newline`).

LLaVA can express: one Hugging Face CLIP or SigLIP vision tower at its native resolution, features of one
hidden layer with the CLS token dropped (CLIP, `vision_feature_select_strategy="default"`) or none to drop
(SigLIP, `"full"`), a `linear` or `mlp2x_gelu` adapter and a causal LLM. `mlp2x_gelu` maps onto LLaVA's
projector as is; `linear` becomes `linear_1` = the adapter, activation `linear` (identity) and `linear_2` =
identity, so the logits are vrlab's exactly. Anything else is refused with the reason.

The folder holds the model (safetensors), a `LlavaProcessor` (tokenizer with `<image>`, a CLIP image
processor at the tower's size and normalisation) and a `vicuna_v1` chat template that takes string or list
message content. vrlab pads images to square with the mean colour before resizing; the processor resizes
and crops as LLaVA's does, so only pixel inputs prepared the vrlab way reproduce vrlab's numbers exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from vrlab.checkpoint import VLM_CONFIG
from vrlab.errors import VrlabError
from vrlab.mllm.conversation import IMAGE_TOKEN, VICUNA_SYSTEM

log = logging.getLogger(__name__)

VICUNA_TEMPLATE = (
    '{{- "' + VICUNA_SYSTEM + ' " -}}'
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set has_image = '<image>' in text -%}"
    "{%- else -%}{%- set ns = namespace(text='', image=false) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.image = true -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- set has_image = ns.image -%}{%- endif -%}"
    "{%- set text = text.replace('<image>', '').strip() -%}"
    "{%- if message['role'] == 'user' -%}USER: {{ '<image>\\n' if has_image else '' }}{{ text }} ASSISTANT:"
    "{%- elif message['role'] == 'assistant' -%} {{ text }}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def _refuse(checkpoint: Path, why: str) -> VrlabError:
    return VrlabError(f"cannot export {checkpoint} to the LLaVA format: {why}")


def _tower(model: Any, checkpoint: Path) -> tuple[Any, str]:
    """The HF vision model and LLaVA's select strategy, or an error saying what LLaVA cannot express."""
    from vrlab.encoders.hf import HFVisionEncoder

    enc = model.encoder
    strategy = getattr(enc, "strategy", "fixed")
    if strategy == "native":
        raise _refuse(checkpoint, "resolution=native has no LLaVA or LLaVA-NeXT form (anyres and fixed do)")
    enc = getattr(enc, "base", enc)  # anyres: the tower that encodes every view
    if not isinstance(enc, HFVisionEncoder):
        raise _refuse(checkpoint, f"encoder '{enc.name}' is not a single Hugging Face CLIP or SigLIP tower")
    kind = type(enc.model).__name__
    if kind not in ("CLIPVisionModel", "SiglipVisionModel"):
        raise _refuse(checkpoint, f"vision model {kind} is neither CLIPVisionModel nor SiglipVisionModel")
    if enc._interp_kw:
        raise _refuse(checkpoint, f"the encoder runs at {enc.image_size}, not the tower's native resolution")
    h, w = enc.grid
    with torch.no_grad():
        total = enc.model(pixel_values=enc.example_input()).last_hidden_state.shape[1]
    prefix = total - h * w
    if prefix not in (0, 1):
        raise _refuse(checkpoint, f"the tower has {prefix} prefix tokens; LLaVA drops one (CLS) or none")
    return enc.model, "default" if prefix == 1 else "full"


def _projector_state(model: Any, checkpoint: Path, width: int) -> tuple[dict[str, torch.Tensor], str]:
    kind = model.config_dict["adapter"]["type"]
    net = getattr(model.adapter, "net", None)
    if kind == "mlp2x_gelu":
        return {
            "linear_1.weight": net[0].weight,
            "linear_1.bias": net[0].bias,
            "linear_2.weight": net[2].weight,
            "linear_2.bias": net[2].bias,
        }, "gelu"
    if kind == "linear":
        return {
            "linear_1.weight": net.weight,
            "linear_1.bias": net.bias,
            "linear_2.weight": torch.eye(width, dtype=net.weight.dtype),
            "linear_2.bias": torch.zeros(width, dtype=net.weight.dtype),
        }, "linear"
    raise _refuse(checkpoint, f"adapter '{kind}' is not linear or mlp2x_gelu")


def export_llava(checkpoint: str | Path, out: str | Path) -> Path:
    """Write `checkpoint` (a vrlab stage-2 model folder) to `out` as a LlavaForConditionalGeneration folder,
    or, for a model trained with resolution=anyres, as a LlavaNextForConditionalGeneration folder."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from vrlab.mllm.model import VisionLanguageModel

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / VLM_CONFIG).is_file():
        raise VrlabError(f"checkpoint {checkpoint} is not a vrlab model ({VLM_CONFIG} missing)")
    config = json.loads((checkpoint / VLM_CONFIG).read_text())
    if config["adapter"]["type"] not in ("linear", "mlp2x_gelu"):
        raise _refuse(checkpoint, f"adapter '{config['adapter']['type']}' is not linear or mlp2x_gelu")
    model = VisionLanguageModel.from_pretrained(checkpoint)
    if model.is_seq2seq:
        raise _refuse(checkpoint, "the LLM is encoder-decoder (seq2seq); LLaVA needs a causal LM")
    if model.template != "vicuna_v1":
        log.warning("model template is %s; the exported chat template is vicuna_v1", model.template)
    tower, strategy = _tower(model, checkpoint)
    width = int(model.llm.config.hidden_size)
    projector, act = _projector_state(model, checkpoint, width)
    h, w = model.encoder.grid
    base = getattr(model.encoder, "base", model.encoder)
    anyres = base is not model.encoder
    common = dict(
        vision_config=tower.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_index=int(model.image_token_id),
        image_seq_length=h * w,
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=int(base.layer),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )
    if anyres:
        pinpoints = model.encoder.transform.pinpoints
        llava = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        with torch.no_grad():
            llava.model.image_newline.copy_(model.adapter.image_newline)
    else:
        llava = LlavaForConditionalGeneration(LlavaConfig(**common))
    llava.eval()
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.model.multi_modal_projector.load_state_dict(projector)
    llava.model.language_model.load_state_dict(model.llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(out)
    transform = base.transform
    processor_args = dict(
        size={"shortest_edge": min(transform.size)},
        crop_size={"height": transform.size[0], "width": transform.size[1]},
        image_mean=transform.mean.flatten().tolist(),
        image_std=transform.std.flatten().tolist(),
    )
    if anyres:
        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **processor_args)
    else:
        image_processor = CLIPImageProcessor(**processor_args)
    tokenizer = model.tokenizer
    tokenizer.chat_template = VICUNA_TEMPLATE
    patch = tower.config.patch_size
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        chat_template=VICUNA_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if strategy == "default" else 0,
    )
    processor.save_pretrained(out)
    kind = "LLaVA-NeXT, anyres" if anyres else "LLaVA"
    log.info("exported %s to %s (%s, %s adapter, %d base image tokens)", checkpoint, out, kind, act, h * w)
    return out
