"""Run lmms-eval tasks on a vrlab model into a resumable run folder.

Layout of a run folder (`<outputs>/eval/<representation>-<hash>`, the hash over the checkpoint's digest,
the limit and the generation overrides):

    eval.json                     every finished task: metrics, samples, lmms-eval version, digest, speed
    tasks/<task>/result.json      one task's result, written last: its presence marks the task finished
    tasks/<task>/samples.jsonl    per-sample prompts, answers, targets and metrics

A rerun skips finished tasks; a killed run loses at most the task in flight. Before the model loads, every
task is resolved (unknown names are refused with close matches) and, offline, every hub dataset a task
needs is looked up in the local cache, so a missing one fails at once with the dataset's name instead of
lmms-eval's retries.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vrlab.errors import VrlabError
from vrlab.resources import builtin_dir
from vrlab.runtime import atomic_write_bytes, atomic_write_json, distributed_context

log = logging.getLogger(__name__)
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "pandas", "arrow", "imagefolder", "audiofolder")


def route_lmms_logs() -> None:
    """lmms-eval logs through loguru to stderr at DEBUG; send it to the standard `lmms_eval` logger instead,
    so its records reach the job's log file and the terminal shows only errors (as for other libraries)."""
    from loguru import logger

    logger.remove()
    logger.add(
        lambda msg: logging.getLogger("lmms_eval").log(
            msg.record["level"].no if msg.record["level"].no in (10, 20, 30, 40, 50) else 20,
            msg.record["message"],
        ),
        level="INFO",
        format="{message}",
    )


def data_folder(data: str | Path | None) -> None:
    """Point vrlab's local tasks at `data` (they read `VRLAB_DATA`, as the benchmark cards do)."""
    if data is not None:
        os.environ["VRLAB_DATA"] = str(data)


def local_tasks_dir() -> Path:
    """The task folders shipped with vrlab (`benchmarks/lmms/`)."""
    return builtin_dir("benchmarks") / "lmms"


@functools.lru_cache(maxsize=8)
def _index(paths: tuple[str, ...], defaults: bool) -> Any:
    """One TaskManager per set of folders and process: indexing is the slow part (a sweep of evals reuses it)."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults, verbosity="ERROR")


def task_manager(tasks: Sequence[str], include: Sequence[str | Path] = ()) -> Any:
    """A TaskManager over vrlab's tasks and `include`; lmms-eval's ~2000 built-ins are indexed only when a
    name is not found locally (indexing them takes seconds)."""
    paths = (str(local_tasks_dir()), *(str(Path(p).expanduser().absolute()) for p in include))
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise VrlabError(f"eval.include: task folder {p} does not exist")
    manager = _index(paths, False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = _index(paths, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise VrlabError(
            "unknown lmms-eval task(s): "
            + "; ".join(
                f"'{t}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()
            )
        )
    return manager


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    try:
        snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError and friends: not in the hub cache
        pass
    cache = Path(_resolve_hf_datasets_cache_dir())
    prefix = repo_id.replace("/", "___").lower()
    return cache.is_dir() and any(p.name.lower().startswith(prefix) for p in cache.iterdir())


def _leaf_configs(manager: Any, name: str, depth: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(task, YAML config) of every task below a task, group or tag name."""
    from lmms_eval import utils

    entry = manager.task_index[name]
    if entry["type"] == "tag":
        return [c for t in entry["task"] for c in _leaf_configs(manager, t, depth + 1)]
    config = utils.load_yaml_config(entry["yaml_path"], mode="simple")
    if entry["type"] == "group" and depth < 8:
        out = []
        for sub in config.get("task", []):
            if isinstance(sub, str) and sub in manager.task_index:
                out += _leaf_configs(manager, sub, depth + 1)
            elif isinstance(sub, dict) and "task" in sub:
                out.append((str(sub["task"]), sub))
        return out
    return [(name, config)]


def check_datasets(manager: Any, tasks: Sequence[str]) -> None:
    """Refuse at once a task whose local data files are missing or, offline, whose hub dataset is not in the
    local cache."""
    from vrlab.eval.local import resolve_data_files

    for name in tasks:
        for leaf, config in _leaf_configs(manager, name):
            path = config.get("dataset_path")
            kwargs = config.get("dataset_kwargs") or {}
            if path in LOCAL_BUILDERS and kwargs.get("data_files"):
                resolve_data_files(kwargs["data_files"], leaf)
            if not _offline():
                continue
            if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).expanduser().exists():
                continue
            if kwargs.get("load_from_disk"):
                raise VrlabError(f"lmms-eval task '{leaf}' loads {path} from disk, which does not exist")
            if not _is_cached(path):
                raise VrlabError(
                    f"lmms-eval task '{leaf}' needs the dataset '{path}', which is not in the local cache "
                    "and the hub is offline: on a connected machine run `huggingface-cli download "
                    f"--repo-type dataset {path}` with the same HF_HOME (or unset HF_HUB_OFFLINE and "
                    "HF_DATASETS_OFFLINE here)"
                )


def _plain(value: Any) -> Any:
    """JSON-able numbers from lmms-eval's numpy scalars; 'N/A' and other strings stay as they are."""
    if hasattr(value, "item"):
        return value.item()
    return value


def _sample_record(sample: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    doc = {
        k: v for k, v in (sample.get("doc") or {}).items() if isinstance(v, str | int | float | bool | list)
    }
    args = sample.get("arguments") or [[None]]
    return {
        "doc_id": sample.get("doc_id"),
        "prompt": args[0][0] if args and isinstance(args[0], list | tuple) else None,
        "target": sample.get("target"),
        "response": sample.get("filtered_resps"),
        **{m: _plain(sample[m]) for m in metrics if m in sample},
        "doc": doc,
    }


def run_task(
    model: Any, manager: Any, task: str, folder: Path, limit: int | None, gen_kwargs: str | None
) -> dict[str, Any] | None:
    """One task through `simple_evaluate`; writes samples then result.json (the finished marker). Under
    torchrun every rank runs it and rank 0 writes; the other ranks get None."""
    from lmms_eval.evaluator import simple_evaluate

    rank, world = distributed_context()
    start = time.perf_counter()
    res = simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=manager,
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
        gen_kwargs=gen_kwargs or None,
        verbosity="ERROR",
        # under torchrun each rank takes its share of the requests and rank 0 gathers them (over gloo on CPUs)
        distributed_executor_backend="torchrun" if world > 1 else "accelerate",
    )
    seconds = time.perf_counter() - start
    if res is None and rank > 0:
        return None  # rank 0 holds the results and writes them
    if res is None:
        raise VrlabError(f"lmms-eval returned no results for task '{task}'")
    higher = res.get("higher_is_better", {})
    results: dict[str, Any] = {}
    n_samples = 0
    lines = []
    for name, metrics in res["results"].items():
        entry = {k: _plain(v) for k, v in metrics.items() if k != "alias"}
        counts = res.get("n-samples", {}).get(name, {})
        n_samples += int(counts.get("effective", 0))
        primary = next(iter(higher.get(name, {})), None)
        results[name] = {
            "metrics": entry,
            "primary": f"{primary},none" if primary else None,
            "score": entry.get(f"{primary},none") if primary else None,
            "higher_is_better": higher.get(name, {}),
            "n_samples": int(counts.get("effective", 0)),
            "n_docs": int(counts.get("original", 0)),
        }
        names = list(higher.get(name, {}))
        lines += [
            json.dumps({"task": name, **_sample_record(s, names)}, default=str)
            for s in res.get("samples", {}).get(name, [])
        ]
    atomic_write_bytes(folder / "samples.jsonl", ("\n".join(lines) + "\n").encode())
    record = {
        "task": task,
        "results": results,
        "n_samples": n_samples,
        "seconds": seconds,
        "samples_per_second": n_samples / seconds if seconds > 0 else None,
        "lmms_eval_version": res.get("lmms_eval_version"),
        "versions": {k: _plain(v) for k, v in res.get("versions", {}).items()},
    }
    atomic_write_json(folder / "result.json", record)
    return record


def evaluate(
    model_factory: Any,
    tasks: Sequence[str],
    out: str | Path,
    *,
    include: Sequence[str | Path] = (),
    limit: int | None = None,
    gen_kwargs: str | None = None,
    header: dict[str, Any] | None = None,
    data: str | Path | None = None,
) -> dict[str, Any]:
    """Every task in `tasks` not finished in `out`; `model_factory()` builds the lmms-eval model, only when
    some task still has to run; `data` is the data folder vrlab's local tasks read. Returns eval.json."""
    if not tasks:
        raise VrlabError("eval.tasks is empty; name lmms-eval tasks, e.g. eval.tasks=[synth_vqa,synth_mc]")
    if len(set(tasks)) != len(tasks):
        raise VrlabError(f"eval.tasks names a task twice: {list(tasks)}")
    out = Path(out)
    route_lmms_logs()
    data_folder(data)
    manager = task_manager(tasks, include)
    check_datasets(manager, tasks)
    summary: dict[str, Any] = {**(header or {}), "limit": limit, "gen_kwargs": gen_kwargs, "tasks": {}}
    rank = distributed_context()[0]
    # decided once, before any rank writes, so that every rank runs the same tasks
    finished = {t for t in tasks if (out / "tasks" / t / "result.json").exists()}
    model = None
    for task in tasks:
        folder = out / "tasks" / task
        if task in finished:
            log.info("eval: %s already finished in %s; skipped", task, folder)
            summary["tasks"][task] = json.loads((folder / "result.json").read_text())
        else:
            if model is None:
                model = model_factory()
            log.info("eval: %s (limit %s) ...", task, limit)
            record = run_task(model, manager, task, folder, limit, gen_kwargs)
            if record is None:  # not rank 0
                continue
            summary["tasks"][task] = record
        summary["lmms_eval_version"] = summary["tasks"][task].get("lmms_eval_version")
        if rank == 0:
            atomic_write_json(out / "eval.json", summary)
    return summary if rank == 0 else {"rank": rank, "tasks": {}}


def scores(summary: dict[str, Any]) -> dict[str, float]:
    """Primary score of every (sub)task in an eval.json: `{task: value}`."""
    out = {}
    for record in summary.get("tasks", {}).values():
        for name, r in record["results"].items():
            if isinstance(r.get("score"), int | float):
                out[name] = float(r["score"])
    return out
