"""`vrlab task=demo | demo_llm | demo_scores`: the demo's own steps.

`demo` builds tiny random encoders of every family, saves them with each library's own save call under
`demo/models/` (plus a full-size random ViT-S for `make perf`), writes cards pointing at them to
`demo/encoders/` and renders a few scenes to `demo/images/`. The Makefile's `demo` target then runs
`task=features` on every family and two composites, generates the benchmark and extracts every demo encoder
on it, loading the models back through the registry exactly as real checkpoints load. `demo_llm` builds and
pretrains the tiny LLM; `demo_scores` writes the stand-in benchmark scores of the demo's law fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from vrlab.data.scenes import write_demo_images
from vrlab.demo.tiny_encoders import BUILDERS, PERF_BUILDERS, build_tiny
from vrlab.demo.tiny_llm import build_llm, default_corpus, llava_texts, pretrain_llm
from vrlab.extract import run_extraction
from vrlab.probes.linear import fit_and_evaluate
from vrlab.runtime import atomic_write_bytes, seed_everything, to_plain
from vrlab.tasks.config import benchmark_from_cfg, extraction_request

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


def demo_scores_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=demo_scores`: stand-in benchmark scores for the demo's law fit.

    MLLM benchmark scores arrive with the evaluation stage; until then the demo scores each encoder by the
    accuracy of vrlab's linear probe (the LMVR probe: standardised features, weight decay chosen on a seeded
    validation split) on mean-pooled tokens, on the generated ImageFolder split and on the VisDA-style domain
    shift. The CSV says so in its name.
    """
    tasks = {
        "synth-folder-test": ("synth-folder-train", "synth-folder-test"),
        "synth-visda-validation": ("synth-visda-train", "synth-visda-validation"),
    }
    rows = []
    for encoder in to_plain(cfg.demo.law_encoders):
        row: dict[str, Any] = {"representation": encoder}
        for column, (train, test) in tasks.items():
            data, classes = [], 0
            for bench in (train, test):
                store = run_extraction(extraction_request(cfg, encoder, bench))
                loader = benchmark_from_cfg(cfg, bench, {})
                labels = {it.id: it.label for it in loader.items}
                data.append((store.load().mean(dim=1), [labels[i] for i in store.ids]))
                classes = max(classes, len(loader.classes))
            result = fit_and_evaluate(
                *data[0],
                {test: data[1]},
                classes,
                False,
                weight_decays=to_plain(cfg.probe.weight_decays),
                val_fraction=cfg.probe.val_fraction,
                seed=cfg.seed,
            )
            row[column] = result["test"][test]["accuracy"]
        rows.append(row)
        log.info(
            "stand-in scores of %s: %s",
            encoder,
            {k: round(v, 1) for k, v in row.items() if k != "representation"},
        )
    out = Path(cfg.law.scores or Path(cfg.paths.outputs) / "law" / "demo_probe_scores.csv")
    atomic_write_bytes(out, pd.DataFrame(rows).to_csv(index=False).encode())
    log.info("stand-in scores (linear probes, not MLLM benchmarks) -> %s", out)
    return {"scores": str(out), "rows": rows}
