"""Inference on a VisionLanguageModel: batched generation with stop strings, answer log-likelihoods, and the
caption likelihood that is the published Law paper's A score.

All build the batch exactly as training does (the model's template, `<image>` in front; captions as stage 1
labels them), so a score reflects the trained model and not a re-implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vrlab.errors import VrlabError
from vrlab.mllm.conversation import IGNORE_INDEX
from vrlab.mllm.data import Collator, generation_batch, on_device, scoring_batch

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
def label_logprobs(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample of a teacher-forced batch: the summed log-probability of its labelled tokens, their count,
    and whether greedy decoding reproduces them all. Pooled over a batch, sum/count is the model's −loss."""
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
    return (token_logp * mask).sum(dim=1), mask.sum(dim=1), greedy.all(dim=1)


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
    total, _, greedy = label_logprobs(model, scoring_batch(model, images, prompts, answers, aspect))
    return [(float(t), bool(g)) for t, g in zip(total, greedy, strict=True)]


def caption_likelihood(
    model: Any, dataset: Any, indices: Sequence[int], batch_size: int = 8, progress: bool = True
) -> dict[str, Any]:
    """Caption-likelihood A of a VisionLanguageModel (set to its stage-1 template) over `dataset[indices]`
    (a ConversationDataset of image-caption samples): batched, teacher-forced, tokens pooled over all pairs."""
    if not indices:
        raise VrlabError("caption likelihood needs at least one image-caption pair")
    collate = Collator(model, padding_side="right")
    total, count, per_pair = 0.0, 0, {}
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="caption likelihood", unit="batch", disable=not progress):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        for item in items:
            if not item["has_image"]:
                raise VrlabError(
                    f"caption sample '{item['id']}' has no image; caption likelihood scores captions given images"
                )
        sums, counts, _ = label_logprobs(model, on_device(model, collate(items)))
        for item, s, n in zip(items, sums.tolist(), counts.tolist(), strict=True):
            per_pair[str(item["id"])] = {"logprob": s, "tokens": int(n)}
        total += float(sums.double().sum())
        count += int(counts.sum())
    return {
        "A": total / count,
        "n_pairs": len(indices),
        "n_tokens": count,
        "per_pair": per_pair,
        "mean_of_pairs": sum(p["logprob"] / p["tokens"] for p in per_pair.values()) / len(per_pair),
    }
