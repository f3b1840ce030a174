"""The LMVR tasks: `lmvr_features` (hidden-state features of a stage-2 model into stores), `probe` (a linear
probe on stored features), `probe_table` (every probe result as one table) and `attention` (word-to-image
attention maps)."""

from __future__ import annotations

import json
import logging
import re
from glob import glob
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from vrlab.checkpoint import VLM_CONFIG
from vrlab.data.images import decode_image
from vrlab.errors import VrlabError
from vrlab.fingerprint import items_fingerprint, path_fingerprint
from vrlab.mllm.model import VisionLanguageModel
from vrlab.probes.attention import overlay, word_attention
from vrlab.probes.linear import (
    attribute_probes,
    corruption_groups,
    finite_features,
    fit_and_evaluate,
    robustness_summary,
)
from vrlab.probes.lmvr import RELEASED_RECIPE, write_lmvr_stores
from vrlab.report import markdown_table
from vrlab.runtime import (
    atomic_write_bytes,
    atomic_write_json,
    process_group,
    rank_device,
    resolve_device,
    run_dir,
    seed_everything,
    slug,
    to_plain,
)
from vrlab.store import EmbeddingStore, is_complete
from vrlab.tasks.config import benchmark_from_cfg, model_checkpoint

log = logging.getLogger(__name__)


def lmvr_stores(
    cfg: Any, benchmark: Any, model: Any = None, rank: int = 0, world: int = 1
) -> tuple[Path, dict[str, EmbeddingStore] | None]:
    """The three stores of `benchmark` for `cfg.checkpoint` and `cfg.lmvr`, computed once (keyed by settings);
    with `world` > 1, this rank's slice of them (rank 0 completes them and gets them; the others get None)."""
    checkpoint = model_checkpoint(cfg, "lmvr_features")
    lcfg = cfg.lmvr
    options = {
        "prompt": lcfg.prompt,
        "layers": list(lcfg.layers),
        "token_sets": list(lcfg.token_sets),
        "poolings": list(lcfg.poolings),
        "moments": list(lcfg.moments),
        "max_new_tokens": lcfg.max_new_tokens,
    }
    settings = {
        "checkpoint": str(checkpoint.resolve()),
        "benchmark": benchmark.card.name,
        **options,
        # retrained weights at the same path, or changed images, must not reuse the features
        "fingerprint": {
            "checkpoint": path_fingerprint(checkpoint),
            "images": items_fingerprint([it.path for it in benchmark.items]),
        },
    }
    shard_size = int(lcfg.get("shard_size") or 256)
    if shard_size != 256:  # only then, so the folders of the default keep their names
        settings["shard_size"] = shard_size
    out = run_dir(cfg.paths.outputs, f"lmvr/{slug(benchmark.card.name)}", checkpoint.name, settings)
    kinds = ("llm", "encoder", "adapter")
    if not all(is_complete(out / k) for k in kinds):
        device = rank_device(resolve_device(cfg.device))
        model = model or VisionLanguageModel.from_pretrained(checkpoint).to(device).eval()
        return out, write_lmvr_stores(
            model,
            benchmark.items,
            out,
            settings,
            batch_size=lcfg.batch_size,
            shard_size=shard_size,
            rank=rank,
            world=world,
            **options,
        )
    return out, {k: EmbeddingStore(out / k) for k in kinds}


def lmvr_features_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=lmvr_features checkpoint=<stage-2 model> benchmark=<images>`: features into three stores
    (under torchrun or accelerate launch, each rank a slice of the images)."""
    seed_everything(cfg.seed)
    bench = benchmark_from_cfg(cfg)
    with process_group() as (rank, world):
        out, stores = lmvr_stores(cfg, bench, rank=rank, world=world)
    if stores is None:
        return {"rank": rank, "folder": str(out)}
    rows = stores["llm"].manifest["rows"]
    log.info("LMVR features of %d images -> %s (%d LLM rows)", len(bench), out, len(rows))
    return {"folder": str(out), "rows": rows}


def _features(cfg: Any, benchmark: str, kind: str, row: str) -> tuple[torch.Tensor, list[Any], Any]:
    """Features `[N, D]` of one benchmark for `kind` (llm | encoder | adapter) and a row name, plus labels."""
    # per-card loader overrides (a documented subset such as {imagenet-train: {max_per_class: 10}})
    overrides = (to_plain(cfg.probe.get("benchmark_args")) or {}).get(benchmark, {})
    bench = benchmark_from_cfg(cfg, benchmark, overrides)
    out, stores = lmvr_stores(cfg, bench)
    store = stores[kind]
    rows = store.manifest["rows"]
    if row not in rows:
        raise VrlabError(f"feature row '{row}' is not in {out / kind} (rows: {', '.join(rows)})")
    feats = store.load()[:, rows.index(row)]
    finite_features(feats, f"features '{row}' of {out / kind}", store.ids)
    # an attribute benchmark (DeepFashion) labels each image with every attribute at once
    labels = {it.id: it.meta["attributes"] if bench.task == "attributes" else it.label for it in bench.items}
    return feats, [labels[i] for i in store.ids], bench


def lmvr_recipe(cfg: Any) -> dict[str, Any]:
    """How the LLM features of `cfg.checkpoint` were made, and whether that is the released code's recipe."""
    lcfg = cfg.lmvr
    config = Path(str(cfg.checkpoint)) / VLM_CONFIG
    # a checkpoint without the key reads as vicuna_v1, as VisionLanguageModel does
    template = json.loads(config.read_text()).get("template", "vicuna_v1") if config.exists() else None
    ours = {"prompt": str(lcfg.prompt), "max_new_tokens": int(lcfg.max_new_tokens), "template": template}
    differs = [k for k, v in RELEASED_RECIPE.items() if ours.get(k) != v]
    return {
        **ours,
        "decoding": "greedy",
        "released": not differs,
        "note": "the released code's recipe"
        if not differs
        else "fast settings, not the released code's recipe (which has "
        + ", ".join(f"{k}={RELEASED_RECIPE[k]!r}" for k in differs)
        + ")",
    }


def probe_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=probe checkpoint=... probe.train=<bench> probe.test=[...] probe.features=llm probe.row=...`."""
    pcfg = cfg.probe
    if not cfg.checkpoint:
        raise VrlabError("task=probe needs checkpoint=<a stage-2 model folder>")
    row = pcfg.row or (
        f"{pcfg.moment}/{pcfg.token_set}/{pcfg.pooling}/layer{pcfg.layer}"
        if pcfg.features == "llm"
        else f"{pcfg.features}/mean"
    )
    if row.startswith("before/generated"):
        raise VrlabError("token set 'generated' does not exist before generation; use probe.moment=after")
    train_x, train_y, bench = _features(cfg, pcfg.train, pcfg.features, row)
    multilabel = bench.task == "multilabel"
    tests = {}
    for name in to_plain(pcfg.test):
        x, y, tb = _features(cfg, name, pcfg.features, row)
        if tb.classes != bench.classes:
            raise VrlabError(
                f"test benchmark '{name}' has classes {tb.classes}, training '{pcfg.train}' has {bench.classes}"
            )
        tests.update(corruption_groups(name, x, y, tb.items))
    fit = {"weight_decays": to_plain(pcfg.weight_decays), "val_fraction": pcfg.val_fraction, "seed": cfg.seed}
    if bench.task == "attributes":
        result = attribute_probes(train_x, train_y, tests, bench.values, bench.groups, **fit)
        result["weight_decay"] = {a: r["weight_decay"] for a, r in result["attributes"].items()}
    else:
        result = fit_and_evaluate(train_x, train_y, tests, len(bench.classes), multilabel, **fit)
    result.update(
        features=pcfg.features,
        row=row,
        train=pcfg.train,
        label=pcfg.label or f"{pcfg.features}:{row}",
        protocol={
            "classifier": "logistic regression, L-BFGS, standardised features",
            "selection": f"weight decay on a seeded {pcfg.val_fraction:.0%} validation split, then refit",
            "metric": "mAP (sklearn AP definition)"
            if multilabel
            else "top-1 accuracy per attribute (NA rows left out), averaged per group"
            if bench.task == "attributes"
            else "top-1 accuracy",
        },
        benchmark_args=to_plain(pcfg.get("benchmark_args")) or {},
        **({"recipe": lmvr_recipe(cfg)} if pcfg.features == "llm" else {}),
    )
    if any("/" in k for k in result["test"]):
        result["robustness"] = robustness_summary(result["test"])
    out = run_dir(
        cfg.paths.outputs,
        "probe",
        pcfg.train,
        {
            "row": row,
            "features": pcfg.features,
            "test": to_plain(pcfg.test),
            "checkpoint": str(cfg.checkpoint),
            "wd": to_plain(pcfg.weight_decays),
            # the LLM features' recipe and the fit's split: another recipe or seed is another run
            "recipe": [str(cfg.lmvr.prompt), int(cfg.lmvr.max_new_tokens)],
            "seed": cfg.seed,
            "val_fraction": pcfg.val_fraction,
            **({"benchmark_args": to_plain(pcfg.benchmark_args)} if pcfg.get("benchmark_args") else {}),
        },
    )
    atomic_write_json(out / "probe.json", result)
    log.info(
        "probe %s [%s] trained on %s: %s",
        pcfg.features,
        row,
        pcfg.train,
        {k: {m: round(v, 2) for m, v in r.items()} for k, r in result["test"].items() if k.count("/") < 2},
    )
    result["output"] = str(out / "probe.json")
    return result


def probe_table_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=probe_table`: every probe.json under outputs/probe as one table (CSV and markdown)."""
    rows = []
    for path in sorted(glob(str(Path(cfg.paths.outputs) / "probe" / "*" / "probe.json"))):
        r = json.loads(Path(path).read_text())
        row = {
            "features": r["features"],
            "row": r["row"],
            "train": r["train"],
            "weight_decay": r["weight_decay"],
        }
        for test, m in r["test"].items():
            if test.count("/") < 2:
                row.update({f"{test}:{k}": round(v, 2) for k, v in m.items() if isinstance(v, float)})
        if r.get("robustness"):
            row.update({f"corruption-{k}": round(v, 2) for k, v in r["robustness"]["per_category"].items()})
        rows.append(row)
    if not rows:
        raise VrlabError(
            f"no probe results under {Path(cfg.paths.outputs) / 'probe'}; run vrlab task=probe first"
        )
    table = pd.DataFrame(rows).sort_values(["features", "row"])
    out = Path(cfg.paths.outputs) / "probe" / "table.csv"
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    atomic_write_bytes(out.with_suffix(".md"), markdown_table(table).encode())
    print(table.to_string(index=False))
    return {"table": str(out), "rows": len(table)}


def attention_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=attention checkpoint=... attention.image=<file> attention.words=[...]`."""
    if not cfg.attention.image:
        raise VrlabError("task=attention needs attention.image=<file>")
    checkpoint = model_checkpoint(cfg, "attention")
    model = VisionLanguageModel.from_pretrained(checkpoint).to(resolve_device(cfg.device)).eval()
    image = decode_image(cfg.attention.image)
    res = word_attention(
        model,
        image,
        cfg.generate.prompt,
        cfg.attention.layer,
        cfg.lmvr.max_new_tokens,
        to_plain(cfg.attention.words) or None,
    )
    out = Path(
        cfg.attention.out
        or run_dir(
            cfg.paths.outputs,
            "attention",
            Path(cfg.attention.image).stem,
            {"ckpt": str(checkpoint), "layer": cfg.attention.layer},
        )
    )
    files = [
        str(
            overlay(
                image,
                m,
                out / f"{re.sub(r'[^A-Za-z0-9_@-]+', '_', k)}.png",
                f"'{k}' (layer {cfg.attention.layer})",
                padded=res["padded"],
            )
        )
        for k, m in res["maps"].items()
    ]
    log.info("response: %s; %d maps -> %s", res["text"], len(files), out)
    return {"text": res["text"], "files": files}
