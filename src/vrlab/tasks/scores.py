"""`vrlab task=alignment` and `task=correspondence`: the A and C scores of an encoder, written as JSON under
`<outputs>/alignment|correspondence`. A follows `alignment.protocol`: `reference_cosine` (tokens extracted into
stores first, reused when the same settings ran before) or `caption_likelihood` (the stage-1 model scores a
seeded sample of image-caption pairs)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vrlab.checkpoint import file_digest, load_tower
from vrlab.data.images import decode_image
from vrlab.encoders.factory import load_encoder, resolution_spec
from vrlab.errors import VrlabError
from vrlab.extract import run_extraction
from vrlab.fingerprint import card_fingerprint, items_fingerprint, spec_fingerprint
from vrlab.mllm.tower import representation
from vrlab.registry import Registry
from vrlab.runtime import atomic_write_json, config_hash, resolve_device, run_dir, seed_everything, to_plain
from vrlab.scores.alignment import ALIGNMENT_PROTOCOLS, alignment
from vrlab.scores.correspondence import correspondence, extraction_options, settings_for
from vrlab.tasks.config import adapter_checkpoint, benchmark_from_cfg, extraction_request, registry_cfg

log = logging.getLogger(__name__)


def alignment_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=alignment`: A of `encoder` (+ `alignment.adapter`): against the references per benchmark
    (`reference_cosine`), or as caption likelihood under the stage-1 model (`caption_likelihood`)."""
    acfg = cfg.alignment
    protocol = acfg.get("protocol") or "reference_cosine"
    if protocol not in ALIGNMENT_PROTOCOLS:
        raise VrlabError(f"alignment.protocol={protocol!r} must be one of {list(ALIGNMENT_PROTOCOLS)}")
    if protocol == "caption_likelihood":
        return caption_alignment_task(cfg)
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
        "protocol": "reference_cosine",
        "tuned_tower": tuned,
        "A": {b: r["A"] for b, r in results.items()},
        "results": results,
    }
    atomic_write_json(out / "alignment.json", summary)
    log.info("written %s", out / "alignment.json")
    summary["output"] = str(Path(out) / "alignment.json")
    return summary


def caption_sample(n_samples: int, n: int | None, seed: int) -> list[int]:
    """The seeded sample of `n` pair indices (all, in order, when `n` is null or covers them)."""
    if not n or n >= n_samples:
        return list(range(n_samples))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n_samples, size=n, replace=False))


def caption_alignment_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=alignment alignment.protocol=caption_likelihood alignment.adapter=<stage-1 checkpoint>`: the
    mean log-probability per caption token given the image, under the frozen stage-1 model, over a seeded
    sample of `alignment.n_pairs` pairs of `alignment.captions` (the same pairs for every representation)."""
    from vrlab.mllm.data import ConversationDataset
    from vrlab.mllm.inference import caption_likelihood
    from vrlab.mllm.model import VisionLanguageModel

    acfg = cfg.alignment
    seed_everything(cfg.seed)
    if not acfg.adapter:
        raise VrlabError(
            "alignment.protocol=caption_likelihood needs alignment.adapter=<the candidate's stage-1 checkpoint "
            "(task=train stage=1)>: A is the caption likelihood under that model"
        )
    if not acfg.get("captions"):
        raise VrlabError(
            "alignment.captions is empty: name a LLaVA-JSON caption benchmark (llava-558k, synth-captions)"
        )
    folder = adapter_checkpoint(cfg, acfg.adapter)
    loader = benchmark_from_cfg(cfg, acfg.captions, {})
    if not hasattr(loader, "samples"):
        raise VrlabError(
            f"alignment.captions={acfg.captions} is not a LLaVA-JSON benchmark (image + conversation samples)"
        )
    pool = [i for i, sample in enumerate(loader.samples) if "image" in sample]
    if not pool:
        raise VrlabError(f"alignment.captions={acfg.captions} has no sample with an image")
    indices = [pool[j] for j in caption_sample(len(pool), acfg.n_pairs, cfg.seed)]
    if acfg.n_pairs and acfg.n_pairs > len(pool):
        log.warning(
            "alignment.n_pairs=%d but %s holds %d image-caption pairs: all are used",
            acfg.n_pairs,
            acfg.captions,
            len(pool),
        )
    model = VisionLanguageModel.from_stage1(
        folder,
        cfg.encoder,
        llm=acfg.get("llm"),
        template=acfg.get("template"),
        registry_cfg=registry_cfg(cfg),
        encoder_args=to_plain(cfg.encoder_args),
        compose=to_plain(cfg.compose),
        trust_remote_code=cfg.llm.trust_remote_code,
        text_tower=to_plain(cfg.adapter).get("text_tower"),
    ).to(resolve_device(cfg.device))
    model.config_dict["image_aspect_ratio"] = cfg.train.image_aspect_ratio  # as stage 1 saw the images
    dataset = ConversationDataset(loader, model)
    ids = [str(loader.samples[i].get("id", i)) for i in indices]
    pairs = config_hash([loader.samples[i] for i in indices], 16)  # edited captions: new numbers
    result = caption_likelihood(model, dataset, indices, acfg.batch_size)
    settings = {
        "captions": loader.card.name,
        "n_pairs": acfg.n_pairs,
        "seed": cfg.seed,
        "template": model.template,
        "image_aspect_ratio": cfg.train.image_aspect_ratio,
        "pooling": "tokens pooled over all pairs (= -loss of the pairs as one batch)",
        "sample_ids": ids,
        "pairs_digest": pairs,
        "checkpoint": str(folder),
        "checkpoint_digest": file_digest(folder),
        "llm": model.config_dict["llm"],
    }
    tuned = model.config_dict.get("tuned_tower")
    card = model.encoder.card.to_dict()
    out = run_dir(
        cfg.paths.outputs,
        "alignment",
        cfg.encoder,
        {
            "protocol": "caption_likelihood",
            **{k: v for k, v in settings.items() if k != "sample_ids"},
            # new weights, settings or image files: a new folder
            "encoder": {"card": card, "files": card_fingerprint(card)},
            "llm_files": spec_fingerprint({"llm": model.config_dict["llm"]}),
            "images": items_fingerprint(
                [loader.root / loader.image_folder / loader.samples[i]["image"] for i in indices]
            ),
        },
    )
    record = {
        "representation": representation(acfg.label, cfg.encoder, tuned),
        "encoder": cfg.encoder,
        "protocol": "caption_likelihood",
        "tuned_tower": tuned,
        "A": result["A"],
        "n_tokens": result["n_tokens"],
        "mean_of_pairs": result["mean_of_pairs"],
        "settings": settings,
        "per_pair": result["per_pair"],
    }
    atomic_write_json(out / "alignment.json", record)
    log.info(
        "A(%s) = %.4f: caption log-likelihood per token over %d pairs of %s (template %s) -> %s",
        cfg.encoder,
        result["A"],
        len(indices),
        loader.card.name,
        model.template,
        out / "alignment.json",
    )
    record["output"] = str(out / "alignment.json")
    return record


def correspondence_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=correspondence encoder=... benchmark=synth-spair correspondence=law|standard`."""
    seed_everything(cfg.seed)
    ccfg = to_plain(cfg.correspondence)
    knobs = {k: v for k, v in ccfg.items() if k not in ("protocol", "max_pairs", "label")}
    cards = Registry.from_config(registry_cfg(cfg)).resolve(cfg.encoder)
    families = [c.family for c in cards]
    settings = settings_for(ccfg["protocol"], families, **knobs)
    strategy = resolution_spec(cards[0].with_overrides(to_plain(cfg.encoder_args) or {}))[0]
    if settings.protocol == "law" and strategy != "fixed":  # before anything is extracted
        raise VrlabError(
            f"correspondence=law is defined for one fixed grid per encoder (the paper never defined C "
            f"otherwise), but '{cfg.encoder}' runs at resolution={strategy}: use correspondence=standard"
        )
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
            flipped_cache[item_id] = encoder.encode_images([image], cfg.dtype).per_image()[0].float().cpu()
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
