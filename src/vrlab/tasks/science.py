"""`vrlab task=science experiment=science` (`make science`): the AC law put to the test on vrlab's own models.

One command runs the study declared in `science.*`, every step an ordinary task with its own outputs:
1. the generated benchmark at 64 px and a shared tiny LLM, pretrained on the generated text, including
   answering questions from a prefix (the scene's caption where the image later goes);
2. every encoder of the kinds x budget ladder (`task=pretrain_encoder`), a card each;
3. per MLLM seed and encoder: stage 1 on captions, stage 2 on the one-word questions, lmms-eval on the
   per-kind tasks (`task=train`, `task=eval`);
4. C on the semantic pairs (once per encoder) and A against the strongest CLIP-style rungs through their own
   adapters, per seed (`task=correspondence`, `task=alignment`);
5. one law table per seed (`task=law_table`), the policy simulation at the default seed (`task=law_policy`),
   and the verdict (`vrlab.scores.verdict`), printed and written to `<root>/science.json`, `<root>/science.md`
   and `science.docs`.

Steps run in `science.workers` processes with one torch thread each; each step skips what it finished before
with the same inputs (pre-training, training, evaluation), so a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from vrlab.errors import VrlabError
from vrlab.runtime import atomic_write_json, config_hash, seed_everything, to_plain

log = logging.getLogger(__name__)
Step = dict[str, Any]  # config overrides of one task run, `task` included


def encoder_names(encoders: Sequence[str]) -> list[tuple[str, str, int]]:
    """(card name, kind, steps) of every rung `<kind>-<steps>` of the ladder, in the config's order."""
    from vrlab.pretrain import KINDS

    if not encoders:
        raise VrlabError("science.encoders is empty; give rungs such as [random-0, clip-100]")
    rungs = []
    for rung in encoders:
        kind, _, steps = str(rung).rpartition("-")
        if kind not in KINDS or not steps.isdigit():
            raise VrlabError(
                f"science.encoders: '{rung}' is not <kind>-<steps> with a kind of {list(KINDS)} (e.g. clip-100)"
            )
        rungs.append((f"science/{kind}-{int(steps)}", kind, int(steps)))
    return rungs


def reference_names(rungs: list[tuple[str, str, int]], count: int) -> list[str]:
    """The `count` highest-budget clip rungs: A's references."""
    clip = sorted((r for r in rungs if r[1] == "clip"), key=lambda r: r[2])
    if count < 1 or len(clip) < count:
        raise VrlabError(
            f"science.references={count} needs that many clip rungs in science.encoders (has {len(clip)})"
        )
    return [name for name, _, _ in clip[-count:]]


def _config(base: dict[str, Any], step: Step) -> Any:
    cfg = OmegaConf.create(base)
    for key, value in step.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def run_steps(base: dict[str, Any], steps: Sequence[Step]) -> float:
    """Run the steps in order in this process (each an ordinary task); returns the seconds taken."""
    from vrlab.cli import run_task

    start = time.perf_counter()
    for step in steps:
        run_task(_config(base, step))
    return time.perf_counter() - start


def _worker_init(log_dir: str) -> None:
    """One torch thread; the worker's output (logs, library bars) goes to its own file, not the terminal."""
    import torch

    torch.set_num_threads(1)
    path = Path(log_dir) / f"worker-{os.getpid()}.log"
    stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        stream=stream,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        force=True,
    )
    from vrlab.cli import quiet_libraries

    quiet_libraries()


def run_jobs(
    base: dict[str, Any], jobs: dict[str, list[Step]], workers: int, log_dir: Path, what: str
) -> None:
    """Each job (a list of steps) in a pool of `workers` processes, or here when `workers` is 1; a failed job
    stops the study with its label and the log to read."""
    bar = tqdm(total=len(jobs), desc=what, unit="job")
    if workers <= 1:
        for label, steps in jobs.items():
            bar.set_postfix_str(label)
            _guarded(label, lambda steps=steps: run_steps(base, steps), log_dir)
            bar.update()
        bar.close()
        return
    import multiprocessing

    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch or thread state
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(str(log_dir),)
    ) as pool:
        futures = {pool.submit(run_steps, base, steps): label for label, steps in jobs.items()}
        for future in as_completed(futures):
            label = futures[future]
            _guarded(label, future.result, log_dir)
            bar.set_postfix_str(label)
            bar.update()
    bar.close()


def _guarded(label: str, call: Callable[[], float], log_dir: Path) -> float:
    try:
        return call()
    except Exception as exc:
        from vrlab.cli import user_error

        message = user_error(exc) or f"{type(exc).__name__}: {exc}"
        raise VrlabError(f"science: {label} failed: {message} (worker logs: {log_dir})") from exc


READER = "science/reader"


def _pretrain(outputs: str, kind: str, steps: int, data: str, name: str) -> Step:
    return {
        "task": "pretrain_encoder",
        "paths.outputs": outputs,
        "pretrain.kind": kind,
        "pretrain.steps": steps,
        "pretrain.data": data,
        "pretrain.name": name,
    }


def _stage(stage: int, seed: int, encoder: str) -> Step:
    data = "synth-captions" if stage == 1 else "synth-qa"
    return {"task": "train", "stage": stage, "seed": seed, "encoder": encoder, "train.data": data}


def build_llm(cfg: Any) -> dict[str, Any]:
    """The shared tiny LLM, rebuilt only when its text or settings change (`<source>/science_llm.json`)."""
    from vrlab.demo import tiny_llm

    folder = Path(cfg.llm.source)
    llava = Path(cfg.paths.data) / "synthetic" / "llava"
    texts = tiny_llm.llava_texts(llava) + tiny_llm.reading_texts(llava)
    key = config_hash({"texts": texts, "steps": cfg.science.llm_steps, "hidden": cfg.science.llm_hidden})
    record_file = folder / "science_llm.json"
    if record_file.is_file() and json.loads(record_file.read_text()).get("key") == key:
        log.info("shared LLM %s is up to date", folder)
        return json.loads(record_file.read_text())
    seed_everything(cfg.seed)
    tiny_llm.build_llm(folder, corpus=texts + tiny_llm.default_corpus(), hidden=int(cfg.science.llm_hidden))
    losses = tiny_llm.pretrain_llm(folder, texts, steps=int(cfg.science.llm_steps), seed=int(cfg.seed))
    record = {"key": key, "texts": len(texts), "losses": losses}
    atomic_write_json(record_file, record)
    if losses:  # the Trainer logs every 10 steps
        log.info("shared LLM %s: text pretraining loss %.3f -> %.3f", folder, losses[0], losses[-1])
    return record


def science_task(cfg: Any) -> dict[str, Any]:
    """Run the whole study; returns the verdict (also in `<science.root>/science.json`)."""
    from vrlab.cli import run_task

    s = cfg.science
    root = Path(s.root)
    seeds = [int(x) for x in to_plain(s.seeds)]
    if int(cfg.seed) not in seeds:
        raise VrlabError(f"seed={cfg.seed} (the default seed) must be one of science.seeds={seeds}")
    rungs = encoder_names(to_plain(s.encoders))
    names = [r[0] for r in rungs]
    refs = reference_names(rungs, int(s.references))
    benchmarks = [str(b) for b in to_plain(s.benchmarks)]
    data = to_plain(s.pretrain_data)
    missing = sorted({kind for _, kind, _ in rungs} - set(data))
    if missing:
        raise VrlabError(f"science.pretrain_data has no benchmark for kind(s) {missing}")
    base = OmegaConf.to_container(cfg, resolve=False)
    base.setdefault("extract", {})["num_workers"] = 0  # small images: decoder processes would cost more
    shared = f"{root}/runs/shared"  # what no MLLM seed changes: the encoders and C
    logs = root / "logs"
    # a run from nothing measures the whole study's cost (Hydra has made its own folder under runs/ already)
    fresh = not (root / "runs" / "shared").exists()
    start = time.perf_counter()

    run_task(_config(base, {"task": "make_benchmark"}))
    llm = build_llm(cfg)
    reader = root / "runs" / "reader"
    jobs = {name: [_pretrain(shared, kind, steps, data[kind], name)] for name, kind, steps in rungs}
    if s.reader is not None:
        # The shared LLM learns to read a visual prefix, once, beside the ladder's pre-training: stage 1 and a
        # long stage 2 with an encoder of its own seed (no candidate); every candidate then starts from that
        # LLM with an adapter of its own. science.reader=null: the candidates start from the text LLM.
        rseed, rkind, rsteps = int(s.reader.seed), str(s.reader.kind), int(s.reader.steps)
        if rkind not in data:
            raise VrlabError(f"science.pretrain_data has no benchmark for the reader's kind '{rkind}'")
        jobs = {
            "the reader LLM": [
                {**_pretrain(shared, rkind, rsteps, data[rkind], READER), "seed": rseed},
                {**_stage(1, rseed, READER), "train.out": f"{reader}/stage1"},
                {
                    **_stage(2, rseed, READER),
                    "train.out": f"{reader}/stage2",
                    "train.init_from": f"{reader}/stage1/adapter",
                    "train.stage2.num_train_epochs": int(s.reader.stage2_epochs),
                },
            ],
            **jobs,
        }
    run_jobs(base, jobs, int(s.workers), logs, "encoders")
    if s.reader is not None:
        base["llm"]["source"] = str(reader / "stage2" / "model" / "llm")
    per_kind = {"eval.tasks": benchmarks}
    run_jobs(
        base,
        {
            f"{name} (seed {seed})": [
                _stage(1, seed, name),
                {**_stage(2, seed, name), "train.init_from": "${paths.outputs}/stage1/${encoder}/adapter"},
                {"task": "eval", "seed": seed, "encoder": name, **per_kind},
            ]
            for seed in seeds
            for name in names
        },
        int(s.workers),
        logs,
        "MLLMs",
    )
    references = [
        {"name": r, "encoder": r, "adapter": f"${{paths.outputs}}/stage1/{r}/adapter"} for r in refs
    ]
    a_args = {"alignment.references": references, "alignment.benchmarks": [f"lmms:{b}" for b in benchmarks]}
    run_jobs(
        base,
        {
            # one job per seed: its candidates share the references' stores, which two processes must not
            # write at once
            **{
                f"A (seed {seed})": [
                    {"task": "alignment", "encoder": n, "seed": seed, **a_args} for n in names
                ]
                for seed in seeds
            },
            **{
                f"C {name}": [{"task": "correspondence", "encoder": name, "paths.outputs": shared}]
                for name in names
            },
        },
        int(s.workers),
        logs,
        "A and C",
    )
    tables = {}
    for seed in seeds:
        table = f"{root}/runs/seed{seed}/law/table.csv"
        run_task(
            _config(
                base,
                {
                    "task": "law_table",
                    "seed": seed,
                    "law.correspondence": [f"{shared}/correspondence/*/correspondence.json"],
                    "law.out": table,
                },
            )
        )
        tables[seed] = table
    from vrlab.science_report import write_report
    from vrlab.scores.law import read_table
    from vrlab.scores.verdict import judge

    frames = {seed: read_table(path) for seed, path in tables.items()}
    verdict = judge(
        frames, benchmarks, int(cfg.seed), min_span=float(s.min_span), targets=to_plain(s.targets)
    )
    policy = None
    if verdict["judged"]:  # the policy needs scores that rank: only the judged benchmarks
        policy = run_task(
            _config(
                base,
                {
                    "task": "law_policy",
                    "law.table": tables[int(cfg.seed)],
                    "law.benchmarks": verdict["judged"],
                },
            )
        )["recall_within_budget"]
    meta = {
        "references": refs,
        "llm_losses": llm.get("losses"),
        "minutes": (time.perf_counter() - start) / 60,
        "fresh": fresh,
    }
    return write_report(cfg, rungs, frames, verdict, policy, meta)
