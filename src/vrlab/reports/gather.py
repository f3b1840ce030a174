"""Everything an experiment's outputs folder holds, read into plain records for the HTML report: the law
table, fits and policy, eval results, C and A runs, perf reports, LMVR tables and probes, attention maps, the
proxy leaderboard. Every record keeps the file it came from and that file's SHA-256, so each number on the
page can be traced to its run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _json_files(root: Path, pattern: str) -> Iterable[tuple[Path, dict[str, Any]]]:
    for path in sorted(root.glob(pattern)):
        try:
            yield path, json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as exc:  # a half-written file must not hide the others
            log.warning("report: %s is not readable JSON (%s); left out", path, exc)


def _run(root: Path, path: Path) -> dict[str, str]:
    """A result's run folder (relative to the outputs) and its file's digest."""
    return {"run": str(path.parent.relative_to(root)), "sha256": _digest(path)}


def _encoder(d: dict[str, Any]) -> Any:
    return d.get("encoder") or d.get("representation")


def _source(root: Path, path: Path) -> dict[str, str]:
    return {"file": str(path.relative_to(root)), "sha256": _digest(path)}


def law_tables(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((root / "law").glob("table*.csv")):
        table = pd.read_csv(path)
        if "representation" in table.columns:
            out.append({"name": path.stem, "table": table, **_source(root, path)})
    return out


def law_fits(root: Path) -> list[dict[str, Any]]:
    return [
        {"name": p.parent.name, "fit": d, **_source(root, p)}
        for p, d in _json_files(root, "law/fit-*/law_fit.json")
    ]


def policies(root: Path) -> list[dict[str, Any]]:
    return [
        {"name": p.parent.name, "policy": d, **_source(root, p)}
        for p, d in _json_files(root, "law/policy-*/law_policy.json")
    ]


def evals(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path, d in _json_files(root, "eval/*/eval.json"):
        for task, t in (d.get("tasks") or {}).items():
            res = (t.get("results") or {}).get(task, {})
            rows.append(
                {
                    "representation": d.get("representation"),
                    "benchmark": task,
                    "score": res.get("score"),
                    "metric": res.get("primary"),
                    "samples": t.get("n_samples"),
                    "lmms_eval": t.get("lmms_eval_version") or d.get("lmms_eval_version"),
                    "checkpoint_digest": d.get("checkpoint_digest"),
                    **_run(root, path),
                    "command": f"vrlab task=eval encoder={_encoder(d)} checkpoint={d.get('checkpoint')}",
                }
            )
    return rows


def correspondence(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path, d in _json_files(root, "correspondence/*/correspondence.json"):
        settings = d.get("settings") or {}
        rows.append(
            {
                "representation": d.get("representation"),
                "benchmark": d.get("benchmark"),
                "protocol": settings.get("protocol", "standard"),
                "frame": d.get("frame"),
                "C": d.get("C"),
                "pairs": d.get("n_pairs"),
                **_run(root, path),
                "command": f"vrlab task=correspondence encoder={_encoder(d)} benchmark={d.get('benchmark')}",
            }
        )
    return rows


def alignment(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path, d in _json_files(root, "alignment/*/alignment.json"):
        a = d.get("A")  # one number (caption likelihood) or one per benchmark (reference cosine)
        values = {b.removeprefix("lmms:"): v for b, v in a.items()} if isinstance(a, dict) else {"all": a}
        for bench, value in values.items():
            rows.append(
                {
                    "representation": d.get("representation"),
                    "benchmark": bench,
                    "protocol": d.get("protocol"),
                    "A": value,
                    **_run(root, path),
                    "command": f"vrlab task=alignment encoder={_encoder(d)} "
                    f"alignment.protocol={d.get('protocol')}",
                }
            )
    return rows


def perf(root: Path) -> list[dict[str, Any]]:
    return [
        {
            "encoder": d.get("encoder"),
            "params_m": d.get("parameters_m"),
            "tokens": (d.get("tokens_per_image") or {}).get("mean"),
            "resolution": d.get("resolution"),
            "bare_img_s": d.get("bare_forward_img_s"),
            "end_to_end_img_s": d.get("end_to_end_img_s"),
            "device": d.get("device"),
            **_source(root, p),
        }
        for p, d in _json_files(root, "perf/*.json")
        if "end_to_end_img_s" in d
    ]


def lmvr_tables(root: Path) -> list[dict[str, Any]]:
    path = root / "lmvr_tables" / "tables.json"
    if not path.exists():
        return []
    try:
        tables = json.loads(path.read_text())["tables"]
    except (json.JSONDecodeError, KeyError, OSError) as exc:
        log.warning("report: %s is not an LMVR table index (%s); left out", path, exc)
        return []
    return [
        {
            "number": int(n),
            "title": t["title"],
            "columns": t.get("columns") or list(t["rows"][0] if t["rows"] else []),
            "rows": t["rows"],
            "recipes": t["recipes"],
            **_source(root, path),
        }
        for n, t in sorted(tables.items(), key=lambda kv: int(kv[0]))
    ]


def probes(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path, d in _json_files(root, "probe/*/probe.json"):
        for test, m in (d.get("test") or {}).items():
            if test.count("/") >= 2:  # one ImageNet-C cell; the per-corruption means are in the LMVR tables
                continue
            value = next((m[k] for k in ("mAP", "accuracy", "object") if k in m), None)
            rows.append(
                {
                    "features": d.get("features"),
                    "row": d.get("row"),
                    "train": d.get("train"),
                    "test": test,
                    "value": value,
                    "metric": next((k for k in ("mAP", "accuracy", "object") if k in m), ""),
                    **_run(root, path),
                }
            )
    return rows


def _position(png: Path) -> int:
    """The word's position in the response, from `<word>@<position>.png` (0 when the name has none)."""
    tail = png.stem.rsplit("@", 1)[-1]
    return int(tail) if "@" in png.stem and tail.isdigit() else 0


def attention_maps(root: Path) -> list[dict[str, Any]]:
    """Attention maps of `task=attention`: one folder per image (`<stem>-<hash>`), one PNG per word
    (`<word>@<position>`), in response order."""
    out = []
    for folder in sorted(p for p in root.glob("attention/*") if p.is_dir()):
        maps = sorted(folder.glob("*.png"), key=_position)
        if maps:
            out.append(
                {"image": folder.name.rsplit("-", 1)[0], "run": str(folder.relative_to(root)), "maps": maps}
            )
    return out


def proxies(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.glob("proxy_fit/*/proxy_fit.csv")):
        out.append({"name": path.stem, "table": pd.read_csv(path), **_source(root, path)})
    return out


def features(root: Path) -> dict[str, dict[str, Any]]:
    """Measured width and grid per encoder, from `task=features` summaries (cards may not declare them)."""
    return {d["encoder"]: d for _, d in _json_files(root, "features/*/summary.json") if "encoder" in d}


def stores(root: Path) -> list[dict[str, Any]]:
    """Complete extraction stores: encoder, benchmark, key, measured width, tokens and input size."""
    rows = []
    for path, d in _json_files(root, "stores/*/*/manifest.json"):
        if not d.get("complete") or "encoder" not in d:
            continue
        tokens = (d.get("shapes") or {}).get("tokens") or [None, None]
        rows.append(
            {
                "encoder": d["encoder"],
                "benchmark": path.parent.parent.name,
                "projected": bool((d.get("settings") or {}).get("projector")),
                "dim": tokens[-1],
                "tokens": tokens[0] if len(tokens) == 2 else None,
                "image_size": "x".join(map(str, d.get("image_size") or [])) or None,
                "resolution": d.get("resolution"),
                "items": d.get("num_items"),
                "key": d.get("key"),
                "run": str(path.parent.relative_to(root)),
            }
        )
    return rows


def gather(root: str | Path) -> dict[str, Any]:
    """Every result under `root` (an experiment's `paths.outputs`)."""
    root = Path(root)
    return {
        "law_tables": law_tables(root),
        "fits": law_fits(root),
        "policies": policies(root),
        "evals": evals(root),
        "correspondence": correspondence(root),
        "alignment": alignment(root),
        "perf": perf(root),
        "features": features(root),
        "stores": stores(root),
        "lmvr_tables": lmvr_tables(root),
        "probes": probes(root),
        "attention": attention_maps(root),
        "proxies": proxies(root),
    }
