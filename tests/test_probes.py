"""LMVR probes: metrics and the linear probe against scikit-learn, hidden-state aggregation against a direct
computation, before/after consistency, attention maps, and the probe task with domain shift and corruptions."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from vrlab.data.images import decode_image
from vrlab.probes.linear import LinearProbe, average_precision, fit_and_evaluate, metrics, voc07_ap
from vrlab.probes.lmvr import hidden_states, lmvr_batch, pool, prompt_batch


# --- metrics and the probe ---------------------------------------------------------------------------------
def test_map_equals_sklearn_average_precision_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 6)).round(1)  # rounding makes many ties
    targets = (rng.random((300, 6)) < 0.25).astype(int)
    targets[:, 5] = 0  # a class without positives is left out of the mean
    ours = average_precision(torch.tensor(scores), torch.tensor(targets)).numpy()
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(5)]
    np.testing.assert_allclose(ours[:5], expected, atol=1e-12)
    assert np.isnan(ours[5])
    m = metrics(torch.tensor(scores), torch.tensor(targets), multilabel=True)
    assert m["mAP"] == pytest.approx(100 * np.mean(expected)) and m["classes_with_positives"] == 5


def test_voc07_eleven_point_ap_by_hand():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    targets = torch.tensor([[1], [0], [1], [0]])
    # precision/recall after each: (1, .5), (.5, .5), (.667, 1), (.5, 1): max precision at recall >= t is
    # 1 for t <= .5 (6 points) and .667 for t > .5 (5 points).
    assert voc07_ap(scores, targets)[0].item() == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_accuracy_matches_sklearn_logistic_regression_at_matched_regularisation():
    x, y = make_classification(
        n_samples=800, n_features=30, n_informative=8, n_classes=5, n_clusters_per_class=1, random_state=1
    )
    train, test = slice(0, 500), slice(500, None)
    wd = 1e-2
    probe = LinearProbe(False, weight_decays=[wd], max_iter=500)
    probe.fit(torch.tensor(x[train]), torch.tensor(y[train]))
    ours = probe.evaluate(torch.tensor(x[test]), torch.tensor(y[test]))["accuracy"]
    mean, std = x[train].mean(0), x[train].std(0, ddof=1)
    # Our loss is mean cross-entropy + wd/2 |W|^2; scikit-learn's is C * sum cross-entropy + 1/2 |W|^2.
    sk = LogisticRegression(C=1 / (wd * 500), max_iter=10000).fit((x[train] - mean) / std, y[train])
    assert abs(ours - 100 * sk.score((x[test] - mean) / std, y[test])) <= 0.5


def test_linearly_separable_data_gives_100_percent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10))
    x = x[np.abs(x[:, :4]).min(1) > 0.25][:240]  # a margin around every multi-label boundary
    w = rng.normal(size=(10, 3))
    scores = x @ w
    top2 = np.sort(scores, 1)[:, -2:]
    x = x[top2[:, 1] - top2[:, 0] > 0.2]  # and around the single-label one
    x = x[: 160 + 60]
    y = (x @ w).argmax(1)
    single = fit_and_evaluate(
        torch.tensor(x[:160]),
        y[:160].tolist(),
        {"test": (torch.tensor(x[160:]), y[160:].tolist())},
        3,
        False,
        weight_decays=[1e-6],
        max_iter=500,
    )
    assert single["train"]["accuracy"] == 100.0  # a linear probe fits separable data exactly
    assert single["test"]["test"]["accuracy"] >= 95.0
    multi_labels = [[int(c) for c in np.where(row > 0)[0]] for row in x[:, :4]]  # sign of 4 coordinates
    multi = fit_and_evaluate(
        torch.tensor(x[:160]),
        multi_labels[:160],
        {"train": (torch.tensor(x[:160]), multi_labels[:160])},
        4,
        True,
        weight_decays=[1e-6],
        max_iter=500,
    )
    assert multi["train"]["mAP"] == pytest.approx(100.0) and multi["test"]["train"]["mAP"] == pytest.approx(
        100.0
    )


def test_weight_decay_is_chosen_on_the_validation_split_and_is_seeded():
    x, y = make_classification(n_samples=300, n_features=50, n_informative=5, n_classes=3, random_state=0)
    a = LinearProbe(False, seed=3).fit(torch.tensor(x), torch.tensor(y))
    b = LinearProbe(False, seed=3).fit(torch.tensor(x), torch.tensor(y))
    assert a.weight_decay == b.weight_decay and a.validation == b.validation
    assert a.validation[str(a.weight_decay)] == max(a.validation.values())


# --- hidden-state aggregation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(tiny_root, tmp_path_factory):
    from vrlab.demo.tiny_llm import build_llm
    from vrlab.mllm.model import VisionLanguageModel

    folder = build_llm(tmp_path_factory.mktemp("lmvr") / "llm")
    torch.manual_seed(0)
    return VisionLanguageModel.build(
        "tiny/clip",
        str(folder),
        {"type": "mlp2x_gelu"},
        registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
    ).eval()


def test_aggregation_equals_a_direct_computation(vlm, photo_files):

    images = [decode_image(p) for p in photo_files[:2]]
    res = lmvr_batch(
        vlm,
        images,
        "Describe the image.",
        [-1, 1],
        ["all", "image", "prompt", "generated", "last"],
        ["mean", "max"],
        ["before", "after"],
        max_new_tokens=6,
    )
    names = res["names"]
    assert res["llm"].shape == (2, len(names), vlm.llm.config.hidden_size) and len(names) == 2 * 2 * (5 + 4)
    # Rebuild the sequences: the prompt (left padded) then the generated tokens.
    batch = prompt_batch(vlm, images, "Describe the image.")
    with torch.no_grad():
        new = vlm.generate(
            **{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=6, do_sample=False
        )
    eos = vlm.tokenizer.eos_token_id
    keep = torch.ones_like(new, dtype=torch.bool)
    for b in range(len(new)):
        hits = (new[b] == eos).nonzero()
        if len(hits):
            keep[b, hits[0, 0] + 1 :] = False
    full = torch.cat([batch["input_ids"], new.masked_fill(~keep, vlm.tokenizer.pad_token_id)], 1)
    att = torch.cat([batch["attention_mask"], keep.long()], 1)
    with torch.no_grad():
        states = hidden_states(vlm, full, att, batch)
    plen = batch["input_ids"].shape[1]
    for b in range(2):
        valid = att[b].bool().nonzero().flatten().tolist()
        image = [t for t in valid if full[b, t] == vlm.image_token_id]
        sets = {
            "all": valid,
            "image": image,
            "prompt": [t for t in valid if t < plen and t not in image],
            "generated": [t for t in valid if t >= plen],
            "last": [valid[-1]],
        }
        for layer in (-1, 1):
            for name, pos in sets.items():
                h = states[layer][b, pos].float()
                for pooling, value in (("mean", h.mean(0)), ("max", h.max(0).values)):
                    row = names.index(f"after/{name}/{pooling}/layer{layer}")
                    torch.testing.assert_close(res["llm"][b, row], value, atol=1e-5, rtol=1e-5)
    # Baselines: mean-pooled encoder patch tokens and adapter outputs from the same run.
    with torch.no_grad():
        enc = vlm.encoder(batch["pixel_values"])
        torch.testing.assert_close(res["encoder"][:, 0], enc.tokens.mean(1))
        torch.testing.assert_close(res["encoder"][:, 1], enc.pooled)
        torch.testing.assert_close(res["adapter"][:, 0], vlm.encode_images(batch["pixel_values"]).mean(1))


def test_before_equals_the_first_rows_of_after(vlm, photo_files):
    batch = prompt_batch(vlm, [decode_image(p) for p in photo_files[:3]], "What is it?")
    extra = torch.randint(5, 50, (3, 4))
    full = torch.cat([batch["input_ids"], extra], 1)
    att = torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1)
    with torch.no_grad():
        before = hidden_states(vlm, batch["input_ids"], batch["attention_mask"], batch)
        after = hidden_states(vlm, full, att, batch)
    plen = batch["input_ids"].shape[1]
    valid = batch["attention_mask"].bool()
    for layer in range(len(before)):
        torch.testing.assert_close(after[layer][:, :plen][valid], before[layer][valid], atol=1e-5, rtol=1e-5)


def test_pool_ignores_masked_positions():
    h = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [100.0, 100.0]]])
    m = torch.tensor([[True, True, False]])
    assert pool(h, m, "mean").tolist() == [[2.0, 2.0]] and pool(h, m, "max").tolist() == [[3.0, 5.0]]
    assert pool(h, torch.zeros_like(m), "max").tolist() == [[0.0, 0.0]]


# --- attention maps ----------------------------------------------------------------------------------------
def test_attention_maps_shapes_rows_and_png(vlm, photo_files, tmp_path):
    from vrlab.probes.attention import overlay, word_attention

    image = decode_image(photo_files[0])
    res = word_attention(vlm, image, "What is in the image?", layer=-1, max_new_tokens=6)
    attn = res["attention"]
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[0]))  # each query's weights sum to one
    assert torch.all(attn.triu(1) == 0)  # causal
    assert res["maps"] and all(m.shape == vlm.encoder.grid for m in res["maps"].values())
    for key, m in res["maps"].items():  # the image share of a word's attention, laid out on the grid
        word_row = int(key.split("@")[1])
        assert m.sum().item() <= 1 + 1e-5 and word_row >= 0
    path = overlay(image, next(iter(res["maps"].values())), tmp_path / "map.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the probe task end to end -----------------------------------------------------------------------------
@pytest.mark.slow
def test_probe_task_components_domain_shift_and_robustness(compose_cfg, vlm, data_root, tiny_root, tmp_path):
    from vrlab.cli import run_task

    ckpt = vlm.save_pretrained(tmp_path / "model")
    common = [
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        f"checkpoint={ckpt}",
        "lmvr.max_new_tokens=4",
        "lmvr.layers=[-1]",
        "probe.weight_decays=[1.0e-2,1.0]",
    ]
    results = {
        f: run_task(compose_cfg("task=probe", f"probe.features={f}", *common))
        for f in ("encoder", "adapter", "llm")
    }
    assert {r["row"] for r in results.values()} == {"encoder/mean", "adapter/mean", "after/all/mean/layer-1"}
    assert all(0 <= r["test"]["synth-voc-test"]["mAP"] <= 100 for r in results.values())
    shift = run_task(
        compose_cfg(
            "task=probe",
            "probe.features=encoder",
            "probe.train=synth-visda-train",
            "probe.test=[synth-visda-validation]",
            *common,
        )
    )
    assert "accuracy" in shift["test"]["synth-visda-validation"]
    robust = run_task(
        compose_cfg(
            "task=probe",
            "probe.features=encoder",
            "probe.train=synth-folder-train",
            "probe.test=[synth-folder-test,synth-imagenet-c]",
            *common,
        )
    )
    assert len([k for k in robust["test"] if k.startswith("synth-imagenet-c/")]) == 75
    assert set(robust["robustness"]["per_category"]) == {"noise", "blur", "weather", "digital"}
    table = run_task(compose_cfg("task=probe_table", *common))
    assert table["rows"] == 5


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_lmvr_stores_of_one_process(
    vlm, data_root, tiny_root, tmp_path, torchrun
):
    """Each rank generates for its slice of shards; rank 0 completes the three stores and the responses."""
    from vrlab.store import EmbeddingStore

    ckpt = vlm.save_pretrained(tmp_path / "model")
    args = [
        "task=lmvr_features",
        f"checkpoint={ckpt}",
        "benchmark=synth-folder-test",
        f"paths.data={data_root}",
        "lmvr.max_new_tokens=3",
        "lmvr.layers=[-1]",
        "lmvr.batch_size=2",
        "lmvr.shard_size=4",
    ]
    vrlab = Path(sys.executable).parent / "vrlab"
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launch in (
        ("one", [str(vrlab)]),
        (
            "two",
            torchrun,
        ),
    ):
        proc = subprocess.run(
            [*launch, *args, f"paths.outputs={tmp_path / name}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (runs[name],) = (tmp_path / name / "lmvr").glob("*/*")
    for kind in ("llm", "encoder", "adapter"):
        a, b = EmbeddingStore(runs["one"] / kind), EmbeddingStore(runs["two"] / kind)
        assert a.ids == b.ids and len(a) == 12 and b.manifest["num_shards"] == 3
        assert torch.allclose(a.load(), b.load(), atol=1e-5) and a.manifest["rows"] == b.manifest["rows"]
    responses = EmbeddingStore(runs["two"] / "llm").manifest["responses"]
    assert responses == EmbeddingStore(runs["one"] / "llm").manifest["responses"] and len(responses) == 12


# --- the tables --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lmvr_tables_in_the_papers_layout_with_reference_columns_for_real_cards(
    compose_cfg, vlm, data_root, tiny_root, tmp_path
):
    import json

    from vrlab.cli import run_task
    from vrlab.errors import VrlabError
    from vrlab.tasks.lmvr_tables import CORRUPTIONS

    ckpt = vlm.save_pretrained(tmp_path / "model")
    # the real COCO cards read the generated COCO files, so Table 2's COCO column counts as real data
    data = tmp_path / "data"
    data.mkdir()
    (data / "coco").symlink_to(data_root / "synthetic" / "coco")
    (data / "synthetic").symlink_to(data_root / "synthetic")
    synth = {
        "voc07": ("synth-voc-trainval", "[synth-voc-test]"),
        "visda": ("synth-visda-train", "[synth-visda-validation,synth-visda-test]"),
        "imagenet": ("synth-imagenet-train", "[synth-imagenet-val,synth-imagenet-c]"),
        "deepfashion": ("synth-deepfashion-train", "[synth-deepfashion-test]"),
    }
    common = [
        f"paths.data={data}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        f"checkpoint={ckpt}",
        f"lmvr_table.blip2={ckpt}",
        "lmvr.max_new_tokens=4",
        "lmvr.layers=[-1,-2]",
        "probe.weight_decays=[1.0e-2,1.0]",
        *[f"lmvr_table.data.{k}.train={tr}" for k, (tr, _) in synth.items()],
        *[f"lmvr_table.data.{k}.test={te}" for k, (_, te) in synth.items()],
    ]
    res = run_task(compose_cfg("task=lmvr_table", *common))
    assert set(res["tables"]) == set(range(1, 9)) and not res["skipped"]
    t1 = res["tables"][1]["rows"]
    assert not res["tables"][1]["real_data"] and not any(k.startswith("paper") for k in t1[0])
    assert "not the released code's recipe" in res["tables"][1]["recipes"][0]
    # every cell is the probe run it names
    for r in t1:
        probe = json.loads((Path(r["runs"]) / "probe.json").read_text())
        assert probe["test"]["synth-voc-test"]["mAP"] == pytest.approx(r["VOC07 mAP"])
    t2 = res["tables"][2]["rows"]  # COCO from the real cards: the paper's numbers beside it, VOC without
    assert [r["paper: COCO mAP"] for r in t2] == [79.5, 78.5, 84.0] and "paper: VOC07 mAP" not in t2[0]
    assert len(t2[0]["runs"].split("; ")) == 2  # one probe per data set
    t7 = res["tables"][7]["rows"]
    assert [r["paper: COCO mAP"] for r in t7] == [82.3, None, 84.5]
    t4 = res["tables"][4]["rows"]
    assert [r["row"] for r in t4] == ["vision encoder alone", "w/ adaptor", "LMVR"]
    assert t4[0]["mean"] == pytest.approx(np.mean([t4[0][c] for c in CORRUPTIONS]))
    t5 = res["tables"][5]["rows"][2]
    assert t5["noise"] == pytest.approx(np.mean([t4[2][c] for c in CORRUPTIONS[:3]]))
    t6 = res["tables"][6]["rows"]
    assert all(0 <= t6[0][g] <= 100 for g in ("Object", "Fabric", "Texture"))
    assert t6[2]["Object"] is None and t6[2]["runs"].startswith("not run: lmvr_table.finetuned is not set")
    out = tmp_path / "outputs" / "lmvr_tables"
    assert (out / "table8.csv").read_text().splitlines()[0].startswith("row,validation acc")
    assert "paper: COCO mAP" in (out / "table2.md").read_text()
    # one table rebuilt: the others stay in tables.json beside it (the report reads that index)
    again = run_task(compose_cfg("task=lmvr_table", "lmvr_table.table=1", *common))
    assert set(again["tables"]) == {1}
    assert len(json.loads((out / "tables.json").read_text())["tables"]) == 8
    # a data set without its second test card leaves those columns empty, never filled from the first
    short = run_task(
        compose_cfg(
            "task=lmvr_table",
            "lmvr_table.table=3",
            *common,
            "lmvr_table.data.visda.test=[synth-visda-validation]",
        )
    )
    r = short["tables"][3]["rows"][0]
    assert r["validation acc"] is not None and r["test acc"] is None and r["test mean-class acc"] is None
    with pytest.raises(VrlabError, match=r"lmvr_table.blip2 is not set"):
        run_task(compose_cfg("task=lmvr_table", "lmvr_table.table=7", *common, "lmvr_table.blip2=null"))
