"""Small, general encoder pre-training for controlled studies: encoders of known kind and budget, saved with
their library's own save call and loaded back by ordinary cards.

Kinds (each a transformers CLIP vision transformer of a chosen size, trained from a seeded random init):
- `random`: the init itself (0 steps);
- `clip`: contrastive on image-caption pairs, a small CLIP text tower beside it, open_clip's `ClipLoss`;
- `ssl`: augmentation invariance, two augmented views of each image through a projection head and the same
  InfoNCE loss (`ClipLoss` between the views: SimCLR's objective);
- `denoise`: Gaussian noise on the pixels, a linear decoder from the patch tokens to the clean patches;
- `supervised`: a linear classifier on the pooled output, cross-entropy on the benchmark's labels.

`pretrain(...)` writes the model (`save_pretrained`: a full CLIPModel for `clip`, the vision tower otherwise),
an encoder card `card.yaml` beside it (transformers backend, last layer) and `pretrain.json` with the loss
curve and settings. A budget ladder is a sweep over `steps`; every rung is a card.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from vrlab.data.images import decode_image
from vrlab.encoders.base import NORMALIZATIONS, ImageTransform
from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_bytes, atomic_write_json, library_versions

log = logging.getLogger(__name__)
KINDS = ("random", "clip", "ssl", "denoise", "supervised")


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that changes the trained weights."""

    kind: str
    steps: int
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    depth: int = 3
    heads: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    noise: float = 0.5  # denoise: the noise's standard deviation, in normalised pixel units
    seed: int = 0

    def check(self) -> None:
        if self.kind not in KINDS:
            raise VrlabError(f"pretrain.kind='{self.kind}' is not one of {list(KINDS)}")
        if self.kind == "random" and self.steps:
            raise VrlabError("pretrain.kind=random is the untrained init: set pretrain.steps=0")
        if self.kind != "random" and self.steps < 1:
            raise VrlabError(f"pretrain.kind={self.kind} needs pretrain.steps >= 1 (0 steps is kind=random)")
        if self.kind in ("clip", "ssl") and self.batch_size < 2:
            raise VrlabError(
                f"pretrain.kind={self.kind} contrasts the images of a batch: pretrain.batch_size must be >= 2"
            )
        if self.image_size % self.patch_size:
            raise VrlabError(
                f"pretrain.image_size={self.image_size} is not a multiple of pretrain.patch_size={self.patch_size}"
            )


def _vision_config(s: PretrainSettings) -> dict[str, Any]:
    return dict(
        image_size=s.image_size,
        patch_size=s.patch_size,
        hidden_size=s.width,
        intermediate_size=4 * s.width,
        num_hidden_layers=s.depth,
        num_attention_heads=s.heads,
    )


def _tokenizer() -> Any:
    from vrlab.demo.tiny_encoders import clip_tokenizer

    return clip_tokenizer()


def build_model(s: PretrainSettings) -> tuple[nn.Module, Any]:
    """The model to train (a CLIPModel for `clip`, a CLIPVisionModel otherwise) and, for `clip`, its tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(s.seed)
    if s.kind != "clip":
        return CLIPVisionModel(CLIPVisionConfig(**_vision_config(s))), None
    tokenizer = _tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=s.width,
        intermediate_size=4 * s.width,
        num_hidden_layers=2,
        num_attention_heads=s.heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text, vision_config=_vision_config(s), projection_dim=s.width)
    return CLIPModel(config), tokenizer


class _Heads(nn.Module):
    """What each kind trains beside the tower (never saved: the tower is the product)."""

    def __init__(self, s: PretrainSettings, n_classes: int) -> None:
        super().__init__()
        if s.kind == "ssl":
            self.head = nn.Sequential(nn.Linear(s.width, s.width), nn.GELU(), nn.Linear(s.width, s.width))
        elif s.kind == "denoise":
            self.head = nn.Linear(s.width, 3 * s.patch_size**2)
        elif s.kind == "supervised":
            self.head = nn.Linear(s.width, n_classes)
        else:
            self.head = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random resized crop (scale 0.4-1), a horizontal flip and a brightness change, per image."""
    out = []
    h, w = x.shape[-2:]
    for img in x:
        scale = 0.4 + 0.6 * torch.rand((), generator=gen).item()
        ch, cw = max(4, int(h * math.sqrt(scale))), max(4, int(w * math.sqrt(scale)))
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = F.interpolate(img[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear")[0]
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        out.append(crop * (0.8 + 0.4 * torch.rand((), generator=gen)))
    return torch.stack(out)


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)


def pretrain(
    images: Sequence[Path],
    out: str | Path,
    settings: PretrainSettings,
    *,
    captions: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one encoder and write it with its card; returns the record written to `pretrain.json`."""
    from open_clip.loss import ClipLoss

    s = settings
    s.check()
    if len(images) < 2:
        raise VrlabError(f"pretrain: {len(images)} image(s); pre-training needs at least 2")
    if s.kind == "clip" and (captions is None or len(captions) != len(images)):
        raise VrlabError(
            "pretrain.kind=clip needs one caption per image: use a caption card (e.g. synth-retrieval)"
        )
    if s.kind == "supervised" and (labels is None or any(not isinstance(v, int) for v in labels)):
        raise VrlabError("pretrain.kind=supervised needs a single-label benchmark (an image folder card)")
    out = Path(out)
    model, tokenizer = build_model(s)
    n_classes = (max(labels) + 1) if labels else 1
    heads = _Heads(s, n_classes)
    transform = ImageTransform(
        s.image_size, resize="squash", mean=NORMALIZATIONS["clip"][0], std=NORMALIZATIONS["clip"][1]
    )
    pixels = torch.stack([transform(decode_image(p)) for p in images])  # small images: all in memory
    text = None
    if s.kind == "clip":
        text = tokenizer(list(captions), padding=True, truncation=True, max_length=77, return_tensors="pt")
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, s.steps // 10)))
    gen = torch.Generator().manual_seed(s.seed)
    contrastive = ClipLoss()
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    order: list[int] = []
    size = min(s.batch_size, len(pixels))
    for _ in tqdm(range(s.steps), desc=f"pretrain {s.kind}", disable=not progress or not s.steps):
        if len(order) < size:  # epochs of a seeded shuffle: no image twice in a batch (a false negative)
            order += torch.randperm(len(pixels), generator=gen).tolist()
        idx, order = torch.tensor(order[:size]), order[size:]
        x = pixels[idx]
        if s.kind == "clip":
            pooled_img = model.vision_model(pixel_values=x).pooler_output
            pooled_txt = model.text_model(
                input_ids=text.input_ids[idx], attention_mask=text.attention_mask[idx]
            ).pooler_output
            img = F.normalize(model.visual_projection(pooled_img), dim=-1)
            txt = F.normalize(model.text_projection(pooled_txt), dim=-1)
            loss = contrastive(img, txt, heads.logit_scale.exp().clamp(max=100))
        elif s.kind == "ssl":
            a = F.normalize(heads.head(model(pixel_values=_augment(x, gen)).pooler_output), dim=-1)
            b = F.normalize(heads.head(model(pixel_values=_augment(x, gen)).pooler_output), dim=-1)
            loss = contrastive(a, b, heads.logit_scale.exp().clamp(max=100))
        elif s.kind == "denoise":
            noisy = x + s.noise * torch.randn(x.shape, generator=gen)
            tokens = model(pixel_values=noisy).last_hidden_state[:, 1:]
            loss = F.mse_loss(heads.head(tokens), _patches(x, s.patch_size))
        else:  # supervised
            target = torch.tensor([labels[i] for i in idx.tolist()])
            loss = F.cross_entropy(heads.head(model(pixel_values=x).pooler_output), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    name = name or f"pretrained/{s.kind}-{s.steps}"
    card = {
        "name": name,
        "family": "clip" if s.kind == "clip" else "vit",
        "description": f"{s.kind} pre-training, {s.steps} steps, {s.width}-wide {s.depth}-layer ViT at {s.image_size} px",
        "_target_": "vrlab.encoders.hf.HFVisionEncoder",
        "source": str((out / "model").resolve()),
        "layer": -1,
        "normalize": "clip",
        "resize": "squash",
    }
    atomic_write_bytes(out / "card.yaml", yaml.safe_dump(card, sort_keys=False).encode())
    record = {
        "name": name,
        "settings": asdict(s),
        "images": len(images),
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": float(sum(losses[-10:]) / len(losses[-10:])) if losses else None,
        "seconds": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
        "card": str(out / "card.yaml"),
        "versions": library_versions(),
    }
    atomic_write_json(out / "pretrain.json", record)
    log.info(
        "pretrained %s (%d steps, loss %s -> %s) -> %s",
        name,
        s.steps,
        record["first_loss"],
        record["last_loss"],
        out,
    )
    return record


def read_record(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "pretrain.json").read_text())
