"""Conversation templates and tokenisation with answer-only labels.

Templates: `plain` (LLaVA stage 1: the image followed by the caption; loss on the caption), `vicuna_v1`
(LLaVA-1.5's `v1`: system prompt, `USER: ... ASSISTANT: answer</s>`), and `chat_template` (the tokenizer's
own). The text is tokenised segment by segment so every token knows whether it is an answer token; the
generation prompt is built from the same segments, so training and generation see identical prefixes.
A sample with an image needs exactly one `<image>` placeholder, in a human turn; a text-only sample has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vrlab.errors import VrlabError

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def check_placeholders(conversations: Sequence[dict[str, str]], has_image: bool, sample_id: Any) -> None:
    """Exactly one `<image>` in human turns when there is an image, none otherwise; never in answers."""
    count = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations if turn["from"] == "human")
    if any(IMAGE_TOKEN in t["value"] for t in conversations if t["from"] != "human"):
        raise VrlabError(
            f"sample '{sample_id}': '{IMAGE_TOKEN}' appears in an answer; it belongs in a human turn"
        )
    if has_image and count == 0:
        raise VrlabError(
            f"sample '{sample_id}' has an image but no '{IMAGE_TOKEN}' placeholder in its human turns"
        )
    if count > 1:
        raise VrlabError(
            f"sample '{sample_id}' has {count} '{IMAGE_TOKEN}' placeholders; one image per sample is supported"
        )
    if not has_image and count:
        raise VrlabError(f"sample '{sample_id}' has an '{IMAGE_TOKEN}' placeholder but no image")


def vicuna_segments(turns: Sequence[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces in LLaVA's `vicuna_v1` format: system prompt, `USER: ... ASSISTANT: ...eos`."""
    out: list[tuple[str, bool]] = []
    prefix = VICUNA_SYSTEM + " "
    for turn in turns:
        if turn["from"] == "human":
            value = turn["value"]
            if IMAGE_TOKEN in value:  # LLaVA moves the placeholder to the front of its turn
                value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
            out.append((prefix + f"USER: {value} ASSISTANT:", False))
            prefix = ""
        else:
            out.append((f" {turn['value']}{eos}", True))
    return out


def vicuna_text(turns: Sequence[dict[str, str]], eos: str = "</s>") -> str:
    """A whole conversation as `vicuna_v1` text (what the LLM reads in stage 2)."""
    return "".join(text for text, _ in vicuna_segments(turns, eos))


def segments(
    conversations: Sequence[dict[str, str]], template: str, tokenizer: Any, generation: bool = False
) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of a conversation; with `generation`, the prompt up to the last answer."""
    turns = list(conversations)
    if generation and turns and turns[-1]["from"] != "human":
        turns = turns[:-1]
    eos = tokenizer.eos_token or ""
    if template == "plain":
        answer = next((t["value"] for t in turns if t["from"] == "gpt"), "")
        image = IMAGE_TOKEN if any(IMAGE_TOKEN in t["value"] for t in turns) else ""
        return [(image, False)] + ([] if generation else [(answer + "\n", True)])
    if template == "vicuna_v1":
        return vicuna_segments(turns, eos)
    if template == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise VrlabError(
                "template=chat_template but the tokenizer has no chat template; use vicuna_v1 or plain"
            )
        messages, out, rendered = [], [], ""
        for turn in turns:
            role = "user" if turn["from"] == "human" else "assistant"
            messages.append({"role": role, "content": turn["value"]})
            if role == "user":
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                out.append((text[len(rendered) :], False))
            else:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
                out.append((text[len(rendered) :], True))
            rendered = text
        return out
    raise VrlabError(f"unknown template '{template}'; choose one of {TEMPLATES}")


def tokenize(
    conversations: Sequence[dict[str, str]],
    template: str,
    tokenizer: Any,
    has_image: bool,
    sample_id: Any = "?",
    generation: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (answers only; everything else IGNORE_INDEX). BOS first when the tokenizer has one,
    except for `plain` (LLaVA's stage 1) and `chat_template`, whose template writes any BOS itself (as
    `apply_chat_template` tokenises: Llama 3's template starts with it, Qwen's has none)."""
    check_placeholders(conversations, has_image, sample_id)
    bos = tokenizer.bos_token_id is not None and template == "vicuna_v1"
    ids: list[int] = [tokenizer.bos_token_id] if bos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for text, is_answer in segments(conversations, template, tokenizer, generation):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    return ids, labels
