"""`vrlab task=proxies` (similarity proxies of one encoder, null-calibrated) and `vrlab task=proxy_fit` (the
leaderboard: which proxy, or pair, predicts the MLLM scores leave-one-out)."""

from __future__ import annotations

import json
import logging
import math
from glob import glob
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from vrlab.errors import VrlabError
from vrlab.extract import run_extraction
from vrlab.runtime import (
    atomic_write_bytes,
    atomic_write_json,
    resolve_device,
    run_dir,
    seed_everything,
    to_plain,
)
from vrlab.scores.law import benchmarks_of, read_table
from vrlab.scores.proxy_fit import fit_proxies, ranking_frame
from vrlab.scores.similarity import MEASURES, measure, null_calibrated
from vrlab.tasks.config import benchmark_from_cfg, extraction_request

log = logging.getLogger(__name__)


def image_features(store: Any, n: int | None = None) -> torch.Tensor:
    """One vector per image `[N, D]`: the mean of its tokens (each image's own count under anyres/native)."""
    ids = store.ids[: n or None]
    return torch.stack([store.tokens(i).float().mean(0) for i in ids])


def caption_features(
    llm: str, captions: list[str], layer: int = -1, batch_size: int = 16, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """An LLM's features of captions `[N, H]`: the mean over each caption's tokens of hidden layer `layer`
    (the Platonic Representation setting), by `from_pretrained` (bf16 on a GPU)."""
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(llm, dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            enc = tokenizer(captions[start : start + batch_size], padding=True, return_tensors="pt").to(
                device
            )
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer].float()
            mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out).double()


def proxies_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=proxies encoder=... proxy.references=[...]`: every measure of `proxy.measures` between the
    encoder's image features and each reference encoder's (and, with `proxy.llm`, the LLM's features of the
    images' captions), raw and null-calibrated; writes proxies.json, one row of the proxy table."""
    pcfg = cfg.proxy
    unknown = sorted(set(pcfg.measures) - set(MEASURES))
    if unknown:
        raise VrlabError(f"proxy.measures {unknown} are not measures; choose from {list(MEASURES)}")
    if not pcfg.references and not pcfg.llm and not pcfg.probe_train:
        raise VrlabError(
            "task=proxies needs proxy.references=[<encoder>, ...], proxy.llm=<LLM> or proxy.probe_train=<benchmark>"
        )
    seed_everything(cfg.seed)
    tower = cfg.get("encoder_weights")
    store = run_extraction(
        extraction_request(cfg, cfg.encoder, pcfg.benchmark, limit=pcfg.n_images, encoder_weights=tower)
    )
    # extract.layers: every recorded layer is a candidate too, as columns <measure>@<layer>
    layer_sets = {None: image_features(store)} | {k: image_features(store.view(k)) for k in store.layers}
    ours = layer_sets[None]
    sides: dict[str, torch.Tensor] = {}
    for ref in pcfg.references:
        ref_store = run_extraction(
            extraction_request(
                cfg, ref, pcfg.benchmark, limit=pcfg.n_images, encoder_args={}, compose={}, layers=None
            )
        )
        if ref_store.ids != store.ids:
            raise VrlabError(f"reference '{ref}' holds other images than '{cfg.encoder}' on {pcfg.benchmark}")
        sides[ref] = image_features(ref_store)
    if pcfg.llm:
        bench = benchmark_from_cfg(cfg, pcfg.benchmark, {})
        texts = getattr(bench, "captions", None) or []  # a caption card: items index their captions
        captions = {it.id: texts[it.meta["captions"][0]] for it in bench.items if it.meta.get("captions")}
        missing = [i for i in store.ids if not captions.get(i)]
        if missing:
            raise VrlabError(
                f"proxy.llm needs a caption per image, but benchmark '{pcfg.benchmark}' has none for "
                f"{missing[:3]}; use a caption card (e.g. synth-retrieval, coco-karpathy-test)"
            )
        sides["llm"] = caption_features(
            str(pcfg.llm),
            [captions[i] for i in store.ids],
            int(pcfg.llm_layer),
            device=resolve_device(cfg.device),
        )
    device = resolve_device(cfg.device)  # the measures run where the features are: the GPU when present
    layer_sets = {k: v.to(device) for k, v in layer_sets.items()}
    sides = {k: v.to(device) for k, v in sides.items()}
    values: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    if pcfg.probe_train:  # linear-probe accuracy as a proxy, per recorded layer too
        for layer, accuracy in probe_accuracy(cfg).items():
            values["probe" if layer is None else f"probe@{layer}"] = accuracy
    for layer, feats_v in layer_sets.items():
        at = "" if layer is None else f"@{layer}"
        for name in pcfg.measures:
            fn = measure(name, k=pcfg.k, keep=pcfg.keep)
            per_side = {
                side: null_calibrated(fn, feats_v, feats, int(pcfg.permutations), int(cfg.seed))
                for side, feats in sides.items()
            }
            refs = [v for s, v in per_side.items() if s != "llm"]
            if refs:  # like A: the mean over references
                values[f"{name}{at}"] = sum(v["raw"] for v in refs) / len(refs)
                values[f"{name}_z{at}"] = sum(v["z"] for v in refs) / len(refs)
            if "llm" in per_side:
                values[f"{name}_llm{at}"] = per_side["llm"]["raw"]
                values[f"{name}_llm_z{at}"] = per_side["llm"]["z"]
            detail[f"{name}{at}"] = per_side
    label = pcfg.label or cfg.encoder
    if pcfg.layer_label is not None:  # a layer sweep: columns <measure>@<layer>
        values = {f"{k}@{pcfg.layer_label}": v for k, v in values.items()}
    record = {
        "representation": label,
        "encoder": cfg.encoder,
        "benchmark": pcfg.benchmark,
        "n_images": len(ours),
        "layers": store.layers,
        "store": store.manifest["key"],
        "references": list(pcfg.references),
        "llm": pcfg.llm,
        "settings": {
            k: to_plain(pcfg[k])
            for k in ("k", "keep", "permutations", "llm_layer", "probe_train", "probe_test")
        },
        "seed": cfg.seed,
        "proxies": values,
        "detail": detail,
    }
    out = run_dir(cfg.paths.outputs, "proxies", label, {k: v for k, v in record.items() if k != "proxies"})
    atomic_write_json(out / "proxies.json", record)
    log.info(
        "proxies of %s: %s -> %s", label, {k: round(v, 4) for k, v in values.items()}, out / "proxies.json"
    )
    return {**record, "output": str(out / "proxies.json")}


def probe_accuracy(cfg: Any) -> dict[int | None, float]:
    """Test accuracy (mAP for multi-label) of a linear probe on the mean image features of `proxy.probe_train`,
    tested on `proxy.probe_test`, for the encoder's layer and every layer `extract.layers` records."""
    from vrlab.probes.linear import fit_and_evaluate

    pcfg = cfg.proxy
    if not pcfg.probe_test:
        raise VrlabError("proxy.probe_train needs proxy.probe_test=<a labelled benchmark with its classes>")
    benches = {b: benchmark_from_cfg(cfg, b, {}) for b in (pcfg.probe_train, pcfg.probe_test)}
    train, test = benches[pcfg.probe_train], benches[pcfg.probe_test]
    if train.classes != test.classes:
        raise VrlabError(f"proxy.probe_test '{pcfg.probe_test}' has other classes than '{pcfg.probe_train}'")
    tower = cfg.get("encoder_weights")
    stores = {
        b: run_extraction(extraction_request(cfg, cfg.encoder, b, encoder_weights=tower)) for b in benches
    }
    labels = {b: {it.id: it.label for it in benches[b].items} for b in benches}
    multilabel = train.task == "multilabel"
    out: dict[int | None, float] = {}
    for layer in [None, *stores[pcfg.probe_train].layers]:
        views = {b: (s if layer is None else s.view(layer)) for b, s in stores.items()}
        x = {b: image_features(v) for b, v in views.items()}
        y = {b: [labels[b][i] for i in v.ids] for b, v in views.items()}
        result = fit_and_evaluate(
            x[pcfg.probe_train],
            y[pcfg.probe_train],
            {"test": (x[pcfg.probe_test], y[pcfg.probe_test])},
            len(train.classes),
            multilabel,
            seed=cfg.seed,
        )
        out[layer] = result["test"]["test"]["mAP" if multilabel else "accuracy"]
    return out


def proxy_table(table: pd.DataFrame, files: list[Path]) -> pd.DataFrame:
    """The law table with one column per proxy value of the proxies.json `files`, matched by representation."""
    extra: dict[str, dict[str, float]] = {}
    for path in files:
        rec = json.loads(Path(path).read_text())
        row = extra.setdefault(rec["representation"], {})
        for key, value in rec["proxies"].items():
            # a layer sweep's run repeats the plain columns of the same store tokens: equal values agree
            if key in row and not math.isclose(row[key], value, rel_tol=1e-9, abs_tol=1e-12):
                raise VrlabError(
                    f"two proxies.json give different '{key}' for '{rec['representation']}' ({row[key]} and "
                    f"{value}, one is {path}); remove one, or label one run differently (proxy.label)"
                )
            row[key] = value
    if not extra:
        return table
    frame = pd.DataFrame.from_dict(extra, orient="index").rename_axis("representation").reset_index()
    clash = sorted(set(frame.columns) & set(table.columns) - {"representation"})
    if clash:
        raise VrlabError(f"proxy columns {clash} are already columns of the table")
    return table.merge(frame, on="representation", how="left")


def proxy_fit_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=proxy_fit proxy.table=<csv> proxy.proxies=[A, C, cka_z, ...]`: the ranked leaderboard."""
    pcfg = cfg.proxy
    files = sorted(Path(p) for g in pcfg.results for p in glob(g, recursive=True))
    law_table = read_table(pcfg.table, check_a=False)
    table = proxy_table(law_table, files)
    proxies = list(pcfg.proxies)
    if pcfg.layers:  # every <proxy>@<layer> column of the table for the named proxies
        proxies += [c for c in table.columns if "@" in c and c.rsplit("@", 1)[0] in pcfg.layers]
    # by default every score column that is not a proxy of the table (layer columns, proxies.json's)
    scores = [b for b in benchmarks_of(law_table) if b not in proxies and "@" not in b]
    fit = fit_proxies(
        table,
        proxies,
        to_plain(pcfg.benchmarks) or to_plain(cfg.law.benchmarks) or scores,
        pairs=bool(pcfg.pairs),
        degree=int(cfg.law.degree),
        bootstrap=int(pcfg.bootstrap),
        seed=int(cfg.seed),
    )
    frame = ranking_frame(fit)
    out = run_dir(
        cfg.paths.outputs, "proxy_fit", "leaderboard", {"table": str(pcfg.table), "proxy": str(pcfg)}
    )
    atomic_write_json(out / "proxy_fit.json", fit)
    atomic_write_bytes(out / "proxy_fit.csv", frame.to_csv(index=False).encode())
    atomic_write_bytes(out / "proxy_fit.md", leaderboard_markdown(fit, frame).encode())
    from vrlab.report import plot_leaderboard

    plot = plot_leaderboard(frame, out / "proxy_fit.png")
    show = Table(title=f"proxy leaderboard ({len(fit['benchmarks'])} benchmarks, leave-one-out)")
    for col in ("rank", "proxy", "LOO R² [95%]", "Spearman [95%]"):
        show.add_column(col)
    for _, r in frame.iterrows():
        show.add_row(
            str(r["rank"]),
            r["proxy"],
            f"{r.mean_loo_r2:.3f} [{r.loo_r2_low:.2f}, {r.loo_r2_high:.2f}]",
            f"{r.mean_spearman:.3f} [{r.spearman_low:.2f}, {r.spearman_high:.2f}]",
        )
    Console(width=140).print(show)
    log.info("proxy leaderboard -> %s (plot %s)", out / "proxy_fit.json", plot)
    return {"output": str(out / "proxy_fit.json"), "csv": str(out / "proxy_fit.csv"), **fit}


def leaderboard_markdown(fit: dict[str, Any], frame: pd.DataFrame) -> str:
    lines = [
        "# Proxy leaderboard",
        "",
        f"Leave-one-out over the representations, degree {fit['degree']}, benchmarks: "
        f"{', '.join(fit['benchmarks'])}; 95% intervals from {fit['bootstrap']} bootstrap resamples of the "
        "representations.",
        "",
        "| rank | proxy | mean LOO R² | 95% | mean Spearman | 95% |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        lines.append(
            f"| {r['rank']} | {r.proxy} | {r.mean_loo_r2:.3f} | [{r.loo_r2_low:.2f}, {r.loo_r2_high:.2f}] | "
            f"{r.mean_spearman:.3f} | [{r.spearman_low:.2f}, {r.spearman_high:.2f}] |"
        )
    for base, sweep in fit["layers"].items():
        lines += [
            "",
            f"Layer sweep of {base}: best layer {sweep['best']} "
            f"({', '.join(f'{k}: {v:.3f}' for k, v in sweep['per_layer'].items())})",
        ]
    return "\n".join(lines) + "\n"
