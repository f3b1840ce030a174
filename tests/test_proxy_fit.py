"""The proxy leaderboard: the AC pair reproduces the AC law's leave-one-out R², every number against an
independent computation, the layer sweep, and the tasks end to end on the tiny encoders."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vrlab.errors import VrlabError
from vrlab.scores.law import fit_law
from vrlab.scores.proxy_fit import fit_proxies, ranking_frame


@pytest.fixture
def table():
    rng = np.random.default_rng(3)
    n = 14
    a, c = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    noise = rng.normal(0, 0.05, (2, n))
    return pd.DataFrame(
        {
            "representation": [f"enc{i}" for i in range(n)],
            "C": c * 40,
            "A_vqa": a,
            "A_mc": a + rng.normal(0, 0.02, n),
            "vqa": 0.2 + 0.5 * a + 0.3 * c * a + noise[0],
            "mc": 0.1 + 0.6 * c**2 + noise[1],
            "lay_z@1": rng.normal(size=n),  # a layer that knows nothing
            "lay_z@2": c + rng.normal(0, 0.1, n),  # a layer that tracks C
        }
    )


def test_the_ac_pair_is_the_ac_law(table):
    law = fit_law(table[["representation", "C", "A_vqa", "A_mc", "vqa", "mc"]])
    fit = fit_proxies(table, ["A", "C"], ["vqa", "mc"], bootstrap=50)
    for b in ("vqa", "mc"):
        assert fit["results"]["A+C"]["benchmarks"][b]["loo_r2"] == pytest.approx(
            law["benchmarks"][b]["loo_r2"]["AC"], abs=1e-12
        )
        assert fit["results"]["A"]["benchmarks"][b]["loo_r2"] == pytest.approx(
            law["benchmarks"][b]["loo_r2"]["A"], abs=1e-12
        )
        assert fit["results"]["C"]["benchmarks"][b]["loo_r2"] == pytest.approx(
            law["benchmarks"][b]["loo_r2"]["C"], abs=1e-12
        )
    assert fit["results"]["A+C"]["mean_loo_r2"] == pytest.approx(law["mean"]["loo_r2"]["AC"], abs=1e-12)


def test_spearman_intervals_and_ranking_by_hand(table):
    fit = fit_proxies(table, ["A", "C", "lay_z@1", "lay_z@2"], ["vqa", "mc"], bootstrap=200, seed=1)
    for r in fit["results"].values():
        for b, v in r["benchmarks"].items():
            ranks = pd.DataFrame({"p": v["loo_predicted"], "y": v["measured"]}).corr(method="spearman")
            assert v["spearman"] == pytest.approx(ranks.loc["p", "y"], abs=1e-12)
            low, high = v["loo_r2_interval"]
            assert low <= high and b in ("vqa", "mc")
        assert r["mean_loo_r2"] == pytest.approx(np.mean([v["loo_r2"] for v in r["benchmarks"].values()]))
    scores = [fit["results"][k]["mean_loo_r2"] for k in fit["ranking"]]
    assert scores == sorted(scores, reverse=True)
    frame = ranking_frame(fit)
    # four proxies, one pair: a layer sweep's columns are judged one by one, not paired
    assert list(frame["proxy"]) == fit["ranking"] and len(frame) == 4 + 1
    # the layer sweep: the layer tracking C predicts mc (a function of C) better than the noise layer
    assert fit["layers"]["lay_z"]["best"] == "2"
    assert (
        fit["results"]["lay_z@2"]["benchmarks"]["mc"]["loo_r2"]
        > fit["results"]["lay_z@1"]["benchmarks"]["mc"]["loo_r2"]
    )
    # seeded: the same intervals again
    again = fit_proxies(table, ["A", "C", "lay_z@1", "lay_z@2"], ["vqa", "mc"], bootstrap=200, seed=1)
    assert again["results"]["A+C"]["mean_loo_r2_interval"] == fit["results"]["A+C"]["mean_loo_r2_interval"]


def test_bad_proxies_are_named(table):
    with pytest.raises(VrlabError, match="proxy 'rsa' is not a column"):
        fit_proxies(table, ["rsa"], ["vqa"])
    # five representations fit one proxy (3 parameters) but not the pair (6): the pair is left out, and said
    five = fit_proxies(table.head(5), ["A", "C"], ["vqa"], bootstrap=10)
    assert set(five["ranking"]) == {"A", "C"} and "needs at least 7" in five["skipped"]["A+C"]
    with pytest.raises(VrlabError, match="no proxy could be judged.*needs at least 4"):
        fit_proxies(table.head(3), ["A", "C"], ["vqa"], bootstrap=10)


@pytest.mark.slow
def test_proxies_and_proxy_fit_tasks(compose_cfg, tiny_root, data_root, tmp_path, table):
    from vrlab.cli import run_task
    from vrlab.demo.tiny_llm import build_llm, default_corpus

    llm = build_llm(tmp_path / "llm", corpus=default_corpus())
    common = [f"paths.data={data_root}", f"registry.encoder_dirs=[{tiny_root / 'cards'}]"]
    records = []
    for enc in ("tiny/siglip", "tiny/dinov2"):
        records.append(
            run_task(
                compose_cfg(
                    "task=proxies",
                    f"encoder={enc}",
                    "proxy.references=[tiny/clip]",
                    f"proxy.llm={llm}",
                    "proxy.permutations=8",
                    "proxy.k=3",
                    "proxy.probe_train=synth-folder-train",
                    "proxy.probe_test=synth-folder-test",
                    f"proxy.label=enc{len(records)}",
                    *common,
                )
            )
        )
    rec = records[0]
    for name in ("cka", "unbiased_cka", "mutual_knn", "cknna", "svcca"):
        assert {name, f"{name}_z", f"{name}_llm", f"{name}_llm_z"} <= set(rec["proxies"])
    assert rec["n_images"] > 4 and Path(rec["output"]).exists()
    assert 0 <= rec["proxies"]["probe"] <= 100  # linear-probe accuracy, a proxy too
    # a layer sweep: every hidden layer's proxies, and the plain columns equal the run without layers
    layered = run_task(
        compose_cfg(
            "task=proxies",
            "encoder=tiny/siglip",
            "proxy.references=[tiny/clip]",
            "proxy.permutations=8",
            "proxy.k=3",
            "proxy.label=enc0",
            "proxy.probe_train=synth-folder-train",
            "proxy.probe_test=synth-folder-test",
            "extract.layers=[1,2]",
            *common,
        )
    )
    assert {"cka@1", "cka_z@2", "probe@1", "probe@2"} <= set(layered["proxies"])
    for key in ("cka", "unbiased_cka_z", "probe"):
        assert layered["proxies"][key] == pytest.approx(rec["proxies"][key], rel=1e-9)
    # the proxies join the law table by representation; proxy_fit ranks them and writes the leaderboard
    law_csv = tmp_path / "table.csv"
    table.to_csv(law_csv, index=False)
    out = run_task(
        compose_cfg(
            "task=proxy_fit",
            f"proxy.table={law_csv}",
            "proxy.proxies=[A,C]",
            "proxy.layers=[lay_z]",
            "proxy.benchmarks=[vqa,mc]",
            "proxy.bootstrap=50",
            f"paths.outputs={tmp_path / 'outputs'}",
            *common,
        )
    )
    assert "A+C" in out["ranking"] and out["layers"]["lay_z"]["best"] == "2"
    saved = json.loads(Path(out["output"]).read_text())
    assert saved["ranking"] == out["ranking"]
    assert Path(out["output"]).with_suffix(".png").stat().st_size > 0
    assert pd.read_csv(out["csv"])["proxy"].tolist() == out["ranking"]
    plain_csv = tmp_path / "plain.csv"  # the law table alone: law_fit reads every column as A, C or a score
    table[["representation", "C", "A_vqa", "A_mc", "vqa", "mc"]].to_csv(plain_csv, index=False)
    law = run_task(compose_cfg("task=law_fit", f"law.table={plain_csv}", *common))
    assert out["results"]["A+C"]["mean_loo_r2"] == pytest.approx(law["mean"]["loo_r2"]["AC"], abs=1e-12)


def test_a_constant_proxy_is_left_out_not_fatal(table):
    flat = table.assign(probe=100.0)  # a probe that saturates predicts nothing
    fit = fit_proxies(flat, ["A", "C", "probe"], ["vqa"], bootstrap=20)
    assert "probe" in fit["skipped"] and "constant" in fit["skipped"]["probe"]
    assert "A+C" in fit["ranking"] and "A+probe" not in fit["ranking"]
    # each candidate's intervals are its own: leaving another proxy out changes none of them
    alone = fit_proxies(flat, ["A", "C"], ["vqa"], bootstrap=20)
    assert alone["results"]["A"]["mean_loo_r2_interval"] == fit["results"]["A"]["mean_loo_r2_interval"]
