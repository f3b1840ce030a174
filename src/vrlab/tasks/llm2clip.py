"""`vrlab task=llm2clip_text` (caption-contrastive fine-tuning of an LLM) and `task=llm2clip` (caption
embeddings into a store, then the CLIP stage, with retrieval before and after on `llm2clip.eval_benchmark`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_json, resolve_device, run_dir, seed_everything, slug, to_plain
from vrlab.tasks.config import benchmark_from_cfg

log = logging.getLogger(__name__)


def _captions_per_image(loader: Any) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in loader.items]
    for text, image in zip(loader.captions, loader.caption_image, strict=True):
        out[image].append(text)
    return out


def llm2clip_text_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=llm2clip_text llm2clip_text.llm=<causal LLM> llm2clip_text.benchmark=<caption card>`."""
    from vrlab.llm2clip.train import caption_pairs, train_text_stage

    c = cfg.llm2clip_text
    if not c.llm:
        raise VrlabError("task=llm2clip_text needs llm2clip_text.llm=<a causal LLM: hub id or folder>")
    seed_everything(cfg.seed)
    loader = benchmark_from_cfg(cfg, c.benchmark, {})
    pairs = caption_pairs(_captions_per_image(loader))
    if len(pairs) < 2:
        raise VrlabError(
            f"benchmark '{c.benchmark}' has {len(pairs)} images with two captions; the caption-contrastive "
            "stage needs (short, long) pairs of captions of one image"
        )
    settings = {"llm": c.llm, "benchmark": c.benchmark, **to_plain(c), "seed": cfg.seed}
    out = Path(c.out or run_dir(cfg.paths.outputs, "llm2clip_text", Path(str(c.llm)).name, settings))
    result = train_text_stage(
        c.llm,
        pairs,
        out,
        to_plain(c.train),
        lora=to_plain(c.lora),
        template=c.template,
        max_length=c.max_length,
        scale=c.scale,
        seed=cfg.seed,
        trust_remote_code=c.trust_remote_code,
    )
    result |= {"pairs": len(pairs), "benchmark": c.benchmark}
    atomic_write_json(out / "train_result.json", result)
    losses = result["losses"]
    log.info(
        "caption-contrastive stage: %d pairs, %d steps, loss %.3f -> %.3f; text encoder saved to %s",
        len(pairs),
        result["steps"],
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        result["saved"],
    )
    return result


def llm2clip_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=llm2clip encoder=<registry encoder> llm2clip.text_encoder=<LLM> llm2clip.benchmark=...`."""
    from vrlab.llm2clip.model import LLM2CLIPModel
    from vrlab.llm2clip.text import LLMTextEncoder
    from vrlab.llm2clip.train import (
        ImageCaptionEmbeddings,
        embed_captions,
        text_encoder_settings,
        train_clip_stage,
    )
    from vrlab.retrieval import evaluate_retrieval

    c = cfg.llm2clip
    if not cfg.encoder or not c.text_encoder:
        raise VrlabError("task=llm2clip needs encoder=<registry encoder> and llm2clip.text_encoder=<LLM>")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    saved = text_encoder_settings(c.text_encoder)
    template = c.template if c.template != "auto" else saved.get("template", "auto")
    max_length = int(c.max_length or saved.get("max_length", 512))
    text = LLMTextEncoder(c.text_encoder, template, max_length, c.trust_remote_code).to(device)
    loader = benchmark_from_cfg(cfg, c.benchmark, {})
    per_image = [0] * len(loader.items)
    ids = []
    for image in loader.caption_image:
        ids.append(f"{loader.items[image].id}#{per_image[image]}")
        per_image[image] += 1
    store = embed_captions(
        text,
        list(loader.captions),
        ids,
        Path(cfg.paths.outputs) / "stores" / slug(c.benchmark),
        c.text_encoder,
        batch_size=c.embed_batch_size,
    )
    embeddings = store.load("pooled")
    captions_of: list[list[int]] = [[] for _ in loader.items]
    for row, image in enumerate(loader.caption_image):
        captions_of[image].append(row)
    model = LLM2CLIPModel.build(
        cfg.encoder,
        text.dim,
        c.embed_dim,
        vision=c.vision,
        blocks=c.blocks,
        text_encoder={"source": str(c.text_encoder), "template": text.template, "max_length": max_length},
        registry_cfg=to_plain(cfg.registry),
        encoder_args=to_plain(cfg.encoder_args),
        compose=to_plain(cfg.compose),
    )
    model.attach_text_encoder(text)
    model.to(device)
    settings = {"encoder": cfg.encoder, **to_plain(c), "seed": cfg.seed, "store": store.manifest["key"]}
    out = Path(c.out or run_dir(cfg.paths.outputs, "llm2clip", cfg.encoder, settings))
    evaluation = benchmark_from_cfg(cfg, c.eval_benchmark, {}) if c.eval_benchmark else None
    before = evaluate_retrieval(model, evaluation, batch_size=c.eval_batch_size) if evaluation else None
    data = ImageCaptionEmbeddings(
        [it.path for it in loader.items],
        captions_of,
        embeddings,
        model.vision.transform,
        cfg.data.max_pixels,
        cfg.seed,
    )
    result = train_clip_stage(model, data, out, to_plain(c.train), cfg.seed)
    after = evaluate_retrieval(model, evaluation, batch_size=c.eval_batch_size) if evaluation else None
    result |= {
        "encoder": cfg.encoder,
        "text_encoder": str(c.text_encoder),
        "benchmark": c.benchmark,
        "caption_store": str(store.path),
        "retrieval": {"benchmark": c.eval_benchmark, "before": before, "after": after},
    }
    atomic_write_json(out / "llm2clip_result.json", result)
    losses = result["losses"]
    log.info(
        "CLIP stage of %s: %d steps, loss %.3f -> %.3f, 1/τ %.1f; saved %s",
        cfg.encoder,
        result["steps"],
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        result["logit_scale"],
        result["saved"],
    )
    if before and after:
        keys = [k for k in after if "@" in k]
        width = max(len(k) for k in keys)
        lines = [f"retrieval on {c.eval_benchmark}: {'metric':<{width}}  before   after"]
        lines += [f"  {k:<{width}}  {before[k]:6.3f}  {after[k]:6.3f}" for k in keys]
        print("\n".join(lines))
    return result
