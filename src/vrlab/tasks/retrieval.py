"""`vrlab task=retrieval retrieval.model=<spec> benchmark=<caption card>`: zero-shot image-text recall@k of a
CLIP-style model (Hugging Face CLIP/SigLIP, open_clip, or an LLM2CLIP folder), written as `retrieval.json`
under `<outputs>/retrieval/<benchmark>_<model>-<hash>/` with a table of the recalls."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vrlab.data.images import DEFAULT_MAX_PIXELS
from vrlab.errors import VrlabError
from vrlab.fingerprint import items_fingerprint, spec_fingerprint
from vrlab.retrieval import SPEC_HELP, evaluate_retrieval, load_retrieval_model
from vrlab.runtime import (
    atomic_write_json,
    library_versions,
    resolve_device,
    run_dir,
    seed_everything,
    to_plain,
)
from vrlab.settings import check_count
from vrlab.tasks.config import benchmark_from_cfg

log = logging.getLogger(__name__)


def model_label(spec: str) -> str:
    """A short name for a model spec: the last part of its hub id or path (with an open_clip tag)."""
    body = (
        str(spec).split(":", 1)[1] if str(spec).startswith(("hf:", "open_clip:", "llm2clip:")) else str(spec)
    )
    body = body.removeprefix("local-dir:").removeprefix("hf-hub:")
    name, _, tag = body.partition("@")
    label = Path(name.rstrip("/")).name or name
    return f"{label}@{Path(tag).name}" if tag else label


def weights_fingerprint(spec: str, settings: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the local weight files (or cached hub snapshot) the model was loaded from."""
    body = spec.split(":", 1)[1] if spec.startswith(("hf:", "open_clip:", "llm2clip:")) else spec
    name, _, tag = body.partition("@")
    source = settings.get("source") or name.removeprefix("local-dir:")
    pretrained = settings.get("pretrained") or tag
    return spec_fingerprint(
        {"source": str(source), "pretrained": pretrained, "revision": settings.get("revision")}
    )


def print_table(record: dict[str, Any], title: str) -> None:
    ks = record["ks"]
    view = Table(title=title)
    for col in ("direction", *(f"R@{k} (%)" for k in ks)):
        view.add_column(col)
    for direction in ("image_to_text", "text_to_image"):
        view.add_row(direction, *(f"{100 * record[f'{direction}@{k}']:.2f}" for k in ks))
    Console(width=120).print(view)


def retrieval_task(cfg: Any) -> dict[str, Any]:
    """Recall@k of `retrieval.model` on `benchmark` (a CaptionLoader card, e.g. flickr30k-test)."""
    rcfg = cfg.get("retrieval") or {}
    spec, batch_size = rcfg.get("model"), rcfg.get("batch_size", 64)
    limit, num_workers = rcfg.get("limit"), rcfg.get("num_workers", 0)
    if not spec:
        raise VrlabError(f"task=retrieval needs retrieval.model=<{SPEC_HELP}>")
    if not cfg.benchmark:
        raise VrlabError(
            "task=retrieval needs benchmark=<a caption card: flickr30k-test, coco-karpathy-test, synth-retrieval>"
        )
    # every setting a user can get wrong is checked before a model loads
    check_count("retrieval.batch_size", batch_size, 1, False)
    check_count("retrieval.limit", limit, 1, True)
    check_count("retrieval.num_workers", num_workers, 0, False)
    ks = to_plain(rcfg.get("ks", [1, 5, 10]))
    if not isinstance(ks, list) or not ks:
        raise VrlabError(f"retrieval.ks must be a non-empty list of positive integers, got {ks!r}")
    for k in ks:
        check_count("retrieval.ks", k, 1, False)
    seed_everything(cfg.seed)
    loader = benchmark_from_cfg(cfg)
    if not hasattr(loader, "captions"):
        raise VrlabError(
            f"benchmark '{cfg.benchmark}' ({loader.task}) has no captions; retrieval needs a card whose loader "
            "is vrlab.data.captions.CaptionLoader"
        )
    device = resolve_device(cfg.device)
    spec = str(spec)
    model = load_retrieval_model(spec, device=device)
    max_pixels = cfg.data.get("max_pixels", DEFAULT_MAX_PIXELS)
    result = evaluate_retrieval(
        model,
        loader,
        batch_size=batch_size,
        ks=ks,
        limit=limit,
        dtype=str(cfg.dtype),
        max_pixels=max_pixels,
        num_workers=num_workers,
    )
    model_settings = model.settings() if hasattr(model, "settings") else {"class": type(model).__name__}
    items = loader.items[: limit or None]
    key = {
        "model": spec,
        "model_settings": model_settings,
        # replaced weights or images give a new folder, never an overwritten result
        "weights": weights_fingerprint(spec, model_settings),
        "benchmark": loader.card.to_dict(),
        "benchmark_settings": loader.settings(),
        "images": items_fingerprint([it.path for it in items]),
        "ks": ks,
        "limit": limit,
        "dtype": str(cfg.dtype),
        "device": device.type,
    }
    out = run_dir(cfg.paths.outputs, "retrieval", f"{loader.card.name}_{model_label(spec)}", key)
    record = {
        "model": spec,
        "benchmark": loader.card.name,
        **result,
        "model_settings": model_settings,
        "benchmark_settings": loader.settings(),
        "fingerprint": {"weights": key["weights"], "images": key["images"]},
        "batch_size": batch_size,
        "device": str(device),
        "dtype": str(cfg.dtype),
        "seed": cfg.seed,
        "versions": library_versions(),
    }
    atomic_write_json(out / "retrieval.json", record)
    print_table(
        record,
        f"{model_label(spec)} on {loader.card.name}: {result['n_images']} images, {result['n_texts']} captions",
    )
    log.info(
        "retrieval %s on %s: %s -> %s",
        spec,
        loader.card.name,
        ", ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if "@" in k),
        out / "retrieval.json",
    )
    record["output"] = str(out / "retrieval.json")
    return record
