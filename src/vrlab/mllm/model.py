"""VisionLanguageModel: a registry encoder (frozen unless stage 2 tunes it), an adapter and any Hugging Face LLM.

Each `<image>` placeholder is expanded to the adapter's number of vision tokens when a batch is collated;
`embed` replaces those positions of the LLM's input embeddings with the adapter's outputs, so the LLM's own
`forward` and `generate` run on `inputs_embeds` (batched generation uses left padding). Causal LMs
(`AutoModelForCausalLM`) get the vision tokens in place; seq2seq LMs such as FlanT5 (`AutoModelForSeq2SeqLM`,
the BLIP-2 variant) get them in the encoder input, with the answers as decoder labels.

`save_pretrained(path)` writes everything needed to rebuild the model with `VisionLanguageModel.from_pretrained`:
the LLM and tokenizer (`llm/`), the adapter (`adapter/`, the stage-1 format), `vlm_config.json` with the
encoder's full card, so the encoder is rebuilt from the same source and settings, and, where stage 2 tuned
the tower, its trained state (`encoder/`, see `vrlab.mllm.tower`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vrlab.adapters import build_adapter, is_token_wise, load_adapter
from vrlab.checkpoint import TOWER_FILE, VLM_CONFIG, load_tower, read_adapter_config, save_adapter
from vrlab.data.images import pad_to_square
from vrlab.encoders.base import move_pixels
from vrlab.encoders.factory import encoder_from_dict, load_encoder
from vrlab.errors import ShapeError, VrlabError
from vrlab.mllm.conversation import IGNORE_INDEX, IMAGE_TOKEN
from vrlab.mllm.text_tower import load_text_tower
from vrlab.mllm.tower import save_tower

log = logging.getLogger(__name__)


def load_llm(source: str, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Causal or seq2seq LM and its tokenizer, by `from_pretrained`; a missing pad token becomes EOS."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    llm = cls.from_pretrained(source, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise VrlabError(
                f"the tokenizer of '{source}' has neither a pad nor an EOS token; add a pad token"
            )
        log.warning(
            "tokenizer of '%s' has no pad token: using EOS (%r) for padding (padded positions are masked)",
            source,
            tokenizer.eos_token,
        )
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # Grow only: many LLMs pad their embedding matrix beyond the tokenizer (Qwen2, llava-hf's 32064 rows).
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    return llm, tokenizer


@functools.cache
def _takes_kwargs(cls: type) -> bool:
    """Whether `cls.forward` accepts `**kwargs` (read once per class: forward runs every training step)."""
    import inspect

    params = inspect.signature(cls.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _hidden_size(llm: nn.Module) -> int:
    cfg = llm.config
    return int(getattr(cfg, "hidden_size", None) or cfg.d_model)


class VisionLanguageModel(nn.Module):
    """Encoder + adapter + LLM with `<image>` splicing."""

    def __init__(
        self,
        encoder: nn.Module,
        adapter: nn.Module,
        llm: nn.Module,
        tokenizer: Any,
        config: Mapping[str, Any],
        guide_model: nn.Module | None = None,
        guide_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.encoder, self.adapter, self.llm = encoder, adapter, llm
        self.tokenizer, self.config_dict = tokenizer, dict(config)
        self.guide_model, self.guide_tokenizer = guide_model, guide_tokenizer
        self.template = self.config_dict.get("template", "vicuna_v1")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.is_seq2seq = bool(getattr(llm.config, "is_encoder_decoder", False))
        self.freeze_encoder = bool(self.config_dict.get("freeze_encoder", True))
        if self.freeze_encoder:
            self.encoder.requires_grad_(False).eval()
        if self.guide_model is not None:
            self.guide_model.requires_grad_(False).eval()

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        encoder: str,
        llm: str,
        adapter: Mapping[str, Any],
        *,
        template: str = "vicuna_v1",
        registry_cfg: Mapping[str, Any] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        compose: Mapping[str, Any] | None = None,
        freeze_encoder: bool = True,
        trust_remote_code: bool = False,
        text_tower: Mapping[str, Any] | None = None,
    ) -> VisionLanguageModel:
        """A fresh model: encoder from the registry, LLM by `from_pretrained`, a new adapter."""
        enc = load_encoder(encoder, encoder_args, compose, registry=registry_cfg)
        strategy = getattr(enc, "strategy", "fixed")
        if strategy != "fixed" and not is_token_wise(adapter.get("type")):  # before the LLM loads
            raise VrlabError(
                f"'{enc.name}' runs at resolution={strategy}, a token count per image: the adapter must "
                f"map token by token (linear or mlp2x_gelu), not '{adapter.get('type')}'"
            )
        lm, tokenizer = load_llm(llm, trust_remote_code)
        adapter_cfg = dict(adapter)
        adapter_cfg.update(in_dim=enc.dim, out_dim=_hidden_size(lm), encoder=enc.name, llm=llm)
        guide_model = guide_tokenizer = None
        if adapter_cfg.get("type") == "tg":
            guide_model, guide_tokenizer = load_text_tower(text_tower)
            adapter_cfg.update(num_tokens=enc.num_tokens, text_dim=int(guide_model.config.hidden_size))
        if strategy != "fixed":
            adapter_cfg["newline"] = strategy == "anyres"  # LLaVA-NeXT's newline after each row of tiles
        config = {
            "encoder": enc.card.to_dict(),
            "llm": llm,
            "adapter": adapter_cfg,
            "template": template,
            "freeze_encoder": freeze_encoder,
            "text_tower": dict(text_tower or {}),
            "compose": dict(compose or {}),
            "trust_remote_code": trust_remote_code,
        }
        return cls(enc, build_adapter(adapter_cfg), lm, tokenizer, config, guide_model, guide_tokenizer)

    @classmethod
    def from_stage1(
        cls,
        folder: str | Path,
        encoder: str,
        *,
        llm: str | None = None,
        template: str | None = None,
        registry_cfg: Mapping[str, Any] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        compose: Mapping[str, Any] | None = None,
        trust_remote_code: bool = False,
        text_tower: Mapping[str, Any] | None = None,
    ) -> VisionLanguageModel:
        """The stage-1 model of an adapter checkpoint, frozen: `encoder` from the registry (with the tower the
        adapter was trained on, if stage 2 tuned it), the adapter's LLM (or `llm`) and its stage-1 template
        (recorded by stage 1; `plain` for checkpoints without one, LLaVA's stage-1 template)."""
        folder = Path(folder)
        config = read_adapter_config(folder)
        source = llm or config.get("llm")
        if not source:
            raise VrlabError(
                f"adapter {folder} does not record its LLM; name it with alignment.llm=<LLM folder or hub id>"
            )
        if not llm and not Path(source).is_absolute() and (folder.parent / source).is_dir():
            source = str(folder.parent / source)  # the adapter of a model folder: its LLM sits beside it
        enc = load_encoder(encoder, encoder_args, compose, registry=registry_cfg)
        tuned = load_tower(enc, folder / config["tuned_encoder"]) if config.get("tuned_encoder") else None
        adapter, adapter_cfg = load_adapter(folder, expect_in_dim=enc.dim, encoder=enc.name)
        lm, tokenizer = load_llm(source, trust_remote_code)
        if int(adapter_cfg["out_dim"]) != _hidden_size(lm):
            raise ShapeError(
                f"adapter {folder} projects to width {adapter_cfg['out_dim']} but the LLM '{source}' is "
                f"{_hidden_size(lm)} wide; give the LLM it was trained with (alignment.llm=...)"
            )
        guide_model = guide_tokenizer = None
        if adapter_cfg["type"] == "tg":
            guide_model, guide_tokenizer = load_text_tower(text_tower)
        vlm_config = {
            "encoder": enc.card.to_dict(),
            "llm": source,
            "adapter": adapter_cfg,
            "template": template or config.get("template") or "plain",
            "text_tower": dict(text_tower or {}),
            "compose": dict(compose or {}),
            "trust_remote_code": trust_remote_code,
            "tuned_tower": tuned,  # the digest of the tuned tower it runs, or None
        }
        return cls(enc, adapter, lm, tokenizer, vlm_config, guide_model, guide_tokenizer).eval()

    def load_adapter_checkpoint(self, folder: str | Path) -> None:
        """Load stage-1 adapter weights (for stage 2); the widths must match this model's encoder and LLM."""
        adapter, cfg = load_adapter(folder, expect_in_dim=self.encoder.dim, encoder=self.encoder.name)
        if (
            int(cfg["out_dim"]) != _hidden_size(self.llm)
            or cfg["type"] != self.config_dict["adapter"]["type"]
        ):
            raise ShapeError(
                f"adapter {folder} ({cfg['type']}, out {cfg['out_dim']}) does not fit this model "
                f"({self.config_dict['adapter']['type']}, LLM width {_hidden_size(self.llm)})"
            )
        self.adapter.load_state_dict(adapter.state_dict())

    # --- inputs ---------------------------------------------------------------------------------------
    @property
    def num_vision_tokens(self) -> int:
        cfg = self.config_dict["adapter"]
        if cfg["type"] == "qformer":
            return int(cfg.get("num_queries", 32))
        return self.encoder.num_tokens + (int(cfg.get("detail_latents", 64)) if cfg.get("detail") else 0)

    def image_input(self, image: torch.Tensor, aspect: str | None = None) -> Any:
        """Encoder input of one uint8 image: pad-to-square with the mean colour (LLaVA-1.5) or as the card resizes.
        By default, the policy the model was trained with (`image_aspect_ratio` in its config), else pad."""
        if getattr(self.encoder, "strategy", "fixed") != "fixed":  # anyres, native: the strategy's own views
            return self.encoder.transform(image)
        aspect = aspect or self.config_dict.get("image_aspect_ratio") or "pad"
        if aspect == "pad":
            transform = self.encoder.transform
            first = transform.members[0] if hasattr(transform, "members") else transform
            image = pad_to_square(image, first.mean.flatten().tolist())
        elif aspect != "resize":
            raise VrlabError(f"image_aspect_ratio='{aspect}' must be 'pad' or 'resize'")
        return self.encoder.transform(image)

    def tokenize_guide(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """TG-LLaVA's text-guide ids and mask. CLIP pads to the batch (77 at most); SigLIP's text towers were
        trained on `max_length` padding without a mask and pool the last position, so they get exactly that."""
        cfg = self.guide_model.config
        if cfg.model_type.startswith("siglip"):
            length = int(cfg.max_position_embeddings)
            enc = self.guide_tokenizer(
                texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
            )
            return enc.input_ids, torch.ones_like(enc.input_ids)
        enc = self.guide_tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def vision_token_count(self, pixels: Any) -> int:
        """Vision tokens of one image's encoder input: the adapter's count, or its layout's (anyres, native)."""
        layouts = getattr(pixels, "layouts", None)
        return layouts[0].num_vision_tokens if layouts else self.num_vision_tokens

    def expand_placeholder(
        self, ids: list[int], labels: list[int], n: int | None = None
    ) -> tuple[list[int], list[int]]:
        """Replace the single `<image>` id by one id per vision token (`n`, else the adapter's count)."""
        if self.image_token_id not in ids:
            return ids, labels
        p = ids.index(self.image_token_id)
        n = n or self.num_vision_tokens
        return ids[:p] + [self.image_token_id] * n + ids[p + 1 :], labels[:p] + [IGNORE_INDEX] * n + labels[
            p + 1 :
        ]

    # --- the forward pass -------------------------------------------------------------------------------
    def encode_images(
        self, pixel_values: Any, guide_ids: torch.Tensor | None = None, guide_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adapter outputs `[B_images, num_vision_tokens, llm_width]`; under anyres or native, a list of
        `[n_i, llm_width]`, one per image (the views it was given may still be on the CPU)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            if hasattr(pixel_values, "layouts"):  # anyres, native
                feats = self.encoder(move_pixels(pixel_values, next(self.adapter.parameters()).device))
            else:
                tokens = self.encoder(pixel_values).tokens
            tiles = self._tile_tokens(pixel_values) if self.config_dict["adapter"].get("detail") else None
        if hasattr(pixel_values, "layouts"):
            return [
                self.adapter.pack(t, lay) for t, lay in zip(feats.per_image(), feats.layouts, strict=True)
            ]
        if self.config_dict["adapter"]["type"] != "tg":
            return self.adapter(tokens)
        text = None
        if guide_ids is not None:
            with torch.no_grad():
                text = self.guide_model(input_ids=guide_ids, attention_mask=guide_mask).pooler_output
        return self.adapter(tokens, text, tiles) if tiles is not None else self.adapter(tokens, text)

    def _tile_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """TG-LLaVA's detail input: the transformed image upsampled 2x, cut into 4 tiles (TL, TR, BL, BR)."""
        if isinstance(pixels, tuple | list):
            raise VrlabError("the tg detail branch supports single encoders, not composites")
        big = F.interpolate(pixels, scale_factor=2, mode="bilinear", align_corners=False)
        h, w = pixels.shape[-2:]
        tiles = [big[..., i * h : (i + 1) * h, j * w : (j + 1) * w] for i in (0, 1) for j in (0, 1)]
        return torch.cat([self.encoder(t).tokens for t in tiles], dim=1)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Any = None,
        has_image: torch.Tensor | None = None,
        guide_ids: torch.Tensor | None = None,
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with the vision tokens spliced in at the expanded placeholders."""
        positions = input_ids == self.image_token_id
        safe = input_ids.masked_fill(positions, self.tokenizer.pad_token_id)
        embeds = self.llm.get_input_embeddings()(safe)
        n_images = 0 if has_image is None else int(has_image.sum())
        if n_images == 0:
            if positions.any():
                raise VrlabError("the batch has <image> positions but no pixel values")
            return embeds
        if has_image is not None and guide_ids is not None:
            guide_ids, guide_mask = guide_ids[has_image], guide_mask[has_image]
        vision = self.encode_images(pixel_values, guide_ids, guide_mask)
        per_row = positions.sum(dim=1)
        expected = torch.zeros_like(per_row)
        expected[has_image.to(per_row.device)] = torch.tensor([len(v) for v in vision]).to(per_row)
        if not torch.equal(per_row, expected):
            raise ShapeError(
                f"image positions per sample {per_row.tolist()} do not match the {expected.tolist()} vision "
                "tokens of their images"
            )
        flat = torch.cat(list(vision)) if isinstance(vision, list) else vision
        return embeds.masked_scatter(positions.unsqueeze(-1), flat.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: Any = None,
        has_image: torch.Tensor | None = None,
        guide_ids: torch.Tensor | None = None,
        guide_mask: torch.Tensor | None = None,
        decoder_labels: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> Any:
        """The LLM's forward on the spliced embeddings. `loss_kwargs` (the Trainer's `num_items_in_batch`) reach
        an LLM that takes them, so the loss averages over every label token of the global batch, across
        gradient accumulation and processes alike: N processes give the loss curve of one with the same
        global batch."""
        embeds = self.embed(input_ids, pixel_values, has_image, guide_ids, guide_mask)
        extra = loss_kwargs if loss_kwargs and _takes_kwargs(type(self.llm)) else {}
        if self.is_seq2seq:
            return self.llm(
                inputs_embeds=embeds, attention_mask=attention_mask, labels=decoder_labels, **extra
            )
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **extra)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Any = None,
        has_image: torch.Tensor | None = None,
        guide_ids: torch.Tensor | None = None,
        guide_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """New token ids (the LLM's own `generate` on spliced input embeddings; left-padded batches)."""
        embeds = self.embed(input_ids, pixel_values, has_image, guide_ids, guide_mask)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.llm.gradient_checkpointing_enable(**kwargs)

    # --- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """LLM + tokenizer, adapter and config; LoRA weights are merged into the saved LLM."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        llm = self.llm
        if hasattr(llm, "merge_and_unload"):
            import copy

            llm = copy.deepcopy(llm).merge_and_unload()
        llm.save_pretrained(path / "llm")
        self.tokenizer.save_pretrained(path / "llm")
        adapter_cfg = dict(self.config_dict["adapter"])
        if self.config_dict.get("tuned_encoder"):
            # the tower the adapter was trained on: extraction (and so A) with this adapter runs it
            save_tower(self.encoder, path)
            adapter_cfg["tuned_encoder"] = f"../{TOWER_FILE}"
        save_adapter(self.adapter, path / "adapter", adapter_cfg)
        (path / VLM_CONFIG).write_text(json.dumps({**self.config_dict, "llm": "llm"}, indent=2, default=str))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VisionLanguageModel:
        """Rebuild a model saved by `save_pretrained` with one call."""
        path = Path(path)
        if not (path / VLM_CONFIG).exists():
            raise VrlabError(
                f"no vrlab model at {path} ({VLM_CONFIG} missing); a LLaVA, TG-LLaVA or Hugging Face Llava "
                "checkpoint is converted once with vrlab.import_checkpoint(path, out) or task=import"
            )
        config = json.loads((path / VLM_CONFIG).read_text())
        encoder = encoder_from_dict(config["encoder"], config.get("compose") or None, folder=path)
        if config.get("tuned_encoder"):
            load_tower(encoder, path / config["tuned_encoder"]["weights"])
        llm, tokenizer = load_llm(str(path / "llm"), config.get("trust_remote_code", False))
        adapter, _ = load_adapter(path / "adapter", expect_in_dim=encoder.dim, encoder=encoder.name)
        guide_model = guide_tokenizer = None
        if config["adapter"]["type"] == "tg":
            guide_model, guide_tokenizer = load_text_tower(config.get("text_tower"))
        return cls(encoder, adapter, llm, tokenizer, config, guide_model, guide_tokenizer).eval()
