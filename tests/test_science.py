"""`make science`'s parts: the verdict against known laws and independent computations, the data and text it
trains on, pre-training that resumes, and the whole study at tiny budgets (workers, tables, page, rerun)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures

from vrlab.errors import VrlabError
from vrlab.scores.law import fit_benchmark
from vrlab.scores.verdict import judge


def _table(rng, n=12, noise=0.01, law=lambda a, c: 0.2 + 0.5 * a * c + 0.2 * c):
    a, c = rng.uniform(0, 1, n), rng.uniform(0, 5, n)
    return pd.DataFrame(
        {
            "representation": [f"enc{i:02d}" for i in range(n)],
            "A": a,
            "C": c,
            "law": law(a, c / 5) + rng.normal(0, noise, n),
            "noise": rng.uniform(0.2, 0.8, n),
            "flat": 0.5 + rng.normal(0, 0.01, n),
        }
    )


def test_loo_spearman_and_r2_match_scikit_learn():
    rng = np.random.default_rng(0)
    t = _table(rng, noise=0.1)
    fit = fit_benchmark(t, "law")
    x, y = t[["A", "C"]].to_numpy(), t["law"].to_numpy()
    # raw inputs: the degree-2 space is unchanged by min-max scaling, so leave-one-out predictions match
    pred = cross_val_predict(make_pipeline(PolynomialFeatures(2), LinearRegression()), x, y, cv=LeaveOneOut())
    assert fit.loo_spearman["AC"] == pytest.approx(spearmanr(pred, y).statistic)
    assert fit.loo_r2["AC"] == pytest.approx(r2_score(y, pred))
    pred_a = cross_val_predict(
        make_pipeline(PolynomialFeatures(2), LinearRegression()), x[:, :1], y, cv=LeaveOneOut()
    )
    assert fit.loo_spearman["A"] == pytest.approx(spearmanr(pred_a, y).statistic)


def test_the_verdict_finds_a_known_law_and_refuses_noise():
    rng = np.random.default_rng(1)
    first = _table(rng)
    tables = {0: first}
    for seed in (1, 2):  # other MLLM seeds: the same encoders, other noise on the scores
        t = first.copy()
        t["law"] = 0.2 + 0.5 * t["A"] * t["C"] / 5 + 0.2 * t["C"] / 5 + rng.normal(0, 0.01, len(t))
        t["noise"] = rng.uniform(0.2, 0.8, len(t))
        tables[seed] = t
    v = judge(tables, ["law", "noise", "flat"], 0, min_span=0.2)
    law, noise, flat = (v["benchmarks"][b] for b in ("law", "noise", "flat"))
    assert law["judged"] and all(law["targets_met"].values()) and law["best_loo_r2"] == "AC"
    assert law["default_seed"]["AC"]["loo_r2"] > law["default_seed"]["A"]["loo_r2"]
    assert noise["judged"] and not noise["targets_met"]["loo_r2"]
    assert not flat["judged"] and flat["targets_met"] is None and "not judged" in flat["verdict"]
    assert v["judged"] == ["law", "noise"] and not v["all_targets_met"]
    # the spread: one fit per seed, one per encoder left out of the table
    assert law["spread"]["seeds"]["AC"]["loo_r2"]["n"] == 3
    assert set(law["drop_one"]) == set(first["representation"])
    held = first[first["representation"] != "enc03"].reset_index(drop=True)
    assert law["drop_one"]["enc03"]["AC"]["loo_r2"] == pytest.approx(fit_benchmark(held, "law").loo_r2["AC"])
    moved = {
        n: abs(d["AC"]["loo_r2"] - law["default_seed"]["AC"]["loo_r2"]) for n, d in law["drop_one"].items()
    }
    assert law["most_influential"]["encoder"] == max(moved, key=moved.get)


def test_a_constant_benchmark_is_reported_not_fitted():
    t = _table(np.random.default_rng(2))
    t["chance"] = 0.25
    v = judge({0: t}, ["law", "chance"], 0)
    assert v["benchmarks"]["chance"]["judged"] is False and "constant" in v["benchmarks"]["chance"]["unfit"]
    with pytest.raises(VrlabError, match="default seed 3"):
        judge({0: t}, ["law"], 3)


def test_qa_conversations_answer_what_the_caption_shows(data_root):
    """Every one-word answer of `qa.json` agrees with the same image's caption (written from the scene)."""
    from vrlab.data.scenes import COLOURS, SHAPES

    llava = data_root / "synthetic" / "llava"
    caption = {
        s["image"]: s["conversations"][1]["value"] for s in json.loads((llava / "captions.json").read_text())
    }
    qa = json.loads((llava / "qa.json").read_text())
    assert len(qa) == len(caption)
    kinds = set()
    for s in qa:
        turns = s["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and all(
            "<image>" not in t["value"] for t in turns[1:]
        )
        text = caption[s["image"]].lower()
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            question, answer = q["value"].removeprefix("<image>\n"), a["value"]
            if question.startswith("What colour is the"):
                shape = question.split()[4].rstrip("?")
                assert answer in COLOURS and f"{answer} {shape}" in text
                kinds.add("colour")
            elif question.startswith("What shape is the"):
                colour = question.split()[4]
                assert answer in SHAPES and f"{colour} {answer}" in text
                kinds.add("shape")
            elif question == "Describe the image.":  # the caption comes last, after every answer
                assert answer.lower() == text and (q, a) == (turns[-2], turns[-1])
            elif question.startswith("How many"):
                assert (
                    answer == ["zero", "one", "two", "three"][text.count(" a ")]
                )  # "of a ..., a ... and a ..."
                kinds.add("count")
            else:
                assert answer in ("left", "right")
                kinds.add("position")
    assert kinds == {"colour", "shape", "count", "position"}


def test_the_llm_reads_answers_from_a_caption_prefix(data_root):
    from vrlab.demo.tiny_llm import reading_texts

    llava = data_root / "synthetic" / "llava"
    texts = reading_texts(llava)
    first = json.loads((llava / "captions.json").read_text())[0]["conversations"][1]["value"]
    assert len(texts) == len(json.loads((llava / "qa.json").read_text()))
    assert first in texts[0] and "<image>" not in texts[0]
    assert texts[0].index(first) < texts[0].index("Answer with one word.")


def test_pretraining_skips_a_finished_run_and_not_changed_images(compose_cfg, data_root, tmp_path):
    import os
    import shutil

    from vrlab.cli import run_task

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    args = ["task=pretrain_encoder", "pretrain.kind=denoise", "pretrain.steps=3", "pretrain.image_size=32"]
    first = run_task(compose_cfg(*args, f"paths.data={data}"))
    weights = next((tmp_path / "outputs").rglob("model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    again = run_task(compose_cfg(*args, f"paths.data={data}"))
    assert again["output"] == first["output"] and weights.stat().st_mtime_ns == stamp
    image = next((data / "synthetic" / "captions" / "images").glob("*.png"))
    os.utime(image, ns=(stamp + 10**9, stamp + 10**9))  # "regenerated": another encoder, in another folder
    changed = run_task(compose_cfg(*args, f"paths.data={data}"))
    assert changed["output"] != first["output"]


@pytest.mark.slow
def test_science_runs_in_workers_writes_its_page_and_resumes(compose_cfg, tmp_path):
    from vrlab.cli import run_task

    root = tmp_path / "science"
    docs = tmp_path / "docs" / "science.md"
    cfg = compose_cfg(
        "experiment=science",
        f"science.root={root}",
        "paths.outputs=${science.root}/runs/seed${seed}",
        f"science.docs={docs}",
        "science.encoders=[random-0,clip-4,clip-8,supervised-4,ssl-4,denoise-4]",
        "science.seeds=[0,1]",
        "science.workers=2",
        "science.llm_steps=5",
        "science.reader={kind: clip, steps: 4, seed: 7, stage2_epochs: 1}",
        "make_benchmark.sizes={llava: 24, captions: 24, folder_per_class: 4, lmms_per_kind: 12,"
        " semantic_pairs_per_category: 2}",
        "train.stage1.num_train_epochs=1",
        "train.stage2.num_train_epochs=1",
        "alignment.n_images=8",
    )
    result = run_task(cfg)
    names = [
        "science/random-0",
        "science/clip-4",
        "science/clip-8",
        "science/supervised-4",
        "science/ssl-4",
        "science/denoise-4",
    ]
    for seed in (0, 1):
        table = pd.read_csv(root / "runs" / f"seed{seed}" / "law" / "table.csv")
        assert sorted(table["representation"]) == sorted(names)
        for b in ("synth_colour", "synth_shape", "synth_count", "synth_position"):
            assert table[b].between(0, 1).all() and table[f"A_{b}"].notna().all()
    # the candidates start from the reader's LLM, which its own stage 2 trained
    reader_llm = root / "runs" / "reader" / "stage2" / "model" / "llm"
    vlm = json.loads(
        (root / "runs" / "seed0" / "stage2" / "science" / "clip-4" / "model" / "vlm_config.json").read_text()
    )
    assert reader_llm.is_dir() and str(reader_llm) in json.dumps(vlm)
    # C is computed once, from the shared encoders; A against the two highest clip rungs
    assert len(list((root / "runs" / "shared" / "correspondence").glob("*/correspondence.json"))) == len(
        names
    )
    assert result["references"] == ["science/clip-4", "science/clip-8"]
    page = docs.read_text()
    assert (
        all(n in page for n in names) and "## Verdict" in page and (docs.parent / "science_loo.png").is_file()
    )
    saved = json.loads((root / "science.json").read_text())
    assert set(saved["verdict"]["benchmarks"]) == {
        "synth_colour",
        "synth_shape",
        "synth_count",
        "synth_position",
    }
    assert math.isclose(saved["minutes"], result["minutes"])
    # a rerun trains nothing again: every model folder keeps its files
    models = sorted((root / "runs").rglob("model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in models]
    again = run_task(cfg)
    assert [p.stat().st_mtime_ns for p in models] == stamps
    assert again["encoders"] == result["encoders"]
    # the page keeps the cost of the run that started from nothing
    assert result["full_minutes"] == result["minutes"] and again["full_minutes"] == result["minutes"]


def test_a_bad_recipe_is_named_before_any_work(compose_cfg, tmp_path):
    from vrlab.cli import run_task
    from vrlab.tasks.science import encoder_names, reference_names

    assert encoder_names(["random-0", "clip-25"]) == [
        ("science/random-0", "random", 0),
        ("science/clip-25", "clip", 25),
    ]
    with pytest.raises(VrlabError, match="'clip-many' is not <kind>-<steps>"):
        encoder_names(["clip-many"])
    with pytest.raises(VrlabError, match="'vae-10' is not"):
        encoder_names(["vae-10"])
    with pytest.raises(VrlabError, match="references=2 needs that many clip rungs"):
        reference_names(encoder_names(["random-0", "clip-25"]), 2)
    with pytest.raises(VrlabError, match="must be one of science.seeds"):
        run_task(compose_cfg("experiment=science", f"science.root={tmp_path}", "seed=5"))
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_benchmark_of_another_generator_version_is_written_again(tmp_path):
    from vrlab.data.synthetic import GENERATOR_VERSION, make_benchmark

    sizes = {
        "voc_per_split": 2,
        "folder_per_class": 1,
        "visda_per_class": 1,
        "llava": 2,
        "imagenet_c_per_class": 0,
        "captions": 2,
        "lmms": 2,
        "lmms_per_kind": 2,
        "spair_pairs_per_category": 1,
        "semantic_pairs_per_category": 1,
    }
    root = tmp_path / "synthetic"
    make_benchmark(root, sizes=sizes)
    info = root / "benchmark.json"
    stamp = info.stat().st_mtime_ns
    make_benchmark(root, sizes=sizes)  # same generator, seed and sizes: kept
    assert info.stat().st_mtime_ns == stamp
    old = json.loads(info.read_text())
    info.write_text(json.dumps({**old, "generator": GENERATOR_VERSION - 1}))
    make_benchmark(root, sizes=sizes)
    assert (
        json.loads(info.read_text())["generator"] == GENERATOR_VERSION
        and (root / "llava" / "qa.json").is_file()
    )
