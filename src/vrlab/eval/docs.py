"""`benchmark=lmms:<task>`: the images of an lmms-eval task, so A is computed on each benchmark's own images.

The task's documents are enumerated in one process (lmms-eval strides documents across ranks when several
run), groups are flattened in lmms-eval's order, and each image is written once as PNG under
`<data>/lmms/<task>/images/` (rewritten only when its bytes change, so store fingerprints stay put) for
the extraction pipeline to read like any other benchmark. `seed_image` is the `seedbench` task's
image-type documents, as lmms-eval reports it.

Two orders pick the first `limit` documents: `doc` (document order) and `law`, the order of the Law paper's
vendored lmms-eval, which ran batch 1 and sorted `generate_until` requests by descending prompt length
(in tokens of `tokenizer` when given, else characters), ties by prompt text; its "first 100" are the
longest prompts. The order and tokenizer are part of the loader's settings, hence of every store key.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vrlab.data.loaders import Item, Loader
from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
PREFIX = "lmms:"
ORDERS = ("doc", "law")
# report names that are a filter over another task's documents
VIEWS = {"seed_image": ("seedbench", {"data_type": "image"})}


def _documents(task: str, include: Sequence[str], data: str | None) -> list[tuple[str, Any, int, Any]]:
    """(subtask, task object, doc id, doc) of every evaluation document, groups flattened."""
    from lmms_eval.evaluator_utils import get_task_list
    from lmms_eval.tasks import get_task_dict

    from vrlab.eval.run import check_datasets, data_folder, route_lmms_logs, task_manager

    route_lmms_logs()
    data_folder(data)
    name, where = VIEWS.get(task, (task, {}))
    manager = task_manager([name], include)
    check_datasets(manager, [name])
    out = []
    for t in get_task_list(get_task_dict([name], manager)):
        obj = t.task
        for doc_id, doc in enumerate(obj.eval_docs):
            if all(doc.get(k) == v for k, v in where.items()):
                out.append((t.task_name, obj, doc_id, doc))
    return out


def _write_png(image: Any, path: Path) -> None:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    if not path.exists() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


class LmmsTaskLoader(Loader):
    """The images of lmms-eval task `lmms_task`, first `limit` documents in `order`."""

    task = "images"

    def __init__(
        self,
        root: str | Path,
        lmms_task: str,
        include: Sequence[str] = (),
        limit: int | None = 100,
        order: str = "doc",
        tokenizer: str | None = None,
        data: str | None = None,
    ) -> None:
        if order not in ORDERS:
            raise VrlabError(f"benchmark lmms:{lmms_task}: order='{order}' must be one of {ORDERS}")
        Path(root).mkdir(parents=True, exist_ok=True)
        super().__init__(root, None)
        self.lmms_task, self.order, self.tokenizer_name, self.limit = lmms_task, order, tokenizer, limit
        self.include = [str(p) for p in include]
        docs = _documents(lmms_task, self.include, data)
        if not docs:
            raise VrlabError(f"lmms-eval task '{lmms_task}' has no evaluation documents")
        if order == "law":
            docs = self._law_order(docs)
        docs = docs[: limit or None]
        several = len({d[0] for d in docs}) > 1
        for subtask, obj, doc_id, doc in docs:
            visuals = [v for v in (obj.doc_to_visual(doc) or []) if v is not None]
            for k, image in enumerate(visuals):
                if not hasattr(image, "convert"):
                    raise VrlabError(
                        f"lmms-eval task '{subtask}' doc {doc_id} gives {type(image).__name__}, not an image"
                    )
                item_id = f"{subtask}/{doc_id}" if several else str(doc_id)
                item_id += f"#{k}" if len(visuals) > 1 else ""
                path = self.root / "images" / subtask / f"{doc_id}_{k}.png"
                _write_png(image, path)
                self.items.append(Item(item_id, path, None, {"task": subtask, "doc_id": doc_id}))
        self.check_ids()
        log.info(
            "lmms:%s: %d images of %d documents (%s order)", lmms_task, len(self.items), len(docs), order
        )

    def _law_order(self, docs: list[tuple[str, Any, int, Any]]) -> list[tuple[str, Any, int, Any]]:
        measure = len
        if self.tokenizer_name:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer_name)

            def measure(text: str) -> int:
                return len(tok(text, add_special_tokens=False).input_ids)

        contexts = [str(obj.doc_to_text(doc)) for _, obj, _, doc in docs]
        order = sorted(range(len(docs)), key=lambda i: (-measure(contexts[i]), contexts[i]))
        return [docs[i] for i in order]

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "lmms_task": self.lmms_task,
            "order": self.order,
            "tokenizer": self.tokenizer_name,
            "limit": self.limit,
        }


def lmms_card_spec(name: str, data_root: str | Path) -> dict[str, Any]:
    """The loader spec of `lmms:<task>` (a card made in memory; benchmark_args override any key)."""
    task = name[len(PREFIX) :].strip()
    if not task:
        raise VrlabError("benchmark=lmms:<task> needs a task name, e.g. lmms:synth_vqa")
    return {
        "_target_": "vrlab.eval.docs.LmmsTaskLoader",
        "root": f"lmms/{task}",
        "lmms_task": task,
        "data": str(data_root),
    }


def is_lmms(name: str) -> bool:
    return name.startswith(PREFIX)
