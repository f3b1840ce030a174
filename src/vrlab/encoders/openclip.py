"""open_clip backend: EVA02-CLIP and any other open_clip image tower, built with `open_clip.create_model`.

`source` is an open_clip model name (`EVA02-L-14`) with `pretrained` a tag (`merged2b_s4b_b131k`) or a local
weights file, or `hf-hub:org/name`, or `local-dir:/path` (a folder with `open_clip_config.json`).
`config_dir` registers extra architecture JSON files first. Only the image tower is kept. Tokens come from the
tower's `forward_intermediates` at `layer` (prefix tokens dropped); `pooled` is the CLIP image embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vrlab.encoders.base import Features, VisionEncoder, as_size, image_transform
from vrlab.errors import VrlabError


class OpenCLIPEncoder(VisionEncoder):
    """The image tower of an open_clip model."""

    def __init__(
        self,
        source: str,
        pretrained: str | None = None,
        layer: int = -2,
        image_size: int | Sequence[int] | None = None,
        config_dir: str | None = None,
        pooled: bool = True,
        **transform: Any,
    ) -> None:
        super().__init__()
        import open_clip

        if config_dir:
            open_clip.add_model_config(config_dir)
        kwargs: dict[str, Any] = {}
        if image_size is not None:
            kwargs["force_image_size"] = as_size(image_size)
        model = open_clip.create_model(source, pretrained=pretrained, **kwargs)
        self.visual = model.visual.eval()
        del model  # the text tower is not needed
        if not hasattr(self.visual, "forward_intermediates"):
            raise VrlabError(f"open_clip model '{source}' has an image tower without forward_intermediates")
        self.source, self.pretrained, self.layer, self.use_pooled = (
            source,
            pretrained,
            int(layer),
            bool(pooled),
        )
        size = as_size(image_size) if image_size is not None else as_size(self.visual.image_size)
        if (
            not {"mean", "normalize"} & set(transform)
            and getattr(self.visual, "image_mean", None) is not None
        ):
            transform |= {"mean": self.visual.image_mean, "std": self.visual.image_std}
        self.transform = image_transform(size, "clip", **transform)
        trunk = getattr(self.visual, "trunk", None)  # timm towers (EVA02-CLIP) sit in .trunk
        if trunk is not None and tuple(trunk.patch_embed.img_size) != size:
            # open_clip builds timm trunks at their native size, whatever its config's image_size says.
            if not hasattr(trunk, "set_input_size"):
                raise VrlabError(f"the timm trunk of '{source}' cannot change its input size to {size}")
            trunk.set_input_size(img_size=size)
        self.num_blocks = len(trunk.blocks) if trunk is not None else len(self.visual.transformer.resblocks)
        if not -self.num_blocks <= self.layer < self.num_blocks:
            raise VrlabError(
                f"layer={layer} is out of range for open_clip model '{source}' with {self.num_blocks} blocks"
            )

    def backend_settings(self) -> dict[str, Any]:
        return {
            "backend": "open_clip",
            "source": self.source,
            "pretrained": self.pretrained,
            "layer": self.layer,
            "pooled": self.use_pooled,
        }

    def forward(self, pixels: torch.Tensor) -> Features:
        out = self.visual.forward_intermediates(
            pixels,
            indices=[self.layer % self.num_blocks],
            output_fmt="NCHW",
            intermediates_only=not self.use_pooled,
        )
        fmap = out["image_intermediates"][0]  # [B, D, h, w], prefix tokens already dropped
        h, w = fmap.shape[2:]
        pooled = out.get("image_features") if self.use_pooled else None
        return Features(tokens=fmap.flatten(2).transpose(1, 2), grid=(h, w), pooled=pooled)
