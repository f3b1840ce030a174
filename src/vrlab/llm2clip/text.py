"""LLM2CLIP's text encoder: any Hugging Face causal LLM made bidirectional, mean-pooled over caption tokens.

The LLM loads as its plain base model (`AutoModel.from_pretrained`, e.g. `LlamaModel`): the released
caption-contrastive weights (`microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned`) are merged weights of a
Llama, so they load without the repository's remote code. Bidirectional attention is a 4D mask over the
non-padding keys plus `is_causal=False` on every attention module (what LLM2Vec's `LlamaBiModel` does; the
`llm2vec` package itself pins an old transformers). A plain 2D mask still gives causal attention, so the
same model serves both.

A text is wrapped in a chat template (the released Llama-3 user turn, or the tokenizer's own EOS for models
without Llama-3's header tokens), optionally after an instruction; the embedding is the mean of the last
hidden state over the caption's tokens and the template's closing token only (LLM2Vec's `embed_mask`,
`skip_instruction=True`), with left padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrlab.encoders.hf import load_quietly
from vrlab.errors import VrlabError

log = logging.getLogger(__name__)

TEXT_CONFIG = "llm2clip_text.json"
# `{text}` is the instruction followed by the caption; what follows `{text}` is embedded with the caption.
TEMPLATES = {
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>",
    "plain": "{text}{eos}",
}
# LLM2CLIP's instructions for the caption-contrastive stage (llm_caption_contrastive/dataset/E5_cc3m.py)
SHORT_TO_LONG = "Given a sentence, retrieve a detailed relevant sentence"
LONG_TO_SHORT = "Given a detailed sentence, retrieve a short relevant sentence"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that carry an `is_causal` flag (the attention layers)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not found:
        raise VrlabError(
            f"{type(model).__name__} has no attention module with an `is_causal` flag; vrlab cannot make it "
            "bidirectional"
        )
    return found


@contextlib.contextmanager
def bidirectional(modules: Sequence[nn.Module]) -> Iterator[None]:
    """`is_causal=False` on `modules` for the duration, then as before.

    Only while the text encoder runs: the flag alone would make an unpadded 2D-mask call bidirectional (SDPA
    skips an all-ones mask and reads the flag) while a padded one stays causal.
    """
    before = [m.is_causal for m in modules]
    for m in modules:
        m.is_causal = False
    try:
        yield
    finally:
        for m, flag in zip(modules, before, strict=True):
            m.is_causal = flag


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask `[B, 1, L, L]`: every position sees every non-padding key.

    Additive (0 or the dtype's minimum) rather than boolean, so eager and SDPA attention read it alike.
    """
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    mask = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


def mean_pool(hidden: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden [B, L, D]` over the positions where `embed_mask` is 1."""
    weights = embed_mask.to(hidden.dtype).unsqueeze(-1)
    counts = weights.sum(1)
    if bool((counts == 0).any()):
        raise VrlabError("a text has no token to pool (empty caption, or max_length cut it all)")
    return (hidden * weights).sum(1) / counts


def load_base_llm(source: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> Any:
    """The LLM's base model (no LM head) by `AutoModel.from_pretrained`; an `auto_map` is ignored unless the
    user opts in, so a released folder with remote code loads as the plain architecture of its model_type."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise VrlabError(f"cannot load the LLM config of '{source}': {exc}") from exc
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = load_quietly(AutoModel, source, {"config": config, **kwargs})
    if getattr(model.config, "is_encoder_decoder", False):
        raise VrlabError(
            f"'{source}' is an encoder-decoder model; LLM2CLIP's text encoder is a decoder-only LLM"
        )
    return model


class LLMTextEncoder(nn.Module):
    """A bidirectional LLM that turns captions into one vector each (float32 by `encode`)."""

    def __init__(
        self,
        source: str | Path,
        template: str = "auto",
        max_length: int = 512,
        trust_remote_code: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.source = str(source)
        self.model = load_base_llm(self.source, trust_remote_code, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise VrlabError(f"the tokenizer of '{source}' has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token  # as the release does
        self.tokenizer.padding_side = "left"
        self.max_length = int(max_length)
        self.template_name = self._template_name(template)
        self.template = TEMPLATES.get(self.template_name, self.template_name)
        if "{text}" not in self.template:
            raise VrlabError(
                f"llm2clip template {template!r} is neither one of {sorted(TEMPLATES)} nor a string with {{text}}"
            )
        attention_modules(self.model)  # refuse a model that cannot be made bidirectional, at load

    def _template_name(self, template: str) -> str:
        if template != "auto":
            return template
        return "llama3" if "<|eot_id|>" in self.tokenizer.get_vocab() else "plain"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def settings(self) -> dict[str, Any]:
        """What an embedding depends on besides the weights (fingerprinted by the caller)."""
        return {
            "source": self.source,
            "template": self.template,
            "max_length": self.max_length,
            "pooling": "mean",
        }

    def tokenize(
        self, texts: Sequence[str], instructions: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Input ids, attention mask and the embed mask (caption + closing tokens) of each text."""
        prefix, _, suffix = self.template.partition("{text}")
        eos = self.tokenizer.eos_token or ""
        prefix, suffix = prefix.replace("{eos}", eos), suffix.replace("{eos}", eos)
        instructions = list(instructions) if instructions is not None else [""] * len(texts)
        if len(instructions) != len(texts):
            raise VrlabError(f"{len(instructions)} instructions for {len(texts)} texts")
        full, embedded = [], []
        for instruction, text in zip(instructions, texts, strict=True):
            text = text.strip()
            lead = f"{instruction.strip()} " if instruction.strip() else ""
            full.append(f"{prefix}{lead}{text}{suffix}")
            embedded.append(f"{text}{suffix}")
        batch = self.tokenizer(
            full, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        embed_mask = torch.zeros_like(batch["attention_mask"])
        for i, part in enumerate(embedded):
            n = len(self.tokenizer(part, add_special_tokens=False)["input_ids"])
            n = min(n, int(batch["attention_mask"][i].sum()))
            if n:
                embed_mask[i, -n:] = 1  # left padding: the caption's tokens are the last ones
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "embed_mask": embed_mask,
        }

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor
    ) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        with bidirectional(attention_modules(self.model)):
            out = self.model(input_ids=input_ids, attention_mask=bidirectional_mask(attention_mask, dtype))
        return mean_pool(out.last_hidden_state, embed_mask)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        instructions: Sequence[str] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """`[N, D]` float32 embeddings, not normalised (as the release stores them)."""
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        device = next(self.model.parameters()).device
        out = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="caption embeddings", disable=not progress, unit="batch"):
            chunk = list(texts[start : start + batch_size])
            instr = None if instructions is None else list(instructions[start : start + batch_size])
            batch = {k: v.to(device) for k, v in self.tokenize(chunk, instr).items()}
            out.append(self(**batch).float().cpu())
        self.train(was_training)
        dim = self.dim
        return torch.cat(out) if out else torch.empty(0, dim)
