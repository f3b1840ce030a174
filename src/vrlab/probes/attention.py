"""Attention maps (`vrlab task=attention`): for chosen words of a generated response, the attention from the
word's first token to the image tokens at one layer, averaged over heads, reshaped to the token grid,
upsampled and overlaid on the image as a PNG. The LLM runs with eager attention only for this pass, since
SDPA does not return attention weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.errors import VrlabError
from vrlab.probes.lmvr import lmvr_batch, prompt_batch, token_masks

log = logging.getLogger(__name__)


@torch.inference_mode()
def word_attention(
    model: Any,
    image: torch.Tensor,
    prompt: str,
    layer: int = -1,
    max_new_tokens: int = 24,
    words: list[str] | None = None,
) -> dict[str, Any]:
    """Response text and, per word, an `[h, w]` map of head-averaged attention from its first token to the image."""
    res = lmvr_batch(
        model, [image], prompt, [layer], ["all"], ["mean"], ["after"], max_new_tokens
    )  # generates
    batch = prompt_batch(model, [image], prompt)
    response_ids = model.tokenizer(res["texts"][0], add_special_tokens=False).input_ids
    full = torch.cat(
        [
            batch["input_ids"],
            torch.tensor([response_ids], dtype=torch.long, device=batch["input_ids"].device),
        ],
        dim=1,
    )
    att = torch.ones_like(full)
    embeds = model.embed(
        full, batch["pixel_values"], batch["has_image"], batch.get("guide_ids"), batch.get("guide_mask")
    )
    previous = model.llm.config._attn_implementation
    model.llm.set_attn_implementation("eager")
    try:
        out = model.llm(inputs_embeds=embeds, attention_mask=att, output_attentions=True)
    finally:
        model.llm.set_attn_implementation(previous)
    attn = out.attentions[layer][0].float().mean(0)  # [T, T], averaged over heads
    image_pos = (
        token_masks(full, att, batch["input_ids"].shape[1], model.image_token_id)["image"][0]
        .nonzero()
        .flatten()
    )
    layouts = getattr(batch["pixel_values"], "layouts", None)
    if layouts:  # anyres, native: the map of the last view (anyres: the unpadded tiles), newlines dropped
        rows, cols = layouts[0].views[-1]
        width = cols + (1 if layouts[0].newline else 0)
        if len(image_pos) != layouts[0].num_vision_tokens:
            raise VrlabError(f"{len(image_pos)} image positions, but the image's layout gives {layouts[0]}")
        image_pos = image_pos[len(image_pos) - rows * width :].reshape(rows, width)[:, :cols].flatten()
        grid = (rows, cols)
    elif len(image_pos) != model.encoder.num_tokens:
        raise VrlabError(
            "attention maps need an adapter that keeps the encoder's token grid (linear, mlp2x_gelu, tg)"
        )
    else:
        grid = tuple(model.encoder.grid)
    start = batch["input_ids"].shape[1]
    maps, found = {}, {}
    offsets = _word_starts(model.tokenizer, response_ids)
    for word, k in offsets:
        if words and word.lower().strip(".,!?") not in {w.lower() for w in words}:
            continue
        row = attn[start + k]
        maps[f"{word}@{k}"] = row[image_pos].reshape(grid)
        found[f"{word}@{k}"] = float(row.sum())
    return {
        "text": res["texts"][0],
        "maps": maps,
        "row_sums": found,
        "attention": attn,
        "image_positions": image_pos,
        "padded": not layouts,  # the fixed strategy's map covers the padded square; the others the image
    }


def _word_starts(tokenizer: Any, ids: list[int]) -> list[tuple[str, int]]:
    """(word, index of its first token) for each whitespace-separated word of the decoded response."""
    out, text = [], ""
    for k in range(len(ids)):
        piece = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        if len(piece.split()) > len(text.split()) or (k == 0 and piece.strip()):
            word = piece.split()[-1] if piece.split() else piece
            out.append((word, k))
        text = piece
    full = tokenizer.decode(ids, skip_special_tokens=True).split()
    return [(full[i] if i < len(full) else w, k) for i, (w, k) in enumerate(out)]


def overlay(image: torch.Tensor, grid_map: torch.Tensor, path: Path, title: str, padded: bool = True) -> Path:
    """Upsample a map over the padded square the model saw, crop it to the image, and save the overlay as PNG
    (`padded=False`: the map already covers the image, as under the anyres and native strategies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[1:]
    # The model saw the image padded to a square (LLaVA-1.5's pad): map the grid onto that square, then crop.
    side = max(h, w)
    size = (side, side) if padded else (h, w)
    heat = F.interpolate(grid_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    if padded:
        top, left = (side - h) // 2, (side - w) // 2
        heat = heat[top : top + h, left : left + w]
    fig, ax = plt.subplots(figsize=(4, 4 * h / w))
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
