"""The LLM2CLIP model of the CLIP stage: a registry vision encoder with a new head, the text adapter on frozen
LLM caption embeddings, and a learnable temperature.

The text adapter is the release's `TextProj`: the LLM embedding L2-normalised, four pre-LayerNorm residual
MLP blocks (expansion 2, GELU), a LayerNorm and a linear map to the joint width. Its parameters keep the
released names (`text.text_adaptor.{0-3}.fn.{0,3}`, `.{i}.ln`, `.4`, `.5`), so the adapter inside a released
checkpoint loads into it. The image side is the encoder's pooled output (CLS/head), or the mean of its tokens
for encoders without one, through a new linear head (the release deletes and re-initialises `visual.head`).

`save_pretrained(folder)` writes `llm2clip_config.json` (the encoder's full card, widths, the text encoder's
source and settings) and `model.safetensors` (adapter, head, temperature, and the vision tower's weights when
it was trained); `LLM2CLIPModel.from_pretrained` rebuilds it. It satisfies the retrieval protocol
(`encode_images`, `encode_texts`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from vrlab.encoders.base import collate_pixels, move_pixels
from vrlab.encoders.factory import encoder_from_dict, load_encoder
from vrlab.errors import ShapeError, VrlabError
from vrlab.runtime import atomic_write_bytes, atomic_write_json

CONFIG, WEIGHTS = "llm2clip_config.json", "model.safetensors"
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class ResidualBlock(nn.Module):
    """x + fn(ln(x)), fn = Linear(d, 2d) → GELU → Dropout → Linear(2d, d) (indices 0 and 3, as released)."""

    def __init__(self, dim: int, expansion: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fn = nn.Sequential(
            nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * expansion, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


class TextAdaptor(nn.Module):
    """LLM2CLIP's `TextProj`: normalise, `blocks` residual MLPs, LayerNorm, Linear to `embed_dim`."""

    def __init__(self, llm_dim: int, embed_dim: int, blocks: int = 4, expansion: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(llm_dim, expansion) for _ in range(blocks)]
        self.text_adaptor = nn.Sequential(*layers, nn.LayerNorm(llm_dim), nn.Linear(llm_dim, embed_dim))

    def forward(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.text_adaptor(nn.functional.normalize(llm_embeddings, dim=-1))


def released_adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text adapter's tensors of a released LLM2CLIP state dict (`text.text_adaptor.*`), with that prefix."""
    out = {k: v for k, v in state.items() if k.startswith("text.text_adaptor.")}
    if not out:
        raise VrlabError(
            "the state dict holds no 'text.text_adaptor.*' tensors (not an LLM2CLIP checkpoint?)"
        )
    return out


class LLM2CLIPModel(nn.Module):
    """Vision encoder + head, text adapter and `logit_scale` (log τ⁻¹, initialised at log 1/0.07)."""

    def __init__(
        self,
        encoder: nn.Module,
        config: Mapping[str, Any],
        text_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config_dict = dict(config)
        self.vision = encoder
        vision_dim, llm_dim, embed_dim = (int(config[k]) for k in ("vision_dim", "llm_dim", "embed_dim"))
        self.visual_projection = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text = TextAdaptor(llm_dim, embed_dim, int(config.get("blocks", 4)))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.__dict__["_text_encoder"] = None  # not a submodule: never saved, trained or moved with the model
        if text_encoder is not None:
            self.attach_text_encoder(text_encoder)
        self.set_vision_trainable(str(config.get("vision", "full")))

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        encoder: str,
        llm_dim: int,
        embed_dim: int,
        *,
        vision: str = "full",
        blocks: int = 4,
        text_encoder: Mapping[str, Any] | None = None,
        registry_cfg: Mapping[str, Any] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        compose: Mapping[str, Any] | None = None,
    ) -> LLM2CLIPModel:
        """A fresh model: the encoder from the registry, a random head and adapter."""
        enc = load_encoder(encoder, encoder_args, compose, registry=registry_cfg)
        vision_dim, pooling = _image_width(enc)
        config = {
            "encoder": enc.card.to_dict(),
            "compose": dict(compose or {}),
            "vision_dim": vision_dim,
            "vision_pooling": pooling,
            "llm_dim": int(llm_dim),
            "embed_dim": int(embed_dim),
            "blocks": int(blocks),
            "vision": vision,
            "text_encoder": dict(text_encoder or {}),
        }
        return cls(enc, config)

    def set_vision_trainable(self, mode: str) -> None:
        """`full`: every encoder weight trains (as released); `frozen`: only the head, adapter and scale."""
        if mode not in ("full", "frozen"):
            raise VrlabError(f"llm2clip.vision={mode!r} must be 'full' or 'frozen'")
        self.config_dict["vision"] = mode
        self.vision.requires_grad_(mode == "full")

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}
        if self.config_dict["vision"] == "full":  # a frozen tower is rebuilt from its card
            state |= {f"vision.{k}": v for k, v in self.vision.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS, save({k: v.detach().contiguous() for k, v in state.items()}))
        atomic_write_json(folder / CONFIG, self.config_dict)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LLM2CLIPModel:
        folder = Path(folder)
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise VrlabError(f"no LLM2CLIP model at {folder} (needs {CONFIG} and {WEIGHTS})")
        config = json.loads((folder / CONFIG).read_text())
        model = cls(encoder_from_dict(config["encoder"], config.get("compose")), config)
        state = load_file(str(folder / WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("vision.")]:
            raise VrlabError(
                f"{folder / WEIGHTS} does not fit its config: missing {missing}, unexpected {unexpected}"
            )
        return model.eval()

    def load_released_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the text adapter of a released LLM2CLIP checkpoint's state dict (strict shapes)."""
        adapter = {k[len("text.") :]: v for k, v in released_adapter_state(state).items()}
        try:
            self.text.load_state_dict(adapter)
        except RuntimeError as exc:
            raise ShapeError(f"the released adapter does not fit this model's widths: {exc}") from None

    # --- features -------------------------------------------------------------------------------------------
    def image_features(self, pixels: Any) -> torch.Tensor:
        feats = self.vision(pixels)
        x = feats.pooled if self.config_dict.get("vision_pooling") == "pooled" else feats.tokens.mean(1)
        return self.visual_projection(x.float())

    def text_features(self, llm_embeddings: torch.Tensor) -> torch.Tensor:
        return self.text(llm_embeddings.float())

    def forward(self, pixels: Any, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        from vrlab.llm2clip.losses import clip_loss

        img, txt = self.image_features(pixels), self.text_features(text_embeds)
        return {"loss": clip_loss(img, txt, self.logit_scale.exp()), "logit_scale": self.logit_scale.detach()}

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- the retrieval protocol -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        device = self.logit_scale.device
        pixels = move_pixels(collate_pixels([self.vision.transform(img) for img in images]), device)
        return self.image_features(pixels).float().cpu()

    def attach_text_encoder(self, encoder: nn.Module) -> None:
        """Use `encoder` (frozen) for `encode_texts` instead of loading the one the config names."""
        self.__dict__["_text_encoder"] = encoder.requires_grad_(False)

    def text_encoder(self) -> Any:
        """The frozen LLM text encoder named in the config, loaded on first use."""
        if self._text_encoder is None:
            from vrlab.llm2clip.text import LLMTextEncoder

            spec = self.config_dict.get("text_encoder") or {}
            if not spec.get("source"):
                raise VrlabError("this LLM2CLIP model names no text encoder (config text_encoder.source)")
            self.attach_text_encoder(
                LLMTextEncoder(spec["source"], spec.get("template", "auto"), int(spec.get("max_length", 512)))
            )
        return self._text_encoder.to(self.logit_scale.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        embeddings = self.text_encoder().encode(texts)
        return self.text_features(embeddings.to(self.logit_scale.device)).float().cpu()


def _image_width(encoder: nn.Module) -> tuple[int, str]:
    """Width of the image feature and where it comes from: `pooled` (CLS/head) or `mean` of the tokens."""
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        feats = encoder(encoder.example_input(device=device))
    if feats.pooled is not None:
        return int(feats.pooled.shape[-1]), "pooled"
    return int(feats.tokens.shape[-1]), "mean"
