"""The experiment report: one self-contained HTML file (figures as inline SVG, the script and style inline, no
network) rendered from `reports.gather` with the Jinja2 template shipped beside this module.

The page is byte-stable for the same results, apart from its one `generated` line; a rerun after new
results re-reads the folder and adds them.
"""

from __future__ import annotations

import base64
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vrlab.reports import figures
from vrlab.reports.gather import gather

TEMPLATES = Path(__file__).parent / "templates"


def _num(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else v
    return v


PATH_COLUMNS = {"run", "sha256", "source", "file", "checkpoint digest", "run folders", "store key"}


def _table(
    columns: list[str], rows: list[list[Any]], filterable: bool = True, name_col: int = 0
) -> dict[str, Any]:
    """A table for the template; `kinds` styles each column (numbers right-aligned, paths and digests small)."""
    rows = [[_num(v) for v in r] for r in rows]
    kinds = [
        "path"
        if c in PATH_COLUMNS
        else "num"
        if any(isinstance(r[k], int | float) for r in rows)
        and all(isinstance(r[k], int | float) or r[k] is None for r in rows)
        else ""
        for k, c in enumerate(columns)
    ]
    # the filter box matches the encoder column (`name_col`) of filterable tables
    return {"columns": columns, "rows": rows, "kinds": kinds, "filterable": filterable, "name_col": name_col}


def _encoders(results: dict[str, Any], registry: Any) -> dict[str, Any]:
    names: list[str] = []
    for t in results["law_tables"]:
        names += list(t["table"]["representation"])
    names += [r["representation"] for r in results["evals"] + results["correspondence"]]
    names += [r["encoder"] for r in results["perf"]]
    perf = {r["encoder"]: r for r in results["perf"]}
    stored = {r["encoder"]: r for r in results["stores"] if not r["projected"]}
    rows = []
    for name in dict.fromkeys(n for n in names if n):
        family = source = resolution = "?"
        dim = tokens = None
        try:
            cards = registry.resolve(name) if registry is not None else []
            family = " + ".join(c.family for c in cards)
            source = " + ".join(c.source for c in cards)
            dims = [c.dim for c in cards]
            dim = sum(dims) if all(dims) else None
            grid = cards[0].grid
            tokens = grid[0] * grid[1] if grid else None
            resolution = cards[0].spec.get("resolution", "fixed")
        except Exception:  # a result from a card no longer registered keeps its row, without card facts
            pass
        p = perf.get(name, {})
        store = stored.get(name, {})
        if store.get("dim"):  # measured by an extraction, whatever the card declares
            dim, tokens, resolution = (
                store["dim"],
                store["tokens"] or tokens,
                store["resolution"] or resolution,
            )
        size = store.get("image_size") or "?"
        rows.append(
            [
                name,
                family,
                source,
                p.get("params_m"),
                dim,
                p.get("tokens") or tokens,
                size,
                p.get("resolution") or resolution,
                p.get("end_to_end_img_s"),
            ]
        )
    cols = [
        "encoder",
        "family",
        "source",
        "params (M)",
        "dim",
        "tokens/image",
        "input (px)",
        "resolution",
        "images/s",
    ]
    return _table(cols, rows)


def _law(results: dict[str, Any], tips: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"tables": [], "fits": [], "figures": []}
    for t in results["law_tables"]:
        table = t["table"]
        out["tables"].append(
            {
                "name": t["name"],
                "file": t["file"],
                "sha256": t["sha256"],
                **_table(
                    list(table.columns), table.astype(object).where(table.notna(), None).values.tolist()
                ),
            }
        )
    primary = next((t["table"] for t in results["law_tables"] if t["name"] == "table"), None)
    for k, f in enumerate(results["fits"]):
        names = f["fit"]["representations"]
        rows = []
        for b, fb in f["fit"]["benchmarks"].items():
            coef = ", ".join(f"{term} {v:+.2f}" for term, v in fb["coefficients"].items())
            rows.append(
                [
                    b,
                    fb["n"],
                    fb["r2"].get("A"),
                    fb["r2"].get("C"),
                    fb["r2"].get("AC"),
                    fb["loo_r2"].get("AC"),
                    (fb.get("loo_spearman") or {}).get("AC"),
                    coef,
                ]
            )
            fitted = fb.get("representations") or names  # fits written before the list was kept
            if len(fitted) != len(fb["measured"]):
                continue
            svg, t = figures.predicted_vs_measured(fb, fitted, f"pvm{k}-{b}")
            tips.update(t)
            out["figures"].append({"title": f"{f['name']}: {b}", "svg": svg})
        cols = ["benchmark", "n", "R² A", "R² C", "R² AC", "LOO R² AC", "LOO Spearman AC", "coefficients"]
        out["fits"].append(
            {"name": f["name"], "file": f["file"], "sha256": f["sha256"], **_table(cols, rows, False)}
        )
    if primary is not None:
        for b in [c for c in primary.columns if f"A_{c}" in primary.columns]:
            rows = [
                {"name": r["representation"], "A": r[f"A_{b}"], "C": r["C"], "score": _num(r[b])}
                for _, r in primary.iterrows()
                if r[f"A_{b}"] == r[f"A_{b}"] and r["C"] == r["C"]
            ]
            label = "A: alignment on the benchmark's images (cosine to the references, unitless)"
            svg, t = figures.ac_plane(rows, b, f"ac-{b}", label)
            tips.update(t)
            out["figures"].append({"title": f"(A, C) plane: {b}", "svg": svg})
    return out


def _policy(results: dict[str, Any]) -> dict[str, Any]:
    from vrlab.scores.law import benchmarks_of
    from vrlab.scores.policy import recommend

    rows = []
    for p in results["policies"]:
        for b, v in p["policy"].get("benchmarks", {}).items():
            r = v.get("recall_within_budget", {})
            rows.append([p["name"], b, r.get("k"), r.get("budget"), r.get("AC"), r.get("random")])
    recs = []
    primary = next((t["table"] for t in results["law_tables"] if t["name"] == "table"), None)
    if primary is not None:
        for b in benchmarks_of(primary):
            if primary[b].isna().any() and primary[b].notna().sum() >= 6:
                for i, r in recommend(primary, b).iterrows():
                    recs.append(
                        [b, i + 1, r["representation"], r["predicted"], f"[{r['low']:.2f}, {r['high']:.2f}]"]
                    )
    return {
        "simulation": _table(
            ["policy run", "benchmark", "k", "budget", "recall AC", "recall random"], rows, False
        ),
        "recommend": _table(["benchmark", "rank", "encoder", "predicted", "90% interval"], recs, name_col=2),
    }


def _lmvr(results: dict[str, Any], outputs: Path) -> list[dict[str, Any]]:
    def short(runs: str) -> str:  # run folders relative to the outputs folder, as every other table has them
        return "; ".join(
            str(Path(r).relative_to(outputs)) if Path(r).is_relative_to(outputs) else r
            for r in runs.split("; ")
        )

    out = []
    for t in results["lmvr_tables"]:
        cols = [c for c in t["columns"] if c != "runs"]
        rows = [[r.get(c) for c in cols] + [short(r.get("runs", ""))] for r in t["rows"]]
        out.append(
            {"title": t["title"], "recipes": t["recipes"], **_table([*cols, "run folders"], rows, False)}
        )
    return out


def build_report(outputs: str | Path, name: str, registry: Any = None, command: str = "") -> str:
    """The HTML text of the report of everything under `outputs`."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from vrlab.runtime import library_versions

    results = gather(outputs)
    tips: dict[str, str] = {}
    versions = library_versions()
    lmms = sorted({r["lmms_eval"] for r in results["evals"] if r["lmms_eval"]})
    if lmms:
        versions["lmms-eval"] = ", ".join(lmms)
    context = {
        "name": name,
        "outputs": str(outputs),
        "command": command,
        "versions": versions,
        "encoders": _encoders(results, registry),
        "evals": _table(
            [
                "encoder",
                "benchmark",
                "score",
                "metric",
                "samples",
                "lmms-eval",
                "checkpoint digest",
                "run",
                "sha256",
            ],
            [
                [
                    r[k]
                    for k in (
                        "representation",
                        "benchmark",
                        "score",
                        "metric",
                        "samples",
                        "lmms_eval",
                        "checkpoint_digest",
                        "run",
                        "sha256",
                    )
                ]
                for r in results["evals"]
            ],
        ),
        "correspondence": _table(
            ["encoder", "benchmark", "protocol", "frame", "C (PCK %)", "pairs", "run", "sha256"],
            [
                [
                    r[k]
                    for k in (
                        "representation",
                        "benchmark",
                        "protocol",
                        "frame",
                        "C",
                        "pairs",
                        "run",
                        "sha256",
                    )
                ]
                for r in results["correspondence"]
            ],
        ),
        "alignment": _table(
            ["encoder", "benchmark", "protocol", "A", "run", "sha256"],
            [
                [r[k] for k in ("representation", "benchmark", "protocol", "A", "run", "sha256")]
                for r in results["alignment"]
            ],
        ),
        "stores": _table(
            ["encoder", "benchmark", "adapter-projected", "dim", "tokens", "items", "store key", "run"],
            [
                [r[k] for k in ("encoder", "benchmark", "projected", "dim", "tokens", "items", "key", "run")]
                for r in results["stores"]
            ],
        ),
        "law": _law(results, tips),
        "policy": _policy(results),
        "lmvr": _lmvr(results, Path(outputs).resolve()),
        "probes": _table(
            ["features", "row", "train", "test", "value", "metric", "run", "sha256"],
            [
                [r[k] for k in ("features", "row", "train", "test", "value", "metric", "run", "sha256")]
                for r in results["probes"]
            ],
        ),
        "attention": [
            {
                "image": a["image"],
                "run": a["run"],
                "maps": [
                    {
                        "word": m.stem.rsplit("@", 1)[0],
                        "src": "data:image/png;base64," + base64.b64encode(m.read_bytes()).decode(),
                    }
                    for m in a["maps"]
                ],
            }
            for a in results["attention"]
        ],
        "perf": {
            "svg": figures.perf_bars(results["perf"]) if results["perf"] else "",
            **_table(
                ["encoder", "params (M)", "tokens/image", "bare img/s", "end-to-end img/s", "device", "file"],
                [
                    [
                        r[k]
                        for k in (
                            "encoder",
                            "params_m",
                            "tokens",
                            "bare_img_s",
                            "end_to_end_img_s",
                            "device",
                            "file",
                        )
                    ]
                    for r in results["perf"]
                ],
            ),
        },
        "proxies": [
            {
                "name": p["name"],
                "file": p["file"],
                **_table(list(p["table"].columns), p["table"].values.tolist()),
            }
            for p in results["proxies"]
        ],
        "commands": {
            "eval": sorted({r["command"] for r in results["evals"]}),
            "C": sorted({r["command"] for r in results["correspondence"]}),
            "A": sorted({r["command"] for r in results["alignment"]}),
        },
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    context["tips"] = json.dumps(tips, sort_keys=True).replace("<", "\\u003c")  # inert inside <script>
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["cell"] = _cell
    env.globals["script"] = (TEMPLATES / "report.js").read_text()
    env.globals["style"] = (TEMPLATES / "report.css").read_text()
    return env.get_template("report.html.j2").render(**context)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
