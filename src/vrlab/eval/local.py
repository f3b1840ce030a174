"""The pieces of vrlab's local lmms-eval tasks (`benchmarks/lmms/`): a task class that finds the generated
data through `VRLAB_DATA`, and the documents' prompt, image, choices and scoring.

lmms-eval reads `dataset_kwargs.data_files` literally, so a task folder shipped in the repository cannot
name the data folder of the user who runs it. The task YAML names `class: !function utils.DataTask`;
`DataTask` expands `${VRLAB_DATA}` (default `data`, as the benchmark cards do) in `data_files` before
lmms-eval loads anything, and says how to generate the data when it is missing.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask

from vrlab.errors import VrlabError

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def data_root() -> Path:
    return Path(os.environ.get("VRLAB_DATA") or "data")


def resolve_data_files(value: Any, task: str) -> Any:
    """`data_files` with `${VRLAB_DATA}` expanded; a file that does not exist is an error naming the task."""
    if isinstance(value, dict):
        return {k: resolve_data_files(v, task) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_data_files(v, task) for v in value]
    path = Path(str(value).replace("${VRLAB_DATA}", str(data_root()))).expanduser().absolute()
    if not path.exists():
        raise VrlabError(
            f"lmms-eval task '{task}' needs {path}, which does not exist: generate it with "
            "`vrlab task=make_benchmark` (VRLAB_DATA or paths.data sets the data folder)"
        )
    return str(path)


class DataTask(ConfigurableTask):
    """A ConfigurableTask whose `data_files` may start with `${VRLAB_DATA}`."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        config = {k: v for k, v in dict(config or {}).items() if k != "class"}
        dataset_kwargs = dict(config.get("dataset_kwargs") or {})
        if "data_files" in dataset_kwargs:
            dataset_kwargs["data_files"] = resolve_data_files(
                dataset_kwargs["data_files"], config.get("task", "?")
            )
        config["dataset_kwargs"] = dataset_kwargs
        super().__init__(config=config, **kwargs)


def normalise(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1 when the normalised answer equals the normalised target, else 0."""
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
