"""`vrlab task=alignment` and `task=correspondence`: the A and C scores of an encoder, extracted into stores
first (reused when the same settings ran before), written as JSON under `<outputs>/alignment|correspondence`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vrlab.checkpoint import load_tower
from vrlab.data.images import decode_image
from vrlab.encoders.factory import load_encoder
from vrlab.errors import VrlabError
from vrlab.extract import run_extraction
from vrlab.mllm.tower import representation
from vrlab.registry import Registry
from vrlab.runtime import atomic_write_json, config_hash, resolve_device, run_dir, seed_everything, to_plain
from vrlab.scores.alignment import alignment
from vrlab.scores.correspondence import correspondence, extraction_options, settings_for
from vrlab.tasks.config import benchmark_from_cfg, extraction_request, registry_cfg

log = logging.getLogger(__name__)


def alignment_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=alignment`: A of `encoder` (+ `alignment.adapter`) against the references, per benchmark."""
    acfg = cfg.alignment
    benchmarks: Sequence[str] = to_plain(acfg.benchmarks) or [cfg.benchmark]
    if not benchmarks or benchmarks == [None]:
        raise VrlabError("alignment needs benchmarks: alignment.benchmarks=[...] or benchmark=<name>")
    references = to_plain(acfg.references)
    if not references:
        raise VrlabError("alignment.references is empty; give [{name, encoder, adapter}, ...]")
    if not acfg.adapter:
        log.warning(
            "no alignment.adapter: A is computed on raw encoder tokens, not on projected tokens as in the "
            "paper; widths must then match the references' raw widths"
        )
    results, store_keys, tuned = {}, {}, None
    for bench in benchmarks:
        bench_args = {**to_plain(cfg.benchmark_args), **to_plain(acfg.get("benchmark_args") or {})}
        cand = run_extraction(
            extraction_request(
                cfg,
                cfg.encoder,
                bench,
                adapter=acfg.adapter,
                limit=acfg.n_images,
                benchmark_args=bench_args,
                encoder_weights=cfg.get("encoder_weights"),  # the candidate's; references keep their own
            )
        )
        tuned = cand.manifest["settings"].get("tuned_tower") or tuned
        refs = {
            r["name"]: run_extraction(
                extraction_request(
                    cfg,
                    r["encoder"],
                    bench,
                    adapter=r.get("adapter"),
                    limit=acfg.n_images,
                    encoder_args=r.get("encoder_args", {}),
                    benchmark_args=bench_args,
                )
            )
            for r in references
        }
        res = alignment(cand, refs, acfg.n_images, acfg.dtype)
        store_keys[bench] = [cand.manifest["key"], *(r.manifest["key"] for r in refs.values())]
        res["settings"]["adapter"] = acfg.adapter
        results[bench] = res
        log.info(
            "A(%s, %s) = %.4f  (%s)",
            cfg.encoder,
            bench,
            res["A"],
            ", ".join(f"{k}: {v['A']:.4f}" for k, v in res["references"].items()),
        )
    out = run_dir(
        cfg.paths.outputs,
        "alignment",
        cfg.encoder,
        {
            "benchmarks": benchmarks,
            "refs": references,
            "adapter": acfg.adapter,
            "n": acfg.n_images,
            "dtype": acfg.dtype,
            "stores": store_keys,  # new weights or images give new stores, hence a new result folder
        },
    )
    summary = {
        "representation": representation(acfg.label, cfg.encoder, tuned),
        "encoder": cfg.encoder,
        "tuned_tower": tuned,
        "A": {b: r["A"] for b, r in results.items()},
        "results": results,
    }
    atomic_write_json(out / "alignment.json", summary)
    log.info("written %s", out / "alignment.json")
    summary["output"] = str(Path(out) / "alignment.json")
    return summary


def correspondence_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=correspondence encoder=... benchmark=synth-spair correspondence=law|standard`."""
    seed_everything(cfg.seed)
    ccfg = to_plain(cfg.correspondence)
    knobs = {k: v for k, v in ccfg.items() if k not in ("protocol", "max_pairs", "label")}
    families = [c.family for c in Registry.from_config(registry_cfg(cfg)).resolve(cfg.encoder)]
    settings = settings_for(ccfg["protocol"], families, **knobs)
    encoder_args, compose = extraction_options(settings, to_plain(cfg.encoder_args), to_plain(cfg.compose))
    benchmark = benchmark_from_cfg(cfg)
    if not hasattr(benchmark, "pairs"):
        raise VrlabError(
            f"benchmark '{cfg.benchmark}' has no correspondence pairs (use an SPair-layout card)"
        )
    pairs = benchmark.pairs[: ccfg.get("max_pairs") or None]
    store = run_extraction(
        extraction_request(
            cfg,
            cfg.encoder,
            cfg.benchmark,
            encoder_args=encoder_args,
            compose=compose,
            encoder_weights=cfg.get("encoder_weights"),
        )
    )
    tuned = store.manifest["settings"].get("tuned_tower")
    items = {it.id: it for it in benchmark.items}
    encoder, flipped_cache = None, {}

    def flipped(item_id: str) -> torch.Tensor:
        nonlocal encoder
        if item_id not in flipped_cache:
            if encoder is None:
                encoder = load_encoder(cfg.encoder, encoder_args, compose, registry=registry_cfg(cfg))
                if cfg.get("encoder_weights"):
                    load_tower(encoder, cfg.encoder_weights)
                encoder = encoder.to(resolve_device(cfg.device))
            image = decode_image(items[item_id].path).flip(-1)
            flipped_cache[item_id] = encoder.encode_images([image], cfg.dtype).tokens[0].float().cpu()
        return flipped_cache[item_id]

    result = correspondence(store, pairs, settings, flipped)
    out = run_dir(
        cfg.paths.outputs,
        "correspondence",
        cfg.encoder,
        {
            "settings": settings.to_dict(),
            "store": store.manifest["key"],
            "pairs": [p.id for p in pairs],
            "annotations": config_hash(
                [dataclasses.asdict(p) for p in pairs]
            ),  # edited keypoints: new folder
        },
    )
    record = {
        "representation": representation(ccfg.get("label"), cfg.encoder, tuned),
        "encoder": cfg.encoder,
        "tuned_tower": tuned,
        "benchmark": benchmark.card.name,
        "C": result.pop("C"),
        "settings": result.pop("settings"),
        "grid": result.pop("grid"),
        "frame": result.pop("frame"),
        "n_pairs": result.pop("n_pairs"),
        "encoder_settings": store.manifest["settings"]["encoder"],
        **result,
    }
    atomic_write_json(out / "correspondence.json", record)
    s = result["summary"]
    log.info(
        "C(%s, %s, protocol=%s): %s -> %s",
        cfg.encoder,
        benchmark.card.name,
        settings.protocol,
        ", ".join(f"{k} {v['per_image']:.2f}" for k, v in s.items()),
        out / "correspondence.json",
    )
    record["output"] = str(out / "correspondence.json")
    return record
