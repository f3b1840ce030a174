"""timm backend: EVA02 and any other timm vision transformer, built with `timm.create_model`.

`source` is whatever `timm.create_model` takes: a model name with an optional pretrained tag
(`eva02_large_patch14_224.mim_m38m`), `hf-hub:org/name`, or `local-dir:/path` (a folder written by
`timm.models.save_for_hf`). Tokens come from `forward_intermediates` at `layer` (block output, no final norm,
prefix tokens dropped); `pooled` is the model's pre-logits head output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vrlab.encoders.base import Features, VisionEncoder, as_size, image_transform
from vrlab.errors import VrlabError


class TimmEncoder(VisionEncoder):
    """A timm ViT-style model."""

    def __init__(
        self,
        source: str,
        layer: int = -2,
        image_size: int | Sequence[int] | None = None,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        pooled: bool = True,
        **transform: Any,
    ) -> None:
        super().__init__()
        import timm

        kwargs = dict(model_kwargs or {})
        if image_size is not None:
            kwargs["img_size"] = as_size(image_size)
        self.model = timm.create_model(
            source,
            pretrained=pretrained and not checkpoint_path,
            num_classes=0,
            checkpoint_path=checkpoint_path or "",
            **kwargs,
        ).eval()
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "patch_embed"):
            raise VrlabError(f"timm model '{source}' is not a ViT-style model with forward_intermediates")
        self.source, self.layer, self.use_pooled = source, int(layer), bool(pooled)
        self.num_blocks = len(self.model.blocks)
        if not -self.num_blocks <= self.layer < self.num_blocks:
            raise VrlabError(
                f"layer={layer} is out of range for timm model '{source}' with {self.num_blocks} blocks"
            )
        cfg = self.model.pretrained_cfg
        size = as_size(image_size) if image_size is not None else as_size(self.model.patch_embed.img_size)
        if not {"mean", "normalize"} & set(transform) and "mean" in cfg:
            transform |= {"mean": cfg["mean"], "std": cfg["std"]}
        self.transform = image_transform(size, "imagenet", **transform)
        self.patch_size = as_size(self.model.patch_embed.patch_size)

    def _shape(self) -> tuple[int, tuple[int, int]]:
        h, w = self.image_size
        return int(self.model.embed_dim), (h // self.patch_size[0], w // self.patch_size[1])

    def backend_settings(self) -> dict[str, Any]:
        return {"backend": "timm", "source": self.source, "layer": self.layer, "pooled": self.use_pooled}

    def forward(self, pixels: torch.Tensor) -> Features:
        index = self.layer % self.num_blocks
        if self.use_pooled:
            final, inter = self.model.forward_intermediates(pixels, indices=[index], output_fmt="NLC")
            pooled = self.model.forward_head(final, pre_logits=True)
        else:
            inter = self.model.forward_intermediates(
                pixels, indices=[index], output_fmt="NLC", intermediates_only=True
            )
            pooled = None
        h, w = self.grid
        return Features(tokens=inter[0].reshape(pixels.shape[0], h * w, -1), grid=(h, w), pooled=pooled)
