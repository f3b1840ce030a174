"""The text tower TG-LLaVA's adapter is guided by: the text half of a CLIP, SigLIP or SigLIP 2 checkpoint,
loaded by its own transformers class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vrlab.errors import VrlabError

# model_type of a checkpoint -> the text-only class TG-LLaVA's guide loads from it (full checkpoints too).
TEXT_TOWERS = {
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "siglip_text_model": "SiglipTextModel",
    "siglip2": "Siglip2TextModel",
    "siglip2_text_model": "Siglip2TextModel",
}


def load_text_tower(spec: Mapping[str, Any] | None) -> tuple[nn.Module, Any]:
    """The text tower TG-LLaVA guides with: `{source, model_subfolder?, tokenizer_subfolder?}`, a CLIP, SigLIP
    or SigLIP 2 checkpoint (its pooled output guides; its width is read from the model)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if not spec or not spec.get("source"):
        raise VrlabError(
            "adapter=tg needs adapter.text_tower.source (a CLIP or SigLIP checkpoint, e.g. "
            "openai/clip-vit-large-patch14-336 or google/siglip-so400m-patch14-384)"
        )
    subfolder = spec.get("model_subfolder") or ""
    kind = AutoConfig.from_pretrained(spec["source"], subfolder=subfolder).model_type
    if kind not in TEXT_TOWERS:
        raise VrlabError(
            f"text tower '{spec['source']}' is a {kind} model; TG-LLaVA's guide takes CLIP, SigLIP or SigLIP 2 "
            f"text towers ({sorted(TEXT_TOWERS)})"
        )
    model = getattr(transformers, TEXT_TOWERS[kind]).from_pretrained(spec["source"], subfolder=subfolder)
    tokenizer = AutoTokenizer.from_pretrained(spec["source"], subfolder=spec.get("tokenizer_subfolder") or "")
    return model.eval(), tokenizer
