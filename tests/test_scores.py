"""A score, C score (both protocols) and the AC law / policy, each against an independent computation."""

import functools
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures

from vrlab.data.loaders import Pair
from vrlab.encoders.factory import build_encoder
from vrlab.errors import ShapeError, VrlabError
from vrlab.extract import extract
from vrlab.scores.alignment import alignment, image_alignment
from vrlab.scores.correspondence import match, pck, protocol_settings, to_frame
from vrlab.scores.law import fit_law, read_table
from vrlab.scores.policy import (
    best_in_top_k,
    first_picks,
    recall_within_budget,
    recommend,
    region_order,
    simulate_policy,
    trainings_needed,
)


# --- A ------------------------------------------------------------------------------------------------
def brute_force_alignment(cand: torch.Tensor, ref: torch.Tensor) -> float:
    total = 0.0
    for i in range(cand.shape[0]):
        best = -2.0
        for j in range(ref.shape[0]):
            a, b = cand[i].double(), ref[j].double()
            best = max(best, float(a @ b / (a.norm() * b.norm())))
        total += best
    return total / cand.shape[0]


def test_alignment_equals_a_brute_force_loop():
    torch.manual_seed(0)
    cand, ref = torch.randn(3, 7, 16), torch.randn(3, 11, 16)  # different token counts are allowed
    got = image_alignment(cand, ref)
    expected = [brute_force_alignment(cand[b], ref[b]) for b in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_alignment_rejects_different_widths():
    with pytest.raises(ShapeError, match="width must match"):
        image_alignment(torch.randn(1, 4, 8), torch.randn(1, 4, 9))


def test_stores_a_score_self_is_one_and_averages_references(registry, data_root, tmp_path):
    from vrlab.data.benchmarks import load_benchmark

    items = load_benchmark("synth-folder-test", data_root).items[:5]
    bench = {"benchmark": {"name": "synth-folder-test"}}
    clip = extract(build_encoder(registry, "tiny/clip"), items, tmp_path / "clip", bench, num_workers=0)
    dino = extract(build_encoder(registry, "tiny/dinov2"), items, tmp_path / "dino", bench, num_workers=0)
    self_a = alignment(clip, {"clip": clip}, n_images=5)
    assert abs(self_a["A"] - 1.0) < 1e-6  # fp32: exactly one up to rounding
    bf16 = alignment(clip, {"clip": clip}, n_images=5, dtype="bfloat16")
    assert (
        bf16["A"] != self_a["A"] and abs(bf16["A"] - 1) <= 2**-7
    )  # within one bf16 step, as the paper's data
    two = alignment(dino, {"clip": clip, "self": dino}, n_images=3)
    direct = np.mean([brute_force_alignment(dino.tokens(i), clip.tokens(i)) for i in dino.ids[:3]])
    assert two["references"]["clip"]["n_images"] == 3
    assert abs(two["references"]["clip"]["A"] - direct) < 1e-5
    assert abs(two["A"] - (direct + 1.0) / 2) < 1e-5
    few = extract(build_encoder(registry, "tiny/clip"), items[:2], tmp_path / "few", bench, num_workers=0)
    with pytest.raises(VrlabError, match="lacks 3 of the candidate's images"):
        alignment(clip, {"few": few}, n_images=5)
    train = load_benchmark("synth-folder-train", data_root).items[:5]  # same ids, other images
    other = extract(
        build_encoder(registry, "tiny/clip"),
        train,
        tmp_path / "o",
        {"benchmark": {"name": "synth-folder-train"}},
        num_workers=0,
    )
    with pytest.raises(VrlabError, match="different benchmarks"):
        alignment(clip, {"other": other}, n_images=5)


# --- C: hand-worked window soft-argmax -------------------------------------------------------------
def unit_pair(s: float) -> list[float]:
    return [s, math.sqrt(1 - s * s)]


def hand_case(similarities: dict[tuple[int, int], float], default: float):
    """4x4 grids of 2-d unit vectors whose cosine with the query [1, 0] is the given similarity."""
    target = torch.tensor(
        [[unit_pair(similarities.get((r, c), default)) for c in range(4)] for r in range(4)]
    )
    source = torch.zeros(4, 4, 2)
    source[..., 0] = 1.0
    return source, target


def reference_window_soft_argmax(sim, window, beta, n=4, frame=840):
    """Plain-Python reading of law.md §3.1 steps 1-4."""
    best = max(sim, key=sim.get)
    masked = {
        k: (v if abs(k[0] - best[0]) <= window and abs(k[1] - best[1]) <= window else 0.0)
        for k, v in sim.items()
    }
    top = max(masked.values())
    weights = {k: math.exp((v - top) / beta) for k, v in masked.items()}
    z = sum(weights.values())
    lin = [-1 + 2 * i / (n - 1) for i in range(n)]
    ex = sum(w * lin[k[1]] for k, w in weights.items()) / z
    ey = sum(w * lin[k[0]] for k, w in weights.items()) / z
    cx, cy = (ex + 1) / 2 * (n - 1), (ey + 1) / 2 * (n - 1)
    return cx * (frame / n) + (frame / n) // 2, cy * (frame / n) + (frame / n) // 2


@pytest.mark.parametrize("top", [0.9, 0.02])  # with a small maximum, zeroed cells outside keep real weight
def test_window_soft_argmax_matches_a_hand_computation(top):
    sims = {(1, 1): top, (1, 2): top - 0.02, (3, 3): top + 0.0}  # (3, 3) ties but lies outside window 1
    sims[(3, 3)] = top - 0.01
    source, target = hand_case(sims, default=top / 2)
    full = {(r, c): sims.get((r, c), top / 2) for r in range(4) for c in range(4)}
    settings = protocol_settings("law", window=1)
    pred, best = match(source, target, torch.tensor([[100.0, 100.0]], dtype=torch.float64), 840, settings)
    ex, ey = reference_window_soft_argmax(full, 1, 0.02)
    np.testing.assert_allclose(pred[0].tolist(), [ex, ey], atol=1e-4)
    assert abs(best.item() - top) < 1e-6
    # Removing the outside cells instead of zeroing them would give another answer when the maximum is small.
    inside = {k: v for k, v in full.items() if abs(k[0] - 1) <= 1 and abs(k[1] - 1) <= 1}
    weights = {k: math.exp((v - top) / 0.02) for k, v in inside.items()}
    lin = [-1, -1 / 3, 1 / 3, 1]
    ex_removed = (
        sum(w * lin[k[1]] for k, w in weights.items()) / sum(weights.values()) + 1
    ) / 2 * 3 * 210 + 105
    assert (abs(ex_removed - ex) > 1) == (top < 0.1)


def test_law_frame_threshold_and_averaging_by_hand():
    """Two categories, three pairs; PCK computed by hand from the frame geometry."""
    settings = protocol_settings("law", matching="argmax", alphas=(0.1,))
    n, frame = 4, 840
    # Images 200x100 (w x h): law frame scale 4.2, vertical offset (840 - 420) // 2 = 210.
    pts = to_frame([[10, 10], [190, 90]], (200, 100), frame, law=True)
    np.testing.assert_allclose(pts.numpy(), [[42, 252], [798, 588]])
    # Features: one-hot of the cell index, so each source cell matches the same target cell.
    onehot = torch.eye(n * n).reshape(n * n, n * n)

    def features(item_id, flipped):
        return onehot

    def pair(pid, cat, src, trg, bbox):
        return Pair(pid, cat, "s", "t", src, trg, (0, 0, 200, 100), bbox, (200, 100), (200, 100))

    # Prediction of a point = centre of its cell: cell 210 px -> centre + 105.
    # p1: both points predicted exactly where they are (cell centre within threshold 0.1 * 840 = 84).
    p1 = pair("p1", "a", [[25, 25], [175, 75]], [[25, 25], [175, 75]], (0, 0, 200, 100))
    # p2: target kps shifted by 30 px in the original image = 126 px in the frame: beyond 84 -> 0 %.
    p2 = pair("p2", "a", [[25, 25], [175, 75]], [[55, 25], [205, 75]], (0, 0, 200, 100))
    # p3: one point right, one wrong -> 50 %; small bbox (20 px wide -> 84 px, threshold 8.4) makes both wrong.
    p3 = pair("p3", "b", [[25, 25], [175, 75]], [[25, 25], [205, 75]], (0, 0, 200, 100))
    result = pck([p1, p2, p3], features, (n, n), frame, settings)
    rows = {r["pair"]: r["pck@0.1"] for r in result["per_pair"]}
    # Check p1 by hand: source kp (25, 25) -> frame (105, 315): cell (1, 0) -> predicted (105, 315) = gt.
    assert rows == {"p1": 100.0, "p2": 0.0, "p3": 50.0}
    s = result["summary"]["pck@0.1"]
    assert s["per_image"] == pytest.approx(50.0)  # (100 + 0 + 50) / 3: categories weighted by pair count
    assert s["per_category"] == {"a": 50.0, "b": 50.0} and s["per_category_mean"] == pytest.approx(50.0)
    assert s["per_point"] == pytest.approx(100 * 3 / 6)
    small = pair("p4", "b", [[25, 25]], [[28, 25]], (0, 0, 20, 10))
    assert pck([small], features, (n, n), frame, settings)["per_pair"][0]["pck@0.1"] == 0.0  # 12.6 px > 8.4


# --- C: identity-like features on exact warps ----------------------------------------------------------
def positional_features(points_xy: torch.Tensor, anchors: torch.Tensor, width: float = 40.0) -> torch.Tensor:
    d2 = ((points_xy[:, None, :] - anchors[None]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * width**2))


@pytest.mark.parametrize("protocol", ["law", "standard"])
def test_identity_like_features_give_100_percent(data_root, protocol):
    """On the generated exact-warp pairs, features that encode the source position give PCK 100%."""
    from vrlab.data.benchmarks import load_benchmark

    bench = load_benchmark("synth-spair", data_root)
    ann = {}
    for path in (data_root / "synthetic/spair/PairAnnotation/test").glob("*.json"):
        rec = json.loads(path.read_text())
        ann[f"{rec['category']}/{rec['trg_imname'][:-4]}"] = np.array(rec["warp"])
    frame, n = 840, 96  # cells of 8.75 px: quantisation stays under the smallest threshold (~19 px)
    settings = protocol_settings(protocol, upsample=None, alphas=(0.1,), frame=frame)
    law = protocol == "law"
    w, h = bench.pairs[0].source_size
    # Sharply peaked codes (width 3 px): the law protocol's window soft-argmax averages over 11x11 cells, and
    # smooth features near a border would be pulled inward by the clipped window.
    anchors = torch.stack(
        torch.meshgrid(torch.linspace(0, w, 44), torch.linspace(0, h, 33), indexing="xy"), -1
    ).reshape(-1, 2)
    centres = (torch.arange(n) + 0.5) * frame / n
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    frame_xy = torch.stack([cx, cy], -1).reshape(-1, 2).double()
    scale = frame / max(w, h)
    offset = torch.tensor(
        [0.0, (frame - h * scale) // 2 if law else (frame - round(h * scale)) // 2], dtype=torch.float64
    )
    image_xy = (frame_xy - offset) / scale  # cell centres in original pixels

    @functools.cache
    def features(item_id, flipped):
        if item_id in ann:  # a target: position in the source = inverse warp
            inv = np.linalg.inv(ann[item_id])
            src_xy = torch.from_numpy((inv @ np.c_[image_xy.numpy(), np.ones(len(image_xy))].T).T[:, :2])
        else:
            src_xy = image_xy
        return positional_features(src_xy.float(), anchors, width=3.0)

    result = pck(bench.pairs, features, (n, n), frame, settings)
    assert result["summary"]["pck@0.1"]["per_image"] == 100.0


def test_standard_equals_law_where_the_protocols_coincide_and_differs_elsewhere():
    torch.manual_seed(0)
    feats = {k: torch.randn(16, 8) for k in ("s", "t")}
    pairs = [
        Pair(
            f"p{i}",
            "c",
            "s",
            "t",
            torch.rand(5, 2).mul(torch.tensor([128, 96])).tolist(),
            torch.rand(5, 2).mul(torch.tensor([128, 96])).tolist(),
            (0, 0, 128, 96),
            (10, 5, 100, 90),
            (128, 96),
            (128, 96),
        )
        for i in range(6)
    ]
    law = pck(pairs, lambda i, f: feats[i], (4, 4), 840, protocol_settings("law"))
    same = protocol_settings("standard", matching="window_soft_argmax", frame=840, half_cell_floor=True)
    standard_as_law = pck(pairs, lambda i, f: feats[i], (4, 4), 840, same)
    assert [r["pck@0.1"] for r in law["per_pair"]] == [r["pck@0.1"] for r in standard_as_law["per_pair"]]
    dist_law = [p["distance"] for p in law["per_point"]]
    standard = pck(pairs, lambda i, f: feats[i], (4, 4), 840, protocol_settings("standard", frame=840))
    assert dist_law != [p["distance"] for p in standard["per_point"]]  # argmax vs window soft-argmax
    with pytest.raises(VrlabError, match="no flip test"):
        protocol_settings("law", flip=True)


def test_correspondence_task_records_its_protocol(compose_cfg, tiny_root, data_root):
    from vrlab.cli import run_task

    base = [
        "task=correspondence",
        "encoder=tiny/clip.tiny/dinov2",
        "benchmark=synth-spair",
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        "extract.num_workers=0",
    ]
    law = run_task(compose_cfg(*base, "correspondence=law"))
    std = run_task(
        compose_cfg(*base, "correspondence=standard", "correspondence.flip=true", "correspondence.upsample=8")
    )
    assert (
        law["settings"]["protocol"] == "law"
        and law["settings"]["input_resize"] == "squash"
        and law["frame"] == 840
    )
    assert law["encoder_settings"]["transform"]["members"][0]["resize"] == "squash"
    assert law["encoder_settings"]["transform"]["members"][0]["mean"] == [0.5, 0.5, 0.5]
    assert std["settings"]["flip"] is True and std["settings"]["upsample"] == 8 and std["frame"] == 32
    assert std["encoder_settings"]["transform"]["members"][0]["resize"] == "letterbox"
    assert law["n_pairs"] == std["n_pairs"] == 12 and 0 <= law["C"] <= 100
    saved = json.loads(Path(law["output"]).read_text())
    assert saved["summary"]["pck@0.1"]["per_image"] == law["C"] and len(saved["per_point"]) > 0


# --- the AC law ------------------------------------------------------------------------------------
COEF = {"1": 0.1, "A": 0.5, "C": 0.3, "A^2": -0.2, "A C": 0.4, "C^2": -0.1}


def synthetic_table(n=13, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    a, c = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    a[0], a[1], c[2], c[3] = 0.0, 1.0, 0.0, 1.0  # min-max keeps them as they are
    y = (
        COEF["1"]
        + COEF["A"] * a
        + COEF["C"] * c
        + COEF["A^2"] * a**2
        + COEF["A C"] * a * c
        + COEF["C^2"] * c**2
    )
    y = y + rng.normal(0, noise, n)
    return pd.DataFrame({"representation": [f"r{i}" for i in range(n)], "A": a, "C": c, "bench": y}), y


def test_fit_recovers_known_coefficients():
    table, y = synthetic_table()
    fit = fit_law(table)["benchmarks"]["bench"]
    lo, span = y.min(), y.max() - y.min()  # the score is min-max normalised too
    expected = {k: (v - lo) / span if k == "1" else v / span for k, v in COEF.items()}
    assert fit["coefficients"] == pytest.approx(expected, abs=1e-9)
    assert fit["r2"]["AC"] == pytest.approx(1.0) and fit["loo_r2"]["AC"] == pytest.approx(1.0)


def test_leave_one_out_matches_sklearn_cross_val_predict():
    table, _ = synthetic_table(noise=0.05, seed=1)
    fit = fit_law(table)["benchmarks"]["bench"]
    x = np.c_[fit["a"], fit["c"]]
    model = make_pipeline(PolynomialFeatures(2, include_bias=False), LinearRegression())
    expected = cross_val_predict(model, x, np.array(fit["measured"]), cv=LeaveOneOut())
    np.testing.assert_allclose(fit["loo_predicted"], expected, atol=1e-9)
    assert fit["loo_r2"]["AC"] < fit["r2"]["AC"]


def test_per_benchmark_a_columns_and_summary_subset():
    table, y = synthetic_table(noise=0.02, seed=2)
    table = table.rename(columns={"A": "A_bench"}).assign(A_other=table["A"][::-1].to_numpy(), other=y[::-1])
    result = fit_law(table, summary_benchmarks=["bench"])
    assert result["summary"]["over"] == ["bench"] and result["mean"]["over"] == ["bench", "other"]
    assert result["summary"]["r2"]["AC"] == pytest.approx(result["benchmarks"]["bench"]["r2"]["AC"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop(columns=["C"]), "lacks column 'C'"),
        (lambda t: t.drop(columns=["A"]), "has neither 'A_bench' nor 'A'"),
        (lambda t: t.iloc[:6], "6 candidates .* at least 7"),
        (lambda t: t.assign(C=0.5), "column 'C' is constant"),
    ],
)
def test_malformed_tables_give_clear_errors(tmp_path, change, message):
    table, _ = synthetic_table()
    path = tmp_path / "t.csv"
    change(table).to_csv(path, index=False)
    with pytest.raises(VrlabError, match=message):
        fit_law(read_table(path))


def test_region_sampling_visits_each_quadrant_first():
    a = np.array([0.1, 0.2, 0.9, 0.8, 0.1, 0.9, 0.15])
    c = np.array([0.1, 0.2, 0.1, 0.2, 0.9, 0.9, 0.15])
    order = region_order(a, c, np.random.default_rng(0))
    quadrant = lambda i: (a[i] >= 0.5, c[i] >= 0.5)  # noqa: E731
    assert sorted(order) == list(range(7)) and len({quadrant(i) for i in order[:4]}) == 4


def test_policy_finds_the_best_and_beats_random_on_a_clean_law():
    table, y = synthetic_table(n=15, seed=3)
    result = simulate_policy(table["A"].to_numpy(), table["C"].to_numpy(), y, k=3, trials=60, seed=0)
    assert result["mean_AC"] < result["mean_random"]
    assert result["success_curve"]["AC"][-1] == 1.0
    best = int(np.argmax(y))
    assert trainings_needed([best], table["A"].to_numpy(), table["C"].to_numpy(), y, k=1) == 1


def _hit_by_hand(subset, a, c, y, k):
    """Fit sklearn's degree-2 pipeline on `subset`, rank all candidates, is the best in the top k?"""
    if len(subset) == 1:
        return subset[0] == int(np.argmax(y))
    x = np.c_[a, c]
    model = make_pipeline(PolynomialFeatures(2), LinearRegression()).fit(x[list(subset)], y[list(subset)])
    return int(np.argmax(y)) in np.argsort(-model.predict(x), kind="stable")[:k]


@pytest.mark.parametrize("budget", [1, 2, 3, 4])
def test_recall_within_budget_equals_an_exact_enumeration(budget):
    # One candidate per level-1 quadrant: the first `budget` trainings are a uniform random subset of that size.
    a = np.array([0.0, 1.0, 0.1, 0.8])
    c = np.array([0.1, 0.0, 1.0, 0.9])
    y = np.array([3.0, 1.0, 2.0, 5.0])
    subsets = list(itertools.combinations(range(4), budget))
    expected = np.mean([_hit_by_hand(s, a, c, y, 1) for s in subsets])
    result = recall_within_budget(a, c, y, k=1, budget=budget, normalise=False)
    assert result["AC"] == pytest.approx(expected, abs=1e-12) and result["random"] == budget / 4
    assert result["subsets"] == len(subsets)
    if budget in (2, 3):
        assert 0 < expected < 1  # the case is not trivial


def test_recall_within_budget_matches_region_sampling_runs():
    table, y = synthetic_table(n=11, noise=0.5, seed=5)
    a, c = (table[col].to_numpy() for col in ("A", "C"))
    an, cn, yn = (np.asarray((v - v.min()) / (v.max() - v.min())) for v in (a, c, y))
    picks = first_picks(an, cn, 4)
    assert sum(picks.values()) == 1  # exact fractions
    exact = recall_within_budget(a, c, y, k=3, budget=4)["AC"]
    rng = np.random.default_rng(0)
    runs = [best_in_top_k(region_order(an, cn, rng)[:4], an, cn, yn, 3) for _ in range(1500)]
    assert abs(np.mean(runs) - exact) < 4 * math.sqrt(exact * (1 - exact) / len(runs)) + 1e-9
    assert 0 < exact < 1
    with pytest.raises(VrlabError, match="law.budget=12"):
        recall_within_budget(a, c, y, budget=12)


def test_recommender_ranks_untrained_candidates_by_prediction():
    table, y = synthetic_table(n=14, seed=4)
    table.loc[[2, 5, 9], "bench"] = np.nan
    ranked = recommend(table, "bench", n_bootstrap=100, seed=0)
    assert list(ranked["representation"]) == [f"r{i}" for i in sorted([2, 5, 9], key=lambda i: -y[i])]
    np.testing.assert_allclose(ranked["predicted"], sorted(y[[2, 5, 9]], reverse=True), atol=1e-8)
    assert (ranked["low"] <= ranked["predicted"] + 1e-9).all() and (
        ranked["high"] >= ranked["predicted"] - 1e-9
    ).all()
    with pytest.raises(VrlabError, match="nothing to recommend"):
        recommend(synthetic_table()[0], "bench")


def test_alignment_and_law_tasks_end_to_end(compose_cfg, tiny_root, data_root, tmp_path):
    """A and C results -> law_table -> law_fit / law_policy / law_recommend, through the real config."""
    from vrlab.cli import run_task

    common = [
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        "extract.num_workers=0",
    ]
    refs = "alignment.references=[{name: small, encoder: tiny/clip}, {name: large, encoder: tiny/clip, encoder_args: {image_size: 48}}]"
    a = run_task(
        compose_cfg(
            "task=alignment",
            "encoder=tiny/dinov2",
            "alignment.benchmarks=[synth-folder-test]",
            "alignment.n_images=6",
            refs,
            *common,
            f"paths.outputs={tmp_path / 'a_out'}",
        )
    )
    assert set(a["results"]["synth-folder-test"]["references"]) == {"small", "large"}
    assert 0 < a["A"]["synth-folder-test"] < 1
    # A table with A and C from files, scores from a CSV, then the fit on it.
    out = tmp_path / "outputs"
    rng = np.random.default_rng(0)
    for i in range(9):
        for kind, value in (
            ("alignment", {"A": {"bench": float(rng.uniform())}}),
            ("correspondence", {"C": float(rng.uniform(0, 50)), "settings": {"protocol": "law"}}),
        ):
            folder = out / kind / f"r{i}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{kind}.json").write_text(json.dumps({"representation": f"r{i}", **value}))
    (tmp_path / "scores.csv").write_text(
        "representation,bench\n" + "\n".join(f"r{i},{rng.uniform(30, 60)}" for i in range(8))
    )
    table = run_task(
        compose_cfg("task=law_table", f"law.scores={tmp_path / 'scores.csv'}", "law.protocol=law")
    )
    assert table["rows"] == 9 and table["columns"] == [
        "representation",
        "C",
        "A_bench",
        "bench",
        "tuned_tower",
    ]
    fit = run_task(compose_cfg("task=law_fit"))
    folder = Path(fit["output"]).parent
    assert {p.name for p in folder.iterdir()} >= {
        "law_fit.json",
        "law_fit.md",
        "predicted_vs_measured.png",
        "ac_plane.png",
    }
    assert fit["benchmarks"]["bench"]["n"] == 8  # r8 has no score: left out of the fit
    policy = run_task(compose_cfg("task=law_policy", "law.trials=20"))
    assert len(policy["results"]["bench"]["trainings_AC"]) == 20 and Path(policy["output"]).exists()
    recall = policy["recall_within_budget"]
    assert recall["budget"] == 4 and recall["random"] == pytest.approx(4 / 8)
    assert recall["AC"] == policy["results"]["bench"]["recall_within_budget"]["AC"]
    ranked = run_task(compose_cfg("task=law_recommend", "law.bootstrap=50"))
    assert [r["representation"] for r in ranked["bench"]] == ["r8"]


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_law_plots_and_surface_work_at_any_degree(degree, tmp_path):
    import json

    from vrlab.report import law_surface, plot_fit

    table, _ = synthetic_table(n=14, noise=0.05, seed=3)
    result = fit_law(table, degree=degree)
    fit = result["benchmarks"]["bench"]
    assert len(fit["coefficients"]) == {1: 3, 2: 6, 3: 10}[degree]
    # the surface evaluated at the candidates is the fit's own in-sample prediction, also after a JSON trip
    # (which sorts the coefficient keys)
    coefs = json.loads(json.dumps(fit["coefficients"], sort_keys=True))
    surface = law_surface(coefs, np.array(fit["a"]), np.array(fit["c"]))
    np.testing.assert_allclose(surface, fit["predicted"], atol=1e-9)
    paths = plot_fit(result, table, tmp_path)
    assert [p.name for p in paths] == ["predicted_vs_measured.png", "ac_plane.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
