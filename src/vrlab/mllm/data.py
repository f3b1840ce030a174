"""LLaVA-JSON datasets for training and generation: images (pad-to-square or resized per the encoder's
card), tokenised conversations with answer-only labels, and a collator that pads (right for training, left
for generation) and marks which samples carry an image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from vrlab.data.images import decode_image
from vrlab.encoders.base import collate_pixels
from vrlab.mllm.conversation import IGNORE_INDEX, IMAGE_TOKEN, tokenize

TOKEN_CACHE = 100_000  # samples whose tokens a dataset keeps


def guide_text(conversations: Sequence[dict[str, str]]) -> str:
    """TG-LLaVA's text guide: the last human turn, without the placeholder."""
    humans = [t["value"] for t in conversations if t["from"] == "human"]
    return humans[-1].replace(IMAGE_TOKEN, "").strip() if humans else ""


class ConversationDataset(Dataset):
    """Samples of a LlavaJsonLoader, tokenised for `model` (a VisionLanguageModel)."""

    def __init__(
        self, loader: Any, model: Any, image_aspect_ratio: str | None = None, generation: bool = False
    ) -> None:
        self.samples, self.model, self.generation = loader.samples, model, generation
        self.root, self.image_folder = loader.root, loader.image_folder
        self.image_aspect_ratio = image_aspect_ratio
        # Tokenising (a chat template rendered per sample) costs more than a tiny model's step; every epoch
        # after the first reuses it. Bounded, so a LLaVA-665K epoch does not hold every sample's ids.
        self._tokens: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        has_image = "image" in sample
        if index in self._tokens:
            ids, labels = self._tokens[index]
        else:
            ids, labels = tokenize(
                sample["conversations"],
                self.model.template,
                self.model.tokenizer,
                has_image,
                sample.get("id", index),
                self.generation,
            )
            if len(self._tokens) < TOKEN_CACHE:
                self._tokens[index] = (ids, labels)
        ids, labels = list(ids), list(labels)  # callers may change theirs
        item: dict[str, Any] = {
            "input_ids": ids,
            "labels": labels,
            "has_image": has_image,
            "guide": guide_text(sample["conversations"]),
            "id": sample.get("id", index),
        }
        if has_image:
            image = decode_image(self.root / self.image_folder / sample["image"])
            item["pixels"] = self.model.image_input(image, self.image_aspect_ratio)
        return item


class Collator:
    """Pads ids/labels, expands each `<image>` placeholder to the model's vision-token count, stacks pixels."""

    def __init__(self, model: Any, padding_side: str = "right") -> None:
        self.model, self.padding_side = model, padding_side

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        expanded = [
            self.model.expand_placeholder(
                b["input_ids"],
                b["labels"],
                self.model.vision_token_count(b["pixels"]) if b["has_image"] else None,
            )
            for b in batch
        ]
        pad = self.model.tokenizer.pad_token_id
        answers = None
        if self.model.is_seq2seq:  # the prompt feeds the encoder; the answers are the decoder's labels
            answers = [[t for t in labels if t != IGNORE_INDEX] for _, labels in expanded]
            expanded = [
                ([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX],) * 2
                for ids, labels in expanded
            ]
            expanded = [(ids, [IGNORE_INDEX] * len(ids)) for ids, _ in expanded]
        length = max(len(ids) for ids, _ in expanded)
        ids_out, lab_out, mask_out = [], [], []
        for ids, labels in expanded:
            n = length - len(ids)
            fill_ids, fill_lab, fill_mask = [pad] * n, [IGNORE_INDEX] * n, [0] * n
            if self.padding_side == "left":
                (
                    ids_out.append(fill_ids + ids),
                    lab_out.append(fill_lab + labels),
                    mask_out.append(fill_mask + [1] * len(ids)),
                )
            else:
                (
                    ids_out.append(ids + fill_ids),
                    lab_out.append(labels + fill_lab),
                    mask_out.append([1] * len(ids) + fill_mask),
                )
        out: dict[str, Any] = {
            "input_ids": torch.tensor(ids_out),
            "labels": torch.tensor(lab_out),
            "attention_mask": torch.tensor(mask_out),
            "has_image": torch.tensor([b["has_image"] for b in batch]),
        }
        if answers is not None:
            width = max(1, max(len(a) for a in answers))
            out["decoder_labels"] = torch.tensor([a + [IGNORE_INDEX] * (width - len(a)) for a in answers])
        with_images = [b["pixels"] for b in batch if b["has_image"]]
        if with_images:
            out["pixel_values"] = collate_pixels(with_images)
        if self.model.guide_tokenizer is not None:
            out["guide_ids"], out["guide_mask"] = self.model.tokenize_guide([b["guide"] for b in batch])
        return out


def _item(
    model: Any, image: torch.Tensor | None, prompt: str, answer: str | None, aspect: str | None
) -> dict[str, Any]:
    """One sample: the human turn (with `<image>` in front when there is an image) and, to score, its answer."""
    text = f"{IMAGE_TOKEN}\n{prompt}" if image is not None and IMAGE_TOKEN not in prompt else prompt
    turns = [{"from": "human", "value": text}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    ids, labels = tokenize(
        turns, model.template, model.tokenizer, image is not None, generation=answer is None
    )
    item = {"input_ids": ids, "labels": labels, "has_image": image is not None, "guide": prompt}
    if image is not None:
        item["pixels"] = model.image_input(image, aspect)
    return item


def on_device(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    device = next(model.parameters()).device
    return {
        k: (v.to(device) if hasattr(v, "to") else tuple(t.to(device) for t in v)) for k, v in batch.items()
    }


def generation_batch(
    model: Any, images: Sequence[torch.Tensor | None], prompts: Sequence[str], aspect: str | None = None
) -> dict[str, Any]:
    """A left-padded batch asking each prompt about its image (None: text only), on the model's device.

    The prompt is the human turn of the model's template with `<image>` in front, as in training; labels are
    dropped since nothing is scored.
    """
    items = [_item(model, image, prompt, None, aspect) for image, prompt in zip(images, prompts, strict=True)]
    batch = Collator(model, padding_side="left")(items)
    batch.pop("labels")
    batch.pop("decoder_labels", None)
    return on_device(model, batch)


def scoring_batch(
    model: Any,
    images: Sequence[torch.Tensor | None],
    prompts: Sequence[str],
    answers: Sequence[str],
    aspect: str | None = None,
) -> dict[str, Any]:
    """A right-padded batch of prompt + answer conversations whose labels mark the answer tokens only (the
    answer and its end-of-turn token, exactly as training labels them), on the model's device."""
    items = [
        _item(model, image, prompt, answer, aspect)
        for image, prompt, answer in zip(images, prompts, answers, strict=True)
    ]
    return on_device(model, Collator(model, padding_side="right")(items))
