"""`vrlab task=demo | demo_llm`: the demo's own steps.

`demo` builds tiny random encoders of every family, saves them with each library's own save call under
`demo/models/` (plus a full-size random ViT-S for `make perf`), writes cards pointing at them to
`demo/encoders/` and renders a few scenes to `demo/images/`. The Makefile's `demo` target then runs
`task=features` on every family and two composites, generates the benchmark and extracts every demo encoder
on it, loading the models back through the registry exactly as real checkpoints load. `demo_llm` builds and
pretrains the tiny LLM. Training, lmms-eval evaluation, A, C and the law fit then run as ordinary tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.data.scenes import write_demo_images
from vrlab.demo.tiny_encoders import BUILDERS, PERF_BUILDERS, build_tiny
from vrlab.demo.tiny_llm import build_llm, default_corpus, llava_texts, pretrain_llm
from vrlab.runtime import seed_everything, to_plain

log = logging.getLogger(__name__)


def demo_task(cfg: Any) -> dict[str, Any]:
    """Write the demo's tiny models, cards and images."""
    root = Path(cfg.demo.root)
    families = (
        [*BUILDERS, *PERF_BUILDERS]
        if cfg.demo.families in ("all", None)
        else list(to_plain(cfg.demo.families))
    )
    cards = []
    for family in families:
        # Always rebuilt (a few seconds in all), so cards never go stale when the builders change.
        card = build_tiny(family, root / "models", root / "encoders", seed=cfg.seed)
        log.info("built tiny %s -> %s", family, card)
        cards.append(str(card))
    images = write_demo_images(root / "images", count=cfg.demo.images, seed=cfg.seed)
    log.info("wrote %d demo images to %s", len(images), root / "images")
    return {"cards": cards, "images": [str(p) for p in images]}


def demo_llm_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=demo_llm`: a tiny Llama whose tokenizer is trained on the generated benchmark's text, then
    pretrained on that text as a language model (real MLLMs start from a pretrained LLM)."""
    folder = Path(cfg.llm.source)
    texts = llava_texts(Path(cfg.paths.data) / "synthetic" / "llava")
    seed_everything(cfg.seed)
    build_llm(folder, corpus=texts + default_corpus())
    losses = pretrain_llm(folder, texts, steps=cfg.demo.llm_pretrain_steps, seed=cfg.seed)
    log.info("tiny LLM at %s: text pretraining loss %.3f -> %.3f", folder, losses[0], losses[-1])
    return {"llm": str(folder), "pretrain_losses": losses}
