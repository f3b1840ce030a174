"""timm backend: EVA02, AIMv2, RADIO, DINOv3 and any other timm vision transformer or convolutional network,
built with `timm.create_model`.

`source` is whatever `timm.create_model` takes: a model name with an optional pretrained tag
(`eva02_large_patch14_224.mim_m38m`), `hf-hub:org/name`, or `local-dir:/path` (a folder written by
`timm.models.save_for_hf`). Tokens come from `forward_intermediates` at `layer` (block output, no final norm,
prefix tokens dropped); `pooled` is the model's pre-logits head output. A network without patch tokens
(ConvNeXt, FastViT / MobileCLIP's MCi) gives the feature map of stage `layer` (timm's `feature_info`), one
token per position in raster order, its grid the image size over that stage's stride.

`weights` loads a checkpoint timm has no pretrained tag for into the architecture `source` names: a local
file, or `{repo, file, revision}` of a file in a Hugging Face repository (`hf_hub_download`, so a cached file
works offline). It is read as tensors only (safetensors, or `torch.load(weights_only=True)`), converted by
the model family's own `checkpoint_filter_fn` (EVA-CLIP `.pt` files: `visual.` prefix, `q_bias`, `w1/w2/w3`)
and loaded strictly, the checkpoint's classifier or projection head aside. This is how LLM2CLIP's EVA02
towers load without their repositories' remote code.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vrlab.encoders.base import Features, VisionEncoder, as_size, image_transform
from vrlab.errors import ShapeError, VrlabError


def _weights_file(weights: str | Mapping[str, Any]) -> Path:
    """The local path of `weights`: a file, or `{repo, file, revision}` fetched from (or found in) the HF cache."""
    if isinstance(weights, str):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise VrlabError(f"weights file '{weights}' does not exist")
        return path
    unknown = set(weights) - {"repo", "file", "revision"}
    if unknown or not {"repo", "file"} <= set(weights):
        raise VrlabError(
            f"weights must be a file path or {{repo, file, revision}}, got keys {sorted(weights)}"
        )
    from huggingface_hub import hf_hub_download

    repo, file, revision = str(weights["repo"]), str(weights["file"]), weights.get("revision")
    try:
        return Path(hf_hub_download(repo, file, revision=revision))
    except Exception as exc:  # offline and not cached, a wrong name, no access: one message for all
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise VrlabError(
            f"cannot get '{file}' from the hub repository '{repo}': {reason}. Without network access, download "
            f"it first (`hf download {repo} {file}`) or set 'weights' to the local file"
        ) from exc


def _read_tensors(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # tensors only: a pickle that would build any other object (and so could run code) is refused
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VrlabError(
            f"refusing to load '{path}': it holds more than tensors, and only weights-only checkpoints are "
            f"read ({str(exc).splitlines()[0]})"
        ) from exc


def load_weights(model: torch.nn.Module, weights: str | Mapping[str, Any]) -> None:
    """Load `weights` into `model` the way timm loads its own pretrained files, but always tensors-only.

    timm's `pretrained_cfg_overlay` (`file`, `hf_hub_filename`) applies the same filter, but how timm reads
    such a file depends on its release (older ones used a full-pickle `torch.load`, which can run code), so
    the file is read here, tensors-only whatever timm is installed.
    """
    path = _weights_file(weights)
    state = _read_tensors(path)
    if not isinstance(state, Mapping):
        raise VrlabError(f"weights file '{path}' holds a {type(state).__name__}, not a state dict")
    # the family's converter: EVA's strips `visual.` / `visual.trunk.`, renames EVA-CLIP keys, resizes pos_embed
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(dict(state), model)
    # the model is built headless (num_classes=0): the checkpoint's head (a CLIP projection) has no place
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VrlabError(
            f"weights file '{path}' does not fit timm model '{model.pretrained_cfg.get('architecture')}': "
            f"missing {sorted(missing)[:5]} ({len(missing)}), unexpected {sorted(unexpected)[:5]} "
            f"({len(unexpected)})"
        )


class TimmEncoder(VisionEncoder):
    """A timm ViT-style model."""

    def __init__(
        self,
        source: str,
        layer: int = -2,
        image_size: int | Sequence[int] | None = None,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        weights: str | Mapping[str, Any] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        pooled: bool = True,
        **transform: Any,
    ) -> None:
        super().__init__()
        import timm

        if weights is not None and checkpoint_path:
            raise VrlabError("set 'weights' or 'checkpoint_path', not both")
        kwargs = dict(model_kwargs or {})
        if image_size is not None:
            kwargs["img_size"] = as_size(image_size)
        create = dict(
            pretrained=pretrained and not checkpoint_path and weights is None,
            num_classes=0,
            checkpoint_path=checkpoint_path or "",
        )
        try:
            self.model = timm.create_model(source, **create, **kwargs).eval()
        except TypeError as exc:
            # a CNN takes any size as it is and has no img_size argument
            if "img_size" not in str(exc) or "img_size" not in kwargs:
                raise
            kwargs.pop("img_size")
            self.model = timm.create_model(source, **create, **kwargs).eval()
        if weights is not None:
            load_weights(self.model, weights)
        self.weights = weights
        if not hasattr(self.model, "forward_intermediates"):
            raise VrlabError(f"timm model '{source}' has no forward_intermediates, so no token maps to read")
        self.source, self.layer, self.use_pooled = source, int(layer), bool(pooled)
        cfg = self.model.pretrained_cfg
        # a ViT's tokens come from its blocks; a CNN's from its stages (feature_info: channels and stride)
        self.patch_tokens = hasattr(self.model, "patch_embed") and hasattr(self.model, "blocks")
        if self.patch_tokens:
            self.num_blocks, unit = len(self.model.blocks), "blocks"
        else:
            self.num_blocks, unit = len(self.model.feature_info), "stages"
        if not -self.num_blocks <= self.layer < self.num_blocks:
            raise VrlabError(
                f"layer={layer} is out of range for timm model '{source}' with {self.num_blocks} {unit}"
            )
        if self.patch_tokens:
            native = self.model.patch_embed.img_size
            self.patch_size = as_size(self.model.patch_embed.patch_size)
            self.width = int(self.model.embed_dim)
        else:
            stage = self.model.feature_info[self.layer % self.num_blocks]
            native = tuple(cfg.get("input_size", (3, 224, 224))[1:])
            self.patch_size = as_size(int(stage["reduction"]))
            self.width = int(stage["num_chs"])
        size = as_size(image_size) if image_size is not None else as_size(native)
        if not self.patch_tokens and (size[0] % self.patch_size[0] or size[1] % self.patch_size[1]):
            raise ShapeError(
                f"image_size {size} of timm model '{source}' is not a multiple of the stride "
                f"{self.patch_size[0]} of stage {self.layer}"
            )
        if not {"mean", "normalize"} & set(transform) and "mean" in cfg:
            transform |= {"mean": cfg["mean"], "std": cfg["std"]}
        self.transform = image_transform(size, "imagenet", **transform)

    def _shape(self) -> tuple[int, tuple[int, int]]:
        h, w = self.image_size
        return self.width, (h // self.patch_size[0], w // self.patch_size[1])

    def backend_settings(self) -> dict[str, Any]:
        out = {"backend": "timm", "source": self.source, "layer": self.layer, "pooled": self.use_pooled}
        if self.weights is not None:  # only then, so the stores of cards without it keep their keys
            out["weights"] = self.weights if isinstance(self.weights, str) else dict(self.weights)
        return out

    def forward(self, pixels: torch.Tensor) -> Features:
        index = self.layer % self.num_blocks
        fmt = {"output_fmt": "NLC"} if self.patch_tokens else {}  # CNNs give NCHW maps only
        if self.use_pooled:
            final, inter = self.model.forward_intermediates(pixels, indices=[index], **fmt)
            pooled = self.model.forward_head(final, pre_logits=True)
        else:
            inter = self.model.forward_intermediates(pixels, indices=[index], intermediates_only=True, **fmt)
            pooled = None
        h, w = self.grid
        tokens = inter[0] if self.patch_tokens else inter[0].flatten(2).transpose(1, 2)
        if tokens.shape[1] != h * w:
            raise ShapeError(
                f"timm model '{self.source}' gave {tokens.shape[1]} tokens, not its {h}x{w} grid"
            )
        return Features(tokens=tokens.reshape(pixels.shape[0], h * w, -1), grid=(h, w), pooled=pooled)
