"""Transformers backend: CLIP, SigLIP (1 and 2, NaFlex too), DINOv2, DINOv3, MAE, the vision towers of
InternVL and Qwen2.5-VL, and any ViT-like `AutoModel`.

The model is built with `from_pretrained(source)`, exactly as a user loads real weights; `source` is a hub id
or a local folder. A full CLIP/SigLIP checkpoint (image + text) loads only its vision tower; the tower of an
MLLM checkpoint loads from its sub-config (`subconfig: vision_config`) with its weight names mapped
(`key_mapping`), and any weight the tower lacks in the checkpoint is an error, never a random init. Tokens
are the hidden states of `layer` (LLaVA's `mm_vision_select_layer`, −2 by default) with the prefix tokens
(CLS, registers) dropped: whatever precedes the last h·w positions.

Three families take other inputs than a pixel batch, built here from the same transformed pixels: SigLIP 2
NaFlex (patch rows, a patch mask and each image's patch grid), MAE (no masking: `mask_ratio` 0 and the
identity permutation as its noise) and Qwen2.5-VL (flattened 2-frame patches and `grid_thw`; its tokens are
the patch merger's output, one per 2x2 patches, in the width the LLM reads).
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
    "siglip2": "transformers.Siglip2VisionModel",
    "siglip2_vision_model": "transformers.Siglip2VisionModel",
    "qwen2_5_vl_vision": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
}
DEFAULT_NORMALIZE = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip",
    "siglip2_vision_model": "siglip",
    "qwen2_5_vl_vision": "clip",
}
NAFLEX = {"siglip2", "siglip2_vision_model"}
MERGED = {"qwen2_5_vl_vision"}  # Qwen2.5-VL's vision sub-config


def _import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise VrlabError(f"cannot import model_class '{path}': {exc}") from exc


def load_quietly(cls: Any, source: str, kwargs: dict[str, Any], strict: bool = False) -> Any:
    """`from_pretrained` without the load report listing the text-tower weights a vision-only class skips.

    With `strict`, a weight of the model that the checkpoint does not hold is an error: transformers would
    leave it at its random init with a log line, which is how a tower class silently loads nothing from a
    checkpoint whose names it does not know.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    kwargs = {**kwargs, "output_loading_info": True}
    try:
        try:
            model, info = cls.from_pretrained(source, **kwargs)
        except (ValueError, ImportError):
            kwargs.pop("attn_implementation", None)  # models without SDPA support fall back to their default
            model, info = cls.from_pretrained(source, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info.get("missing_keys") or ()) + sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()
    )
    if strict and missing:
        raise VrlabError(
            f"'{source}' does not hold the weights {cls.__name__} needs: {missing[:4]} and "
            f"{max(0, len(missing) - 4)} more are missing or misshapen. If the tower sits inside a larger "
            "checkpoint, set the card's 'subconfig' and 'key_mapping' (see the InternViT and Qwen2.5-VL cards)"
        )
    return model.eval()


def _check_layer(layer: int, n_layers: int, source: str, what: str) -> None:
    """A hidden-state index must name one of the n+1 hidden states (0..n, or negative from the last)."""
    if not -(n_layers + 1) <= layer <= n_layers:
        raise VrlabError(
            f"{what}{layer} is out of range for '{source}' ({n_layers} layers; hidden states 0..{n_layers})"
        )


class HFVisionEncoder(VisionEncoder):
    """A Hugging Face vision transformer, loaded with `from_pretrained`."""

    def __init__(
        self,
        source: str,
        layer: int = -2,
        image_size: int | Sequence[int] | None = None,
        pooled: bool = True,
        model_class: str | None = None,
        subconfig: str | None = None,
        key_mapping: dict[str, str] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        **transform: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(source, **kwargs)
        if subconfig:
            if not hasattr(config, subconfig):
                raise VrlabError(f"the config of '{source}' ({config.model_type}) has no '{subconfig}'")
            config = getattr(config, subconfig)
            kwargs["config"] = config
        if key_mapping:
            kwargs["key_mapping"] = dict(key_mapping)
        model_type = getattr(config, "model_type", "")
        if model_type == "vit_mae":
            kwargs["mask_ratio"] = 0.0  # every patch, at inference; the order is fixed in forward
        cls = (
            _import_class(model_class or VISION_CLASSES[model_type])
            if (model_class or model_type in VISION_CLASSES)
            else AutoModel
        )
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = load_quietly(cls, source, kwargs, strict=True)
        self.model_type = model_type
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        patch = getattr(vcfg, "patch_size", None)
        if patch is None:
            raise VrlabError(
                f"model at '{source}' has no patch_size in its config; is it a vision transformer?"
            )
        self.patch_size = as_size(patch)
        # Qwen2.5-VL's merger joins 2x2 patches: its token grid is that of patches twice as large
        self.merge = int(getattr(vcfg, "spatial_merge_size", 1)) if model_type in MERGED else 1
        if model_type in MERGED and int(layer) != -1:
            raise VrlabError(
                f"'{source}' gives the tokens of its patch merger only: set layer=-1 (the card's), not {layer}"
            )
        if (model_type in NAFLEX or model_type in MERGED) and image_size is None:
            raise VrlabError(
                f"'{source}' ({model_type}) takes any size: its card must set image_size (a multiple of "
                f"{self.patch_size[0] * self.merge})"
            )
        native = as_size(getattr(vcfg, "image_size", 224))
        size = as_size(image_size) if image_size is not None else native
        self.native_size = native
        self.layer, self.use_pooled, self.source = int(layer), bool(pooled), source
        self.record_layers: list[int] = []  # set by extraction with extract.layers
        n_layers = getattr(vcfg, "num_hidden_layers", None)
        if n_layers is not None:
            _check_layer(self.layer, n_layers, source, "layer=")
        self.transform = image_transform(size, DEFAULT_NORMALIZE.get(model_type, "imagenet"), **transform)
        params = inspect.signature(self.model.forward).parameters
        # CLIP and SigLIP need to be told to resample position embeddings; DINOv2 always does.
        self._can_interpolate = "interpolate_pos_encoding" in params
        self._interp_kw = self._interpolation(size)
        # At its own resolution a checkpoint may leave a remainder (SigLIP SO400M: 384 px, patch 14, 27 x 27
        # patches): its patch convolution drops those pixels, as it did in training. Elsewhere, refuse.
        step = (self.patch_size[0] * self.merge, self.patch_size[1] * self.merge)
        exact = model_type in NAFLEX or model_type in MERGED  # patch rows cut by hand: no remainder allowed
        if (size != native or exact) and (size[0] % step[0] or size[1] % step[1]):
            raise ShapeError(f"image_size {size} of '{source}' is not a multiple of its patch size {step}")

    def _interpolation(self, size: tuple[int, int]) -> dict[str, Any]:
        return (
            {"interpolate_pos_encoding": True} if size != self.native_size and self._can_interpolate else {}
        )

    def pixel_grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """The token grid of a pixel batch of any size (the `native` resolution strategy feeds many)."""
        step = (self.patch_size[0] * self.merge, self.patch_size[1] * self.merge)
        return pixels.shape[-2] // step[0], pixels.shape[-1] // step[1]

    def _shape(self) -> tuple[int, tuple[int, int]]:
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        width = vcfg.out_hidden_size if self.model_type in MERGED else vcfg.hidden_size
        return int(width), self.pixel_grid(torch.empty(0, 3, *self.image_size))

    def backend_settings(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "source": self.source,
            "layer": self.layer,
            "pooled": self.use_pooled,
        }

    def _naflex_inputs(self, pixels: torch.Tensor) -> dict[str, Any]:
        """SigLIP 2 NaFlex: each image as rows of patches (row-major, each patch's pixels then channels, as
        its image processor cuts them), all valid, with its patch grid."""
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

        rows = torch.stack([convert_image_to_patches(p, self.patch_size[0]) for p in pixels])
        gh, gw = pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1]
        return {
            "pixel_values": rows,
            "pixel_attention_mask": torch.ones(rows.shape[:2], dtype=torch.long, device=pixels.device),
            "spatial_shapes": torch.tensor([[gh, gw]] * len(pixels), device=pixels.device),
        }

    def _merged_forward(self, pixels: torch.Tensor) -> Features:
        """Qwen2.5-VL: the image processor's patch layout (2x2 merge windows, the frame repeated over the
        temporal patch), then the merger's tokens, one per window in raster order."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        vcfg = self.model.config
        flat, gh, gw = Qwen2VLImageProcessor().patchify(
            pixels, self.patch_size[0], self.merge, int(vcfg.temporal_patch_size)
        )
        grid_thw = torch.tensor([[1, gh, gw]] * len(pixels), device=pixels.device)
        out = self.model(flat.reshape(-1, flat.shape[-1]), grid_thw=grid_thw)
        h, w = self.pixel_grid(pixels)
        return Features(tokens=out.pooler_output.reshape(len(pixels), h * w, -1), grid=(h, w))

    def forward(self, pixels: torch.Tensor) -> Features:
        if self.model_type in MERGED:
            return self._merged_forward(pixels)
        inputs: dict[str, Any] = {"pixel_values": pixels}
        if self.model_type in NAFLEX:
            inputs = self._naflex_inputs(pixels)
        elif self.model_type == "vit_mae":
            n = (pixels.shape[-2] // self.patch_size[0]) * (pixels.shape[-1] // self.patch_size[1])
            inputs["noise"] = torch.arange(n, device=pixels.device, dtype=pixels.dtype).expand(len(pixels), n)
        size = tuple(pixels.shape[-2:])
        interp = self._interp_kw if size == self.image_size else self._interpolation(size)
        out = self.model(**inputs, output_hidden_states=True, **interp)
        hidden = out.hidden_states[self.layer]
        h, w = self.pixel_grid(pixels)
        if hidden.shape[1] < h * w:
            raise ShapeError(f"'{self.source}' gave {hidden.shape[1]} tokens, fewer than its {h}x{w} grid")
        pooled = getattr(out, "pooler_output", None) if self.use_pooled else None
        layers = None
        if self.record_layers:  # several layers from the same pass (extract.layers)
            layers = {k: out.hidden_states[k][:, -h * w :] for k in self.record_layers}
        return Features(tokens=hidden[:, -h * w :], grid=(h, w), pooled=pooled, layers=layers)

    def layer_indices(self, layers: Any) -> list[int]:
        """Hidden-state indices for `extract.layers` (`all`: every one, the embeddings' 0 included)."""
        if self.model_type in MERGED:
            raise VrlabError(
                f"'{self.source}' gives its patch merger's tokens only; extract.layers cannot apply"
            )
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        total = int(vcfg.num_hidden_layers)
        if layers == "all":
            return list(range(total + 1))
        for k in layers:
            _check_layer(int(k), total, self.source, "extract.layers: ")
        return list(dict.fromkeys(int(k) for k in layers))
