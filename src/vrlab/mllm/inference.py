"""Inference on a VisionLanguageModel: batched generation with stop strings, and answer log-likelihoods.

Both take one image (or None) and one prompt per sample and build the batch exactly as training does (the
model's template, `<image>` in front), so a score reflects the trained model and not a re-implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.mllm.conversation import IGNORE_INDEX
from vrlab.mllm.data import generation_batch, scoring_batch

# lmms-eval generation keys -> Hugging Face `generate` arguments; anything else is refused by name.
_GENERATE_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams")


def generate_kwargs(gen: Mapping[str, Any], default_max_new_tokens: int = 32) -> dict[str, Any]:
    """`generate` arguments from an lmms-eval-style dict: greedy unless `do_sample` or a temperature > 0."""
    out = {k: gen[k] for k in _GENERATE_KEYS if gen.get(k) is not None}
    out.setdefault("max_new_tokens", default_max_new_tokens)
    sample = bool(out.get("do_sample")) or float(out.get("temperature") or 0) > 0
    out["do_sample"] = sample
    if not sample:  # greedy: sampling knobs would only raise transformers warnings
        for k in ("temperature", "top_p", "top_k"):
            out.pop(k, None)
    out["max_new_tokens"] = int(out["max_new_tokens"])
    return out


def cut_at(text: str, until: Sequence[str]) -> str:
    """The text up to the first stop string (lmms-eval's `until`)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


@torch.inference_mode()
def generate_answers(
    model: Any,
    images: Sequence[torch.Tensor | None],
    prompts: Sequence[str],
    gen: Mapping[str, Any] | None = None,
    until: Sequence[str] = (),
    aspect: str | None = None,
) -> list[str]:
    """One answer per (image, prompt), in one left-padded batch; greedy unless `gen` asks to sample."""
    batch = generation_batch(model, images, prompts, aspect)
    out = model.generate(**batch, **generate_kwargs(gen or {}))
    texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
    return [cut_at(t, until).strip() for t in texts]


@torch.inference_mode()
def answer_loglikelihoods(
    model: Any,
    images: Sequence[torch.Tensor | None],
    prompts: Sequence[str],
    answers: Sequence[str],
    aspect: str | None = None,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each answer given its prompt and image.

    The answer is scored as training labels it: its tokens and the end-of-turn token that follows. `is_greedy`
    says whether greedy decoding would produce exactly those tokens.
    """
    batch = scoring_batch(model, images, prompts, answers, aspect)
    if model.is_seq2seq:
        targets = batch["decoder_labels"]
        logits = model(**batch).logits
    else:
        targets = batch["labels"][:, 1:]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    mask = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    greedy = (logits.argmax(-1) == targets) | ~mask
    total = (token_logp * mask).sum(dim=1)
    return [(float(t), bool(g)) for t, g in zip(total, greedy.all(dim=1), strict=True)]
