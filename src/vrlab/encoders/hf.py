"""Transformers backend: CLIP, SigLIP, DINOv2 (with or without registers) and any ViT-like `AutoModel`.

The model is built with `from_pretrained(source)`, exactly as a user loads real weights; `source` is a hub id
or a local folder. A full CLIP/SigLIP checkpoint (image + text) loads only its vision tower. Tokens are the
hidden states of `layer` (LLaVA's `mm_vision_select_layer`, −2 by default) with the prefix tokens (CLS,
registers) dropped: whatever precedes the last h·w positions.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from vrlab.encoders.base import Features, VisionEncoder, as_size, image_transform
from vrlab.errors import ShapeError, VrlabError

# model_type of a checkpoint -> the vision-only class to load from it (full checkpoints hold a text tower too).
VISION_CLASSES = {
    "clip": "transformers.CLIPVisionModel",
    "clip_vision_model": "transformers.CLIPVisionModel",
    "siglip": "transformers.SiglipVisionModel",
    "siglip_vision_model": "transformers.SiglipVisionModel",
}
DEFAULT_NORMALIZE = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
}


def _import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise VrlabError(f"cannot import model_class '{path}': {exc}") from exc


def load_quietly(cls: Any, source: str, kwargs: dict[str, Any]) -> Any:
    """`from_pretrained` without the load report listing the text-tower weights a vision-only class skips."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            return cls.from_pretrained(source, **kwargs).eval()
        except (ValueError, ImportError):
            kwargs.pop("attn_implementation", None)  # models without SDPA support fall back to their default
            return cls.from_pretrained(source, **kwargs).eval()
    finally:
        hf_logging.set_verbosity(level)


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face vision transformer, loaded with `from_pretrained`."""

    def __init__(
        self,
        source: str,
        layer: int = -2,
        image_size: int | Sequence[int] | None = None,
        pooled: bool = True,
        model_class: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        **transform: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(source, **kwargs)
        model_type = getattr(config, "model_type", "")
        cls = (
            _import_class(model_class or VISION_CLASSES[model_type])
            if (model_class or model_type in VISION_CLASSES)
            else AutoModel
        )
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = load_quietly(cls, source, kwargs)
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        patch = getattr(vcfg, "patch_size", None)
        if patch is None:
            raise VrlabError(
                f"model at '{source}' has no patch_size in its config; is it a vision transformer?"
            )
        self.patch_size = as_size(patch)
        native = as_size(getattr(vcfg, "image_size", 224))
        size = as_size(image_size) if image_size is not None else native
        self.native_size = native
        self.layer, self.use_pooled, self.source = int(layer), bool(pooled), source
        n_layers = getattr(vcfg, "num_hidden_layers", None)
        if n_layers is not None and not -(n_layers + 1) <= self.layer <= n_layers:
            raise VrlabError(
                f"layer={layer} is out of range for '{source}' ({n_layers} layers; hidden states 0..{n_layers})"
            )
        self.transform = image_transform(size, DEFAULT_NORMALIZE.get(model_type, "imagenet"), **transform)
        params = inspect.signature(self.model.forward).parameters
        # CLIP and SigLIP need to be told to resample position embeddings; DINOv2 always does.
        self._interp_kw = (
            {"interpolate_pos_encoding": True}
            if size != native and "interpolate_pos_encoding" in params
            else {}
        )
        # At its own resolution a checkpoint may leave a remainder (SigLIP SO400M: 384 px, patch 14, 27 x 27
        # patches): its patch convolution drops those pixels, as it did in training. Elsewhere, refuse.
        if size != native and (size[0] % self.patch_size[0] or size[1] % self.patch_size[1]):
            raise ShapeError(
                f"image_size {size} of '{source}' is not a multiple of its patch size {self.patch_size}"
            )

    def _shape(self) -> tuple[int, tuple[int, int]]:
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        h, w = self.image_size
        return int(vcfg.hidden_size), (h // self.patch_size[0], w // self.patch_size[1])

    def backend_settings(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "source": self.source,
            "layer": self.layer,
            "pooled": self.use_pooled,
        }

    def forward(self, pixels: torch.Tensor) -> Features:
        out = self.model(pixel_values=pixels, output_hidden_states=True, **self._interp_kw)
        hidden = out.hidden_states[self.layer]
        h, w = self.grid
        if hidden.shape[1] < h * w:
            raise ShapeError(f"'{self.source}' gave {hidden.shape[1]} tokens, fewer than its {h}x{w} grid")
        pooled = getattr(out, "pooler_output", None) if self.use_pooled else None
        return Features(tokens=hidden[:, -h * w :], grid=(h, w), pooled=pooled)
