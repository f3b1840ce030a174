"""LMVR hidden-state features (`vrlab task=lmvr_features`): image-level features pooled from an MLLM's hidden
states, plus the encoder and adapter baselines from the same run, written to EmbeddingStores.

Per batch of images: greedy generation of a response to the prompt, then one forward pass over the whole
sequence (prompt, image tokens, response) with hidden states ("after"), and one over the prompt alone
("before"); position ids follow the attention mask, so left padding changes nothing. Aggregation choices:
token set `all` (every position: the published setting), `image`, `prompt` (non-image prompt tokens),
`generated`, `last`; pooling `mean` or `max`; any layer (negative from the end). Every combination is one row
of the LLM store's per-item tensor `[n_configs, H]`, listed in the manifest, so a probe picks a row without
rerunning the LLM. Baselines: `encoder` rows (mean-pooled patch tokens, and the pooled/CLS output where the
encoder has one) and `adapter` rows (mean-pooled adapter outputs).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vrlab.data.images import decode_image
from vrlab.errors import VrlabError
from vrlab.mllm.data import generation_batch
from vrlab.store import EmbeddingStore, StoreWriter, is_complete

log = logging.getLogger(__name__)
TOKEN_SETS = ("all", "image", "prompt", "generated", "last")
POOLINGS = ("mean", "max")
MOMENTS = ("before", "after")
LMVR_PROMPT = "Describe the image in detail."
# What the authors' extraction code ran (greedy decoding, the mean over every position of the last layer, which
# is the default probe row after/all/mean/layer-1); vrlab's `vicuna_v1` is their `vicuna_v1_1` template.
RELEASED_RECIPE = {
    "prompt": "Describe the items in the image:",
    "max_new_tokens": 1024,
    "template": "vicuna_v1",
}


def config_names(
    layers: Sequence[int], token_sets: Sequence[str], poolings: Sequence[str], moments: Sequence[str]
) -> list[str]:
    """Row names `<moment>/<token set>/<pooling>/layer<k>`; `generated` exists only after generation."""
    return [
        f"{m}/{t}/{p}/layer{layer}"
        for m, t, p, layer in itertools.product(moments, token_sets, poolings, layers)
        if not (m == "before" and t == "generated")
    ]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Masked mean or max over positions: `[B, T, H]`, `[B, T]` -> `[B, H]` (zeros where the mask is empty)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    filled = hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return torch.where(mask.any(1, keepdim=True), filled, torch.zeros_like(filled))


def token_masks(
    ids: torch.Tensor, attention: torch.Tensor, prompt_len: int, image_id: int
) -> dict[str, torch.Tensor]:
    """Boolean masks `[B, T]` of each token set; positions >= `prompt_len` are generated."""
    valid = attention.bool()
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    generated = valid & (positions >= prompt_len)
    image = valid & (ids == image_id)
    last_index = (valid.long() * positions).argmax(dim=1)
    last = torch.zeros_like(valid)
    last[torch.arange(len(ids)), last_index] = True
    return {
        "all": valid,
        "image": image,
        "prompt": valid & ~image & ~generated,
        "generated": generated,
        "last": last,
    }


def hidden_states(
    model: Any, ids: torch.Tensor, attention: torch.Tensor, batch: dict[str, Any]
) -> tuple[torch.Tensor, ...]:
    """All layers' hidden states of one forward pass (position ids from the attention mask)."""
    embeds = model.embed(
        ids,
        batch.get("pixel_values"),
        batch.get("has_image"),
        batch.get("guide_ids"),
        batch.get("guide_mask"),
    )
    position_ids = (attention.long().cumsum(-1) - 1).clamp_min(0)
    out = model.llm(
        inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids, output_hidden_states=True
    )
    return out.hidden_states


def prompt_batch(model: Any, images: Sequence[torch.Tensor], prompt: str) -> dict[str, Any]:
    """A left-padded batch asking `prompt` about each image (the same prefix training used), on the device."""
    return generation_batch(model, images, [prompt] * len(images))


@torch.inference_mode()
def lmvr_batch(
    model: Any,
    images: Sequence[torch.Tensor],
    prompt: str,
    layers: Sequence[int],
    token_sets: Sequence[str],
    poolings: Sequence[str],
    moments: Sequence[str],
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Features of one batch: `llm` [B, n_configs, H], `encoder` [B, k, D], `adapter` [B, 1, H], and the texts."""
    if model.is_seq2seq:
        raise VrlabError("LMVR features need a causal LLM (hidden states over prompt and response)")
    batch = prompt_batch(model, images, prompt)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    prompt_len = ids.shape[1]
    new = (
        model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        if "after" in moments
        else ids[:, :0]
    )
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    gen_mask = torch.ones_like(new, dtype=torch.bool)
    if eos is not None and new.numel():  # keep the response up to and including its first EOS
        seen = torch.cumsum((new == eos).long(), dim=1)
        gen_mask = (seen == 0) | ((seen == 1) & (new == eos))
    full_ids = torch.cat([ids, new.masked_fill(~gen_mask, pad)], dim=1)
    full_att = torch.cat([attention, gen_mask.long()], dim=1)
    rows, names = [], []
    for moment in moments:
        m_ids, m_att = (full_ids, full_att) if moment == "after" else (ids, attention)
        states = hidden_states(model, m_ids, m_att, batch)
        masks = token_masks(m_ids, m_att, prompt_len, model.image_token_id)
        for t, p, layer in itertools.product(token_sets, poolings, layers):
            if moment == "before" and t == "generated":
                continue
            rows.append(pool(states[layer].float(), masks[t], p))
            names.append(f"{moment}/{t}/{p}/layer{layer}")
    enc = model.encoder(batch["pixel_values"])
    mean = enc.mean().float()
    # a pooled output of another width (EVA-CLIP's projected embedding) cannot share the store's rows
    pooled = enc.pooled is not None and enc.pooled.shape[-1] == mean.shape[-1]
    enc_rows = [mean] + ([enc.pooled.float()] if pooled else [])
    projected = model.encode_images(batch["pixel_values"], batch.get("guide_ids"), batch.get("guide_mask"))
    adapter = torch.stack([v.float().mean(0) for v in projected])  # each image's own tokens (anyres, native)
    texts = model.tokenizer.batch_decode(new.masked_fill(~gen_mask, pad), skip_special_tokens=True)
    return {
        "llm": torch.stack(rows, 1),
        "names": names,
        "encoder": torch.stack(enc_rows, 1),
        "encoder_names": ["encoder/mean"] + (["encoder/pooled"] if pooled else []),
        "adapter": adapter.unsqueeze(1),
        "texts": texts,
    }


def write_lmvr_stores(
    model: Any,
    items: Sequence[Any],
    out: Path,
    settings: dict[str, Any],
    *,
    prompt: str,
    layers: Sequence[int],
    token_sets: Sequence[str],
    poolings: Sequence[str],
    moments: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    shard_size: int = 256,
    rank: int = 0,
    world: int = 1,
) -> dict[str, EmbeddingStore] | None:
    """Run the MLLM over `items` once and write three stores (llm, encoder, adapter) under `out`.

    Under torchrun each rank takes a contiguous slice of shards (as extraction does) and rank 0 completes the
    stores once every rank is done; the others return None. Each shard's generated responses and the row names
    are kept beside the stores (`parts/`), so a resumed or multi-rank run loses none of them."""
    from tqdm import tqdm

    from vrlab.extract import rank_shards
    from vrlab.runtime import atomic_write_json

    ids = [it.id for it in items]
    kinds = ("llm", "encoder", "adapter")
    parts = out / "parts"
    writers = {k: StoreWriter(out / k, {**settings, "kind": k}, ids, shard_size) for k in kinds}
    for shard in rank_shards(writers["llm"].num_shards, rank, world):
        if all(w.done(shard) for w in writers.values()):
            continue
        rng = writers["llm"].shard_range(shard)
        acc: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
        texts: dict[str, str] = {}
        for start in tqdm(
            range(rng.start, rng.stop, batch_size),
            desc=f"lmvr shard {shard}",
            unit="batch",
            disable=rank != 0,
        ):
            chunk = items[start : min(start + batch_size, rng.stop)]
            res = lmvr_batch(
                model,
                [decode_image(it.path) for it in chunk],
                prompt,
                layers,
                token_sets,
                poolings,
                moments,
                max_new_tokens,
            )
            for k in kinds:
                acc[k].append(res[k].cpu())
            names = {"llm": res["names"], "encoder": res["encoder_names"], "adapter": ["adapter/mean"]}
            texts.update(zip([it.id for it in chunk], res["texts"], strict=True))
        # the side files first: a shard that counts as done has its responses and names on disk
        atomic_write_json(parts / f"responses-{shard:05d}.json", texts)
        atomic_write_json(parts / "rows.json", names)
        index = torch.tensor(list(rng))
        for k in kinds:
            writers[k].write_shard(shard, index, torch.cat(acc[k]), None)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        for w in writers.values():
            w.close()
        return None
    names = json.loads((parts / "rows.json").read_text()) if (parts / "rows.json").exists() else {}
    if not names:  # stores completed before the side files existed: the names are in their manifests
        names = {k: EmbeddingStore(out / k).manifest.get("rows", []) for k in kinds if is_complete(out / k)}
    responses: dict[str, str] = {}
    for file in sorted(parts.glob("responses-*.json")):
        responses.update(json.loads(file.read_text()))
    return {k: writers[k].finalize({"rows": names.get(k, []), "responses": responses}) for k in kinds}
