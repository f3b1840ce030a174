"""The Hydra app `vrlab`: maps `task=<name>` to the function that runs it; nothing else.

Task functions are imported lazily so `vrlab task=encoders` does not pay for diffusers or open_clip.
`vrlab encoders [GLOB]` is shorthand for `vrlab task=encoders encoders.filter=GLOB`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vrlab.errors import VrlabError

TASKS = {
    "encoders": "vrlab.catalog:encoders_task",
    "benchmarks": "vrlab.catalog:benchmarks_task",
    "make_benchmark": "vrlab.data.synthetic:make_benchmark_task",
    "extract": "vrlab.extract:extract_task",
    "perf": "vrlab.perf:perf_task",
    "probe_perf": "vrlab.perf:probe_perf_task",
    "alignment": "vrlab.scores.alignment:alignment_task",
    "correspondence": "vrlab.scores.correspondence:correspondence_task",
    "law_table": "vrlab.scores.law:law_table_task",
    "law_fit": "vrlab.scores.law:law_fit_task",
    "law_policy": "vrlab.scores.law:law_policy_task",
    "law_recommend": "vrlab.scores.law:law_recommend_task",
    "features": "vrlab.features:features_task",
    "demo": "vrlab.demo:demo_task",
    "demo_scores": "vrlab.demo:demo_scores_task",
    "demo_llm": "vrlab.demo:demo_llm_task",
    "train": "vrlab.mllm.train:train_task",
    "generate": "vrlab.mllm.train:generate_task",
    "lmvr_features": "vrlab.probes.lmvr:lmvr_features_task",
    "probe": "vrlab.probes.linear:probe_task",
    "probe_table": "vrlab.probes.linear:probe_table_task",
    "attention": "vrlab.probes.attention:attention_task",
}

log = logging.getLogger("vrlab")
# An absolute path: Hydra reads a relative one inside a package as a module path.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def run_task(cfg: DictConfig) -> object:
    """Run the task named by `cfg.task`."""
    name = cfg.task
    if name not in TASKS:
        raise VrlabError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))}")
    module, _, func = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), func)(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> object:
    try:
        return run_task(cfg)
    except VrlabError as exc:
        log.error("%s", exc)
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
