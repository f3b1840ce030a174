"""Evaluation with lmms-eval: the vrlab model class on the local tasks in-process and through lmms-eval's own
CLI, batching, multiple choice on a hand-worked case, resume, the offline dataset check, `lmms:<task>`
images in both orders, and the law table built from eval results."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vrlab.data.questions import write_lmms_tasks
from vrlab.demo.tiny_llm import build_llm, default_corpus
from vrlab.errors import VrlabError
from vrlab.eval.run import evaluate, local_tasks_dir
from vrlab.mllm.model import VisionLanguageModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_root):
    """A tiny stage-2-format model: tiny CLIP, an MLP adapter, a tiny Llama; saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("vlm")
    build_llm(folder / "llm_src", corpus=default_corpus())
    torch.manual_seed(0)
    model = VisionLanguageModel.build(
        "tiny/clip",
        str(folder / "llm_src"),
        {"type": "mlp2x_gelu"},
        registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
    )
    return model.save_pretrained(folder / "model")


@pytest.fixture(scope="module")
def lmms_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmmsdata")
    write_lmms_tasks(root / "synthetic" / "lmms", np.random.default_rng(0), 8, (96, 128), kind_count=6)
    return root


@pytest.fixture
def env(lmms_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VRLAB_DATA", str(lmms_data))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return lmms_data


def model_of(checkpoint, batch_size=1):
    from vrlab.eval.model import VrlabLMM

    return VrlabLMM(pretrained=str(checkpoint), batch_size=batch_size, device="cpu")


def scores(summary):
    return {name: r["score"] for rec in summary["tasks"].values() for name, r in rec["results"].items()}


def test_in_process_and_cli_give_the_same_scores(checkpoint, env, tmp_path):
    summary = evaluate(lambda: model_of(checkpoint, 4), ["synth_vqa", "synth_mc"], tmp_path / "run", limit=6)
    assert summary["tasks"]["synth_mc"]["results"]["synth_mc"]["n_samples"] == 6
    samples = (tmp_path / "run" / "tasks" / "synth_vqa" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 and "prompt" in json.loads(samples[0])
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "vrlab",
            "--model_args",
            f"pretrained={checkpoint}",
            "--tasks",
            "synth_vqa,synth_mc",
            "--include_path",
            str(local_tasks_dir()),
            "--limit",
            "6",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    cli = json.loads(results.read_text())["results"]
    assert cli["synth_vqa"]["exact_match,none"] == scores(summary)["synth_vqa"]
    assert cli["synth_mc"]["acc,none"] == scores(summary)["synth_mc"]


class Req:
    def __init__(self, *args):
        self.args = args


def requests_for(model, task, kind, n):
    """lmms-eval's own task objects and request arguments for the first `n` documents."""
    from lmms_eval.tasks import get_task_dict

    from vrlab.eval.run import task_manager

    obj = get_task_dict([task], task_manager([task]))[task]
    model.task_dict = {task: obj.dataset}
    docs = obj.eval_docs
    out = []
    for i in range(n):
        ctx = obj.doc_to_text(docs[i])
        if kind == "generate":
            out.append(Req(ctx, {"max_new_tokens": 6, "until": ["\n"]}, obj.doc_to_visual, i, task, "test"))
        else:
            out += [Req(ctx, f" {c}", obj.doc_to_visual, i, task, "test") for c in obj.doc_to_choice(docs[i])]
    return out


def test_batched_equals_per_sample(checkpoint, env):
    single, batched = model_of(checkpoint, 1), model_of(checkpoint, 5)
    gen = requests_for(single, "synth_vqa", "generate", 7)
    batched.task_dict = single.task_dict
    assert batched.generate_until(gen) == single.generate_until(gen)
    ll = requests_for(single, "synth_mc", "ll", 3)
    batched.task_dict = single.task_dict
    a = [r.text[0] for r in single.loglikelihood(ll)]
    b = [r.text[0] for r in batched.loglikelihood(ll)]
    assert np.allclose(a, b, atol=1e-4) and len(a) == len(ll)


def test_multiple_choice_picks_the_most_likely_answer_hand_worked(checkpoint, tmp_path, monkeypatch):
    """With the LLM's final norm zeroed every next-token distribution is uniform over the vocabulary, so an
    answer of n tokens (its words and the end of turn) has log-likelihood -n log V: the shortest choice wins."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    model = VisionLanguageModel.from_pretrained(checkpoint)
    model.llm.model.norm.weight.data.zero_()
    tok = model.tokenizer
    vocab = model.llm.get_output_embeddings().weight.shape[0]
    n_tokens = {
        c: len(tok(f" {c}{tok.eos_token}", add_special_tokens=False).input_ids)
        for c in ("red", "red red red")
    }
    assert n_tokens["red"] < n_tokens["red red red"]
    rows = [
        {
            "question_id": "a",
            "question": "Which?",
            "answer": "red",
            "kind": "colour",
            "choices": ["red", "red red red"],
            "label": 0,
        },
        {
            "question_id": "b",
            "question": "Which?",
            "answer": "red",
            "kind": "colour",
            "choices": ["red red red", "red"],
            "label": 1,
        },
        {
            "question_id": "c",
            "question": "Which?",
            "answer": "red red red",
            "kind": "colour",
            "choices": ["red", "red red red"],
            "label": 1,
        },
    ]
    image = PILImage.new("RGB", (32, 32), (200, 30, 30))
    for r in rows:
        r["image"] = image
    feats = Features(
        {
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "kind": Value("string"),
            "choices": Sequence(Value("string")),
            "label": Value("int64"),
            "image": Image(),
        }
    )
    (tmp_path / "synthetic" / "lmms").mkdir(parents=True)
    Dataset.from_list(rows, features=feats).to_parquet(
        str(tmp_path / "synthetic" / "lmms" / "synth_mc.parquet")
    )
    monkeypatch.setenv("VRLAB_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from vrlab.eval.model import VrlabLMM

    lm = VrlabLMM(model=model, batch_size=2, device="cpu")
    summary = evaluate(lambda: lm, ["synth_mc"], tmp_path / "run")
    assert scores(summary)["synth_mc"] == pytest.approx(2 / 3)  # the third doc's answer is the longer one
    lines = [json.loads(x) for x in (tmp_path / "run/tasks/synth_mc/samples.jsonl").read_text().splitlines()]
    for line in lines:
        nll = [r[0] for r in line["response"]]
        want = [n_tokens[c] * math.log(vocab) for c in line["doc"]["choices"]]
        assert np.allclose(nll, want, rtol=1e-5)


def test_resume_after_a_killed_eval(checkpoint, env, tmp_path):
    calls = []

    class Dies(Exception):
        pass

    def dying():
        lm = model_of(checkpoint, 4)

        def boom(requests):
            raise Dies("killed")

        lm.loglikelihood = boom
        calls.append("dying")
        return lm

    with pytest.raises(Dies):
        evaluate(dying, ["synth_vqa", "synth_mc"], tmp_path / "run", limit=4)
    run = tmp_path / "run"
    assert (run / "tasks/synth_vqa/result.json").exists() and not (
        run / "tasks/synth_mc/result.json"
    ).exists()
    assert list(json.loads((run / "eval.json").read_text())["tasks"]) == ["synth_vqa"]
    first = (run / "tasks/synth_vqa/result.json").read_bytes()

    def healthy():
        lm = model_of(checkpoint, 4)
        lm.generate_until = lambda requests: pytest.fail("synth_vqa was finished and must be skipped")
        calls.append("healthy")
        return lm

    summary = evaluate(healthy, ["synth_vqa", "synth_mc"], run, limit=4)
    assert set(summary["tasks"]) == {"synth_vqa", "synth_mc"} and calls == ["dying", "healthy"]
    assert (run / "tasks/synth_vqa/result.json").read_bytes() == first
    # nothing left to do: the model is never built
    evaluate(lambda: pytest.fail("no task to run"), ["synth_vqa", "synth_mc"], run, limit=4)


@pytest.mark.slow
def test_uncached_hub_dataset_fails_at_once_before_the_model_loads(env):
    with pytest.raises(VrlabError, match="lmms-lab-encoder/MME.*not in the local cache"):
        evaluate(lambda: pytest.fail("the model must not load"), ["mme"], env / "run")


def test_unknown_task_and_missing_data_are_named(env, tmp_path, monkeypatch):
    with pytest.raises(VrlabError, match="unknown lmms-eval task.*synth_vq'.*synth_vqa"):
        from vrlab.eval.run import task_manager

        task_manager(["synth_vq"])
    monkeypatch.setenv("VRLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(VrlabError, match="synth_vqa.parquet.*task=make_benchmark"):
        evaluate(lambda: pytest.fail("no model"), ["synth_vqa"], tmp_path / "run")


def test_a_request_with_two_images_is_refused(checkpoint, env):
    lm = model_of(checkpoint)
    (req,) = requests_for(lm, "synth_vqa", "generate", 1)
    two = Req(req.args[0], req.args[1], lambda doc: [doc["image"], doc["image"]], *req.args[3:])
    with pytest.raises(VrlabError, match="synth_vqa', doc 0: 2 images"):
        lm.generate_until([two])


def test_lmms_benchmark_images_in_doc_and_law_order(env):
    from vrlab.data.benchmarks import load_benchmark

    table = pd.read_parquet(env / "synthetic/lmms/synth_vqa.parquet")
    doc = load_benchmark("lmms:synth_vqa", env, overrides={"limit": 5})
    assert [it.id for it in doc.items] == ["0", "1", "2", "3", "4"]
    import io

    from PIL import Image

    for it in doc.items:
        want = np.asarray(Image.open(io.BytesIO(table["image"][int(it.id)]["bytes"])).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(it.path)), want)
    law = load_benchmark("lmms:synth_vqa", env, overrides={"limit": 5, "order": "law"})
    prompts = table["question"].tolist()
    expected = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), prompts[i]))[:5]
    assert [it.id for it in law.items] == [str(i) for i in expected]
    assert law.settings()["order"] == "law" and doc.settings()["order"] == "doc"
    with pytest.raises(VrlabError, match="order='longest'"):
        load_benchmark("lmms:synth_vqa", env, overrides={"order": "longest"})


@pytest.mark.parametrize("kind", ["colour", "shape", "count", "position"])
def test_one_task_per_question_kind(env, kind):
    from PIL import Image

    from vrlab.data.benchmarks import load_benchmark

    table = pd.read_parquet(env / f"synthetic/lmms/synth_{kind}.parquet")
    assert len(table) == 6 and set(table["kind"]) == {kind}
    assert all(
        0 <= lab < len(ch) and ch[lab] == ans
        for lab, ch, ans in zip(table["label"], table["choices"], table["answer"], strict=True)
    )
    # lmms-eval's own task manager resolves the task (its YAML includes the shared template) and its images
    bench = load_benchmark(f"lmms:synth_{kind}", env)
    assert len(bench.items) == 6 and Image.open(bench.items[0].path).size == (64, 64)


def _eval_json(path, rep, score, limit=6):
    rec = {
        "representation": rep,
        "limit": limit,
        "gen_kwargs": None,
        "tasks": {
            "synth_vqa": {
                "results": {"synth_vqa": {"score": score, "n_samples": limit}},
                "versions": {"synth_vqa": 1.0},
            }
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def test_law_table_from_eval_results_refuses_mixed_settings(tmp_path):
    from vrlab.scores.law import collect_table

    a = _eval_json(tmp_path / "a/eval.json", "enc-a", 0.5)
    b = _eval_json(tmp_path / "b/eval.json", "enc-b", 0.25)
    table = collect_table([], [], None, eval_files=[a, b])
    assert table.set_index("representation")["synth_vqa"].to_dict() == {"enc-a": 0.5, "enc-b": 0.25}
    c = _eval_json(tmp_path / "c/eval.json", "enc-c", 0.75, limit=8)
    with pytest.raises(VrlabError, match="mix eval settings for 'synth_vqa'"):
        collect_table([], [], None, eval_files=[a, b, c])
    with pytest.raises(VrlabError, match="two results for 'enc-a'"):
        collect_table([], [], None, eval_files=[a, a])
    newer = _eval_json(tmp_path / "d/eval.json", "enc-a", 0.125)
    os.utime(a, ns=(1, 1))
    kept = collect_table([], [], None, eval_files=[newer, a, b], duplicates="newest")
    assert kept.set_index("representation")["synth_vqa"]["enc-a"] == 0.125


def test_law_table_marks_tuned_towers_and_the_fit_warns(tmp_path, caplog):
    """A model whose tower stage 2 trained is its own row, marked; the AC law is stated for frozen towers."""
    from vrlab.scores.law import TUNED_COLUMN, benchmarks_of, collect_table, fit_law

    files = [_eval_json(tmp_path / f"{i}/eval.json", f"enc-{i}", 0.1 * i) for i in range(8)]
    tuned = json.loads(files[0].read_text()) | {"representation": "enc-0+tuned", "tuned_tower": {"lora_r": 0}}
    files[0].write_text(json.dumps(tuned))
    table = collect_table([], [], None, eval_files=files)
    marks = table.set_index("representation")[TUNED_COLUMN].to_dict()
    assert marks["enc-0+tuned"] == 1 and sum(marks.values()) == 1
    assert benchmarks_of(table) == ["synth_vqa"]  # the mark is not a benchmark
    table["C"] = np.linspace(0, 1, 8)
    table["A"] = np.linspace(1, 0, 8) ** 2
    with caplog.at_level("WARNING"):
        fit_law(table)
    assert "enc-0+tuned" in caplog.text and "frozen towers" in caplog.text


@pytest.mark.parametrize(
    "encoder,adapter,llm_kind",
    [
        ("tiny/clip.tiny/sd", {"type": "mlp2x_gelu"}, "llama"),  # a composite with a diffusion member
        (
            "tiny/dinov2",
            {"type": "qformer", "num_queries": 4, "hidden": 32, "layers": 1, "heads": 4},
            "llama",
        ),
        ("tiny/clip", {"type": "linear"}, "t5"),  # seq2seq: vision tokens in the encoder input
    ],
)
def test_every_kind_of_model_answers_and_scores(tiny_root, env, tmp_path, encoder, adapter, llm_kind):
    from vrlab.eval.model import VrlabLMM

    llm = build_llm(tmp_path / "llm", corpus=default_corpus(), kind=llm_kind)
    torch.manual_seed(0)
    model = VisionLanguageModel.build(
        encoder, str(llm), adapter, registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]}
    )
    folder = model.save_pretrained(tmp_path / "m")
    single, batched = (
        VrlabLMM(model=VisionLanguageModel.from_pretrained(folder), batch_size=b) for b in (1, 3)
    )
    gen = requests_for(single, "synth_vqa", "generate", 3)
    batched.task_dict = single.task_dict
    answers = batched.generate_until(gen)
    assert answers == single.generate_until(gen) and all(isinstance(a, str) for a in answers)
    ll = requests_for(single, "synth_mc", "ll", 2)
    batched.task_dict = single.task_dict
    nll = [r.text[0] for r in batched.loglikelihood(ll)]
    assert np.allclose(nll, [r.text[0] for r in single.loglikelihood(ll)], atol=1e-4)
    assert all(math.isfinite(x) for x in nll)


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_scores_of_one_process(checkpoint, env, tmp_path, torchrun):
    """Each rank answers its share of the requests, rank 0 gathers them (gloo) and alone writes the results."""
    args = [
        "task=eval",
        f"checkpoint={checkpoint}",
        "eval.tasks=[synth_vqa,synth_mc]",
        "eval.batch_size=2",
        f"paths.data={env}",
        f"paths.outputs={tmp_path / 'outputs'}",
    ]
    vrlab = Path(sys.executable).parent / "vrlab"
    one = subprocess.run(
        [str(vrlab), *args, f"eval.out={tmp_path / 'one'}"], capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [*torchrun, *args, f"eval.out={tmp_path / 'two'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    # rank 1 got no results from lmms-eval (it answered its share only) and reported nothing
    assert (two.stdout + two.stderr).count("eval results ->") == 1
    a, b = (json.loads((tmp_path / k / "eval.json").read_text()) for k in ("one", "two"))
    assert scores(a) == scores(b) and set(scores(b)) == {"synth_vqa", "synth_mc"}
    for task in ("synth_vqa", "synth_mc"):
        assert (
            b["tasks"][task]["results"][task]["n_samples"]
            == a["tasks"][task]["results"][task]["n_samples"]
            == 8
        )
        lines = (tmp_path / "two" / "tasks" / task / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 8
