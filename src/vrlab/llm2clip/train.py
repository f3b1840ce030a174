"""LLM2CLIP's stages with the Hugging Face `Trainer`: caption-contrastive LLM fine-tuning, caption embeddings
into the EmbeddingStore, and the CLIP stage.

- **Text stage** (`train_text_stage`): supervised SimCSE on caption pairs of one image. With probability ½
  the query is the short caption (instruction "retrieve a detailed relevant sentence") and the positive the
  long one, or the reverse; the hard negative is the positive's type of caption of a random other image.
  LoRA (peft; r 16, α 32, dropout 0.05 on the attention and MLP projections by default), hard-negative NLL
  with scale 50. The LoRA is merged and the LLM saved with its own `save_pretrained`, so the result loads as a
  plain model, like the released weights.
- **Caption embeddings** (`embed_captions`): the frozen LLM embeds every caption once into a store keyed by
  the text encoder's settings, the fingerprint of its weight files and the captions; a rerun reuses it.
- **CLIP stage** (`train_clip_stage`): each step pairs an image with one of its captions' embeddings, drawn
  anew per image per epoch (the release draws short or long), through `LLM2CLIPModel.forward` (open_clip's
  `ClipLoss`); `logit_scale` is clamped at log 100 after every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from vrlab.data.images import decode_image
from vrlab.encoders.base import collate_pixels
from vrlab.errors import VrlabError
from vrlab.fingerprint import spec_fingerprint
from vrlab.llm2clip.losses import hard_negative_nll
from vrlab.llm2clip.model import LLM2CLIPModel
from vrlab.llm2clip.text import LONG_TO_SHORT, SHORT_TO_LONG, TEXT_CONFIG, LLMTextEncoder
from vrlab.runtime import atomic_write_json, slug, training_arguments
from vrlab.store import EmbeddingStore, StoreWriter, is_complete, store_key

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class EpochAware(TrainerCallback):
    """Tells datasets the epoch (their draws change per epoch) and clamps a model's `logit_scale` per step."""

    def __init__(self, dataset: Any, model: nn.Module | None = None) -> None:
        self.dataset, self.model = dataset, model

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.dataset.epoch = int(state.epoch or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.model is not None:
            self.model.clamp_logit_scale()


# --- text stage -------------------------------------------------------------------------------------------


class CaptionTriplets(torch.utils.data.Dataset):
    """(instruction, query, positive, negative) from (short, long) caption pairs, drawn per epoch."""

    def __init__(self, pairs: Sequence[tuple[str, str]], seed: int = 0) -> None:
        if len(pairs) < 2:
            raise VrlabError(
                f"the caption-contrastive stage needs at least 2 caption pairs, got {len(pairs)}"
            )
        self.pairs, self.seed, self.epoch = list(pairs), int(seed), 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, str]:
        rng = _rng(self.seed, self.epoch, i)
        other = int(rng.integers(len(self.pairs) - 1))
        other += other >= i  # any row but this one
        short, long = self.pairs[i]
        if rng.random() < 0.5:
            return {
                "instruction": SHORT_TO_LONG,
                "query": short,
                "positive": long,
                "negative": self.pairs[other][1],
            }
        return {
            "instruction": LONG_TO_SHORT,
            "query": long,
            "positive": short,
            "negative": self.pairs[other][0],
        }


class CaptionContrastive(nn.Module):
    """The text encoder under the hard-negative NLL; the Trainer's model in the text stage."""

    def __init__(self, encoder: LLMTextEncoder, scale: float = 50.0) -> None:
        super().__init__()
        self.encoder, self.scale = encoder, float(scale)

    def collate(self, batch: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        out = {}
        parts = {
            "q": self.encoder.tokenize([b["query"] for b in batch], [b["instruction"] for b in batch]),
            "p": self.encoder.tokenize([b["positive"] for b in batch]),
            "n": self.encoder.tokenize([b["negative"] for b in batch]),
        }
        for prefix, tensors in parts.items():
            out |= {f"{prefix}_{k}": v for k, v in tensors.items()}
        return out

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        def embed(p: str) -> torch.Tensor:
            return self.encoder(
                batch[f"{p}_input_ids"], batch[f"{p}_attention_mask"], batch[f"{p}_embed_mask"]
            )

        return {"loss": hard_negative_nll(embed("q"), embed("p"), embed("n"), self.scale)}


def caption_pairs(captions: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """(first, second) caption of every image with at least two: the short and the long one."""
    return [(c[0], c[1]) for c in captions if len(c) >= 2]


def train_text_stage(
    source: str,
    pairs: Sequence[tuple[str, str]],
    out_dir: str | Path,
    args: Mapping[str, Any],
    *,
    lora: Mapping[str, Any] | None = None,
    template: str = "auto",
    max_length: int = 512,
    scale: float = 50.0,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Caption-contrastive LoRA fine-tuning of `source`; saves the merged LLM to `<out_dir>/model`."""
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    encoder = LLMTextEncoder(source, template, max_length, trust_remote_code)
    lora = dict(lora or {})
    names = {n.rsplit(".", 1)[-1] for n, _ in encoder.model.named_modules()}
    targets = lora.get("target_modules") or ([t for t in LORA_TARGETS if t in names] or "all-linear")
    r = int(lora.get("r", 16))
    encoder.model = get_peft_model(
        encoder.model,
        LoraConfig(
            r=r,
            lora_alpha=int(lora.get("alpha", 2 * r)),
            lora_dropout=float(lora.get("dropout", 0.05)),
            target_modules=targets,
        ),
    )
    model = CaptionContrastive(encoder, scale)
    data = CaptionTriplets(pairs, seed)
    trainer = Trainer(
        model=model,
        args=training_arguments(out_dir, {"seed": seed, **dict(args)}, save_strategy="no"),
        train_dataset=data,
        data_collator=model.collate,
        callbacks=[EpochAware(data)],
    )
    result = trainer.train()
    encoder.model = encoder.model.merge_and_unload()
    saved = out_dir / "model"
    encoder.model.save_pretrained(saved)
    encoder.tokenizer.save_pretrained(saved)
    atomic_write_json(saved / TEXT_CONFIG, {"base": source, **encoder.settings(), "source": str(saved)})
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "steps": trainer.state.global_step,
        "train_runtime": result.metrics.get("train_runtime"),
        "saved": str(saved),
        "lora": {"r": r, "target_modules": targets},
    }


def text_encoder_settings(source: str | Path) -> dict[str, Any]:
    """A saved text stage's own settings (`llm2clip_text.json`), or none for any other LLM folder or id."""
    path = Path(source) / TEXT_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


# --- caption embeddings -------------------------------------------------------------------------------------


def embed_captions(
    encoder: LLMTextEncoder,
    captions: Sequence[str],
    ids: Sequence[str],
    out_root: str | Path,
    name: str,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
) -> EmbeddingStore:
    """Every caption's LLM embedding in a store (`pooled [N, D]`; `tokens [N, 1, D]` the same vectors)."""
    if len(captions) != len(ids) or not captions:
        raise VrlabError(f"embed_captions: {len(captions)} captions for {len(ids)} ids")
    digest = hashlib.sha256(json.dumps(list(captions)).encode()).hexdigest()[:16]
    settings = {
        "kind": "llm2clip-captions",
        "text_encoder": encoder.settings(),
        "weights": spec_fingerprint({"source": encoder.source}),
        "captions": digest,
    }
    key = store_key(settings, list(ids), shard_size, "float32")
    path = Path(out_root) / f"llm2clip-{slug(Path(encoder.source).name or encoder.source)}-{key[:12]}"
    if is_complete(path):
        log.info("caption embeddings: reusing %s", path)
        return EmbeddingStore(path)
    writer = StoreWriter(path, settings, list(ids), shard_size, "float32")
    for s in writer.missing():
        rows = writer.shard_range(s)
        vectors = encoder.encode([captions[i] for i in rows], batch_size, progress=True)
        writer.write_shard(s, torch.tensor(list(rows)), vectors[:, None].clone(), vectors)
    store = writer.finalize()
    log.info("caption embeddings: %d captions into %s", len(ids), path)
    return store


# --- CLIP stage ---------------------------------------------------------------------------------------------


class ImageCaptionEmbeddings(torch.utils.data.Dataset):
    """Image i with the embedding of one of its captions, drawn per epoch."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        captions_of: Sequence[Sequence[int]],
        embeddings: torch.Tensor,
        transform: Any,
        max_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        empty = [str(p) for p, c in zip(paths, captions_of, strict=True) if not c]
        if empty:
            raise VrlabError(f"images without a caption: {empty[:3]}")
        self.paths, self.captions_of, self.embeddings = list(paths), list(captions_of), embeddings
        self.transform, self.max_pixels, self.seed, self.epoch = transform, max_pixels, int(seed), 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows = self.captions_of[i]
        row = rows[int(_rng(self.seed, self.epoch, i).integers(len(rows)))]
        image = decode_image(self.paths[i], self.max_pixels)
        return {"pixels": self.transform(image), "text_embeds": self.embeddings[row]}


def collate_pairs(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": collate_pixels([b["pixels"] for b in batch]),
        "text_embeds": torch.stack([b["text_embeds"] for b in batch]),
    }


def train_clip_stage(
    model: LLM2CLIPModel,
    dataset: ImageCaptionEmbeddings,
    out_dir: str | Path,
    args: Mapping[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """Train the adapter, head, temperature and (unless frozen) the vision tower; saves `<out_dir>/model`."""
    out_dir = Path(out_dir)
    model.train()
    trainer = Trainer(
        model=model,
        args=training_arguments(out_dir, {"seed": seed, **dict(args)}, save_strategy="no"),
        train_dataset=dataset,
        data_collator=collate_pairs,
        callbacks=[EpochAware(dataset, model)],
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "CLIP stage: %.2f M trainable parameters (vision %s)", trainable / 1e6, model.config_dict["vision"]
    )
    result = trainer.train()
    model.eval()
    saved = model.save_pretrained(out_dir / "model")
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "steps": trainer.state.global_step,
        "train_runtime": result.metrics.get("train_runtime"),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "saved": str(saved),
    }
