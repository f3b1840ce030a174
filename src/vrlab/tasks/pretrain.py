"""`vrlab task=pretrain_encoder pretrain.kind=clip|ssl|denoise|supervised|random pretrain.steps=N`: one encoder
pre-trained on a benchmark's images, saved with its card (and, with `pretrain.cards`, into a card folder the
registry reads), so a budget ladder is a sweep over `pretrain.steps`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from vrlab.errors import VrlabError
from vrlab.fingerprint import items_fingerprint
from vrlab.pretrain import PretrainSettings, pretrain
from vrlab.runtime import config_hash, run_dir, seed_everything, slug, to_plain
from vrlab.tasks.config import benchmark_from_cfg

log = logging.getLogger(__name__)


def pretrain_task(cfg: Any) -> dict[str, Any]:
    pcfg = to_plain(cfg.pretrain)
    options = {k: v for k, v in pcfg.items() if k not in ("data", "out", "cards", "name", "limit")}
    settings = PretrainSettings(**options, seed=int(cfg.seed))
    settings.check()  # a wrong kind or budget fails before any image is read
    seed_everything(cfg.seed)
    bench = benchmark_from_cfg(cfg, pcfg["data"], {})
    items = bench.items[: pcfg.get("limit") or None]
    captions = None
    if settings.kind == "clip":
        texts = getattr(bench, "captions", None)
        if not texts:
            raise VrlabError(
                f"pretrain.kind=clip needs captions, but '{pcfg['data']}' is a {bench.task} benchmark without "
                "them; use a caption card (synth-retrieval, coco-karpathy-test)"
            )
        captions = [texts[it.meta["captions"][0]] for it in items]
    labels = [it.label for it in items] if settings.kind == "supervised" else None
    name = pcfg.get("name") or f"pretrained/{settings.kind}-{settings.steps}"
    out = Path(
        pcfg.get("out")
        or run_dir(
            cfg.paths.outputs,
            "pretrain",
            name,
            {
                **vars(settings),
                "data": pcfg["data"],
                "limit": pcfg.get("limit"),
                # regenerated images under the same card name train another encoder in another folder
                "images": items_fingerprint([it.path for it in items]),
                "captions": config_hash(captions),
                "labels": config_hash(labels),
            },
        )
    )
    done = out / "pretrain.json"  # written last: its presence means the model and card are complete
    if done.is_file():
        record = json.loads(done.read_text())
        log.info("%s already pre-trained with these settings and images: %s (skipped)", name, out)
    else:
        record = pretrain(
            [it.path for it in items], out, settings, captions=captions, labels=labels, name=name
        )
    if pcfg.get("cards"):  # a card folder for registry.encoder_dirs
        cards = Path(pcfg["cards"])
        cards.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "card.yaml", cards / f"{slug(name)}.yaml")
        record["registered"] = str(cards / f"{slug(name)}.yaml")
    return {**record, "output": str(out)}
