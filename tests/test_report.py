"""The experiment report: gathered from an outputs folder of real task results, byte-stable apart from its
timestamp line, a rerun adds new results, and the page works in a real browser (Debian's Chromium)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import check_report_in_browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"


@pytest.fixture
def law_outputs(compose_cfg, tmp_path):
    """A and C results on disk, the law table built from them (one candidate without a score), the fit and the
    policy: what an experiment's outputs folder holds after its law tasks."""
    from vrlab.cli import run_task

    out = tmp_path / "outputs"
    rng = np.random.default_rng(0)
    for i in range(9):
        for kind, value in (
            ("alignment", {"A": {"bench": float(rng.uniform()), "other": float(rng.uniform())}, "protocol": "reference_cosine"}),
            ("correspondence", {"C": float(rng.uniform(0, 50)), "settings": {"protocol": "law"}, "benchmark": "spair"}),
        ):  # fmt: skip
            folder = out / kind / f"enc{i}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{kind}.json").write_text(json.dumps({"representation": f"enc{i}", **value}))
    scores = "\n".join(f"enc{i},{rng.uniform(30, 60)},{rng.uniform(10, 40)}" for i in range(8))
    (tmp_path / "scores.csv").write_text("representation,bench,other\n" + scores)
    run_task(compose_cfg("task=law_table", f"law.scores={tmp_path / 'scores.csv'}", "law.protocol=law"))
    run_task(compose_cfg("task=law_fit"))
    run_task(compose_cfg("task=law_policy", "law.trials=50"))
    return out


def _report(compose_cfg, *extra):
    from vrlab.cli import run_task

    return Path(run_task(compose_cfg("task=report", "report.name=study", *extra))["report"])


def test_report_is_self_contained_stable_and_grows_with_new_results(compose_cfg, law_outputs):
    page = _report(compose_cfg)
    assert page == law_outputs / "reports" / "study" / "index.html"
    html = page.read_text()
    # self-contained: no address outside the page, figures inline
    import re

    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?https?:|@import""", html)
    assert html.count("<svg") == 4  # predicted-vs-measured and the (A, C) plane, for each of two benchmarks
    assert "enc8" in html and "What to train next" in html and "90% interval" in html  # enc8 has no score
    first = page.read_text()
    again = _report(compose_cfg).read_text()

    def strip(text):
        return [line for line in text.splitlines() if "Generated " not in line]

    assert strip(first) == strip(again)  # byte-stable apart from the timestamp line
    # a new result appears on the next build
    folder = law_outputs / "correspondence" / "enc9"
    folder.mkdir()
    (folder / "correspondence.json").write_text(
        json.dumps(
            {"representation": "enc9", "C": 12.5, "settings": {"protocol": "standard"}, "benchmark": "spair"}
        )
    )
    assert "enc9" not in first and "enc9" in _report(compose_cfg).read_text()


def test_report_works_in_a_real_browser(compose_cfg, law_outputs):
    page = _report(compose_cfg)
    seen = check_report_in_browser(page, SCREENSHOTS / "report-law.png")
    assert not [m for m in seen["console"] if m[0] == "error"], seen["console"]
    assert seen["requests"] == [page.resolve().as_uri()]  # the file itself and nothing else
    assert len(seen["figures"]) == 4 and all(w > 100 and h > 100 for w, h in seen["figures"])
    assert seen["sorted"] == sorted(seen["sorted"]) and seen["sorted_desc"] == sorted(
        seen["sorted"], reverse=True
    )
    assert seen["filtered"] and all(seen["filter_name"] in n for n in seen["filtered"])
    text, visible, expected = seen["tip"]  # hovering a point shows its own label
    assert visible and text == expected and text.startswith("enc") and " A " in text and " C " in text
    assert (SCREENSHOTS / "report-law.png").stat().st_size > 10_000
