"""The Hydra app `vrlab`: maps `task=<name>` to the function that runs it; nothing else.

Task functions are imported lazily so `vrlab task=encoders` does not pay for diffusers or open_clip.
`vrlab encoders [GLOB]` is shorthand for `vrlab task=encoders encoders.filter=GLOB`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from vrlab.errors import VrlabError
from vrlab.resources import builtin_dir
from vrlab.settings import check_settings

TASKS = {
    "encoders": "vrlab.tasks.catalog:encoders_task",
    "benchmarks": "vrlab.tasks.catalog:benchmarks_task",
    "make_benchmark": "vrlab.tasks.data:make_benchmark_task",
    "features": "vrlab.tasks.features:features_task",
    "extract": "vrlab.tasks.extract:extract_task",
    "perf": "vrlab.tasks.perf:perf_task",
    "probe_perf": "vrlab.tasks.perf:probe_perf_task",
    "alignment": "vrlab.tasks.scores:alignment_task",
    "correspondence": "vrlab.tasks.scores:correspondence_task",
    "law_table": "vrlab.tasks.law:law_table_task",
    "law_fit": "vrlab.tasks.law:law_fit_task",
    "proxies": "vrlab.tasks.proxies:proxies_task",
    "pretrain_encoder": "vrlab.tasks.pretrain:pretrain_task",
    "science": "vrlab.tasks.science:science_task",
    "proxy_fit": "vrlab.tasks.proxies:proxy_fit_task",
    "law_policy": "vrlab.tasks.law:law_policy_task",
    "law_recommend": "vrlab.tasks.law:law_recommend_task",
    "demo": "vrlab.tasks.demo:demo_task",
    "demo_llm": "vrlab.tasks.demo:demo_llm_task",
    "train": "vrlab.tasks.train:train_task",
    "generate": "vrlab.tasks.train:generate_task",
    "eval": "vrlab.tasks.eval:eval_task",
    "export_hf": "vrlab.tasks.export:export_hf_task",
    "import": "vrlab.tasks.imports:import_task",
    "llm2clip_text": "vrlab.tasks.llm2clip:llm2clip_text_task",
    "llm2clip": "vrlab.tasks.llm2clip:llm2clip_task",
    "retrieval": "vrlab.tasks.retrieval:retrieval_task",
    "lmvr_features": "vrlab.tasks.probe:lmvr_features_task",
    "probe": "vrlab.tasks.probe:probe_task",
    "probe_table": "vrlab.tasks.probe:probe_table_task",
    "lmvr_table": "vrlab.tasks.lmvr_tables:lmvr_table_task",
    "report": "vrlab.tasks.report:report_task",
    "attention": "vrlab.tasks.probe:attention_task",
}

log = logging.getLogger("vrlab")
# An absolute path: Hydra reads a relative one inside a package as a module path.
CONF_DIR = builtin_dir("conf").resolve()


def run_task(cfg: DictConfig) -> object:
    """Run the task named by `cfg.task`, once its numeric settings pass `check_settings`."""
    name = cfg.task
    if name not in TASKS:
        raise VrlabError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))}")
    check_settings(cfg)
    module, _, func = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), func)(cfg)


class _OwnRecordsOnly(logging.Filter):
    """The terminal shows vrlab's own records and other libraries' errors; the log file keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("vrlab") or record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Send library chatter (warnings, transformers/diffusers notices, load bars) to the job's log file only."""
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_OwnRecordsOnly())
    for lib in ("transformers", "diffusers"):
        try:
            lib_logging = importlib.import_module(f"{lib}.utils.logging")
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        lib_logging.disable_default_handler()  # their own stderr handler bypasses the root's filters
        lib_logging.enable_propagation()
        if hasattr(lib_logging, "disable_progress_bar"):
            lib_logging.disable_progress_bar()


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can fix, or None for a bug (which keeps its traceback).

    The only place errors become messages: every `VrlabError` subclass, file-system errors that name a path
    (no permission, disk full, a file where a folder belongs) and config errors (a missing or mistyped key).
    """
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, VrlabError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, OmegaConfBaseException):
        return f"config: {str(exc).splitlines()[0]}"
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> object:
    from vrlab.runtime import adopt_slurm_ranks

    adopt_slurm_ranks()  # a multi-task SLURM job: its tasks become torchrun-style ranks
    verbose = bool(cfg.get("verbose", False))
    if not verbose:
        quiet_libraries()
    try:
        return run_task(cfg)
    except Exception as exc:
        message = user_error(exc)
        if message is None or verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", message)
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.RUN:
            sys.exit(2)
        return None  # in a sweep, one bad job does not stop the others


def main() -> None:
    """Console entry point."""
    argv = sys.argv[1:]
    if argv and argv[0] == "encoders" and all("=" not in a for a in argv[1:2]):
        sys.argv = [
            sys.argv[0],
            "task=encoders",
            *([f"encoders.filter={argv[1]}"] if len(argv) > 1 else []),
            *argv[2:],
        ]
    app()


if __name__ == "__main__":
    main()
