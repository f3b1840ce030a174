"""Questions about rendered scenes whose answers the scene determines: colour, shape, count and position.

`scene_questions` feeds both the stage-2 training conversations (one-word answers) and the local lmms-eval
tasks `write_lmms_tasks` writes (`synth_vqa`: open answers scored by exact match; `synth_mc`: the same
questions as multiple choice scored by log-likelihood). The task images are scenes of their own, never
seen in training. Each task is one parquet file with the images embedded, which lmms-eval reads through
`datasets`; the task folders that point at them ship in `benchmarks/lmms/`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from vrlab.data.scenes import COLOURS, SHAPES, Scene, render_scene

NUMBERS = ("zero", "one", "two", "three", "four")
ONE_WORD = "Answer with one word."
LMMS_TASK_NAMES = ("synth_vqa", "synth_mc")
# one multiple-choice task per question kind, each a benchmark of the law (64 px scenes, shapes learnable);
# colour, shape and position ask about a scene's only object, so each measures one skill (no binding of a
# shape to a colour), and count has 1-3 objects
KIND_TASKS = {
    "synth_colour": "colour",
    "synth_shape": "shape",
    "synth_count": "count",
    "synth_position": "position",
}


def _centre_x(obj: Any) -> float:
    return (obj.bbox[0] + obj.bbox[2]) / 2


def scene_questions(scene: Scene, width: int) -> list[dict[str, Any]]:
    """Every unambiguous question about `scene`: `{kind, question, answer, choices}`.

    A shape is named only when it is the only one of its kind in the scene, a colour likewise; position asks
    left or right only for an object clearly off the centre line.
    """
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    n = len(objs)
    out = [
        {
            "kind": "count",
            "question": "How many shapes are there?",
            "answer": NUMBERS[n],
            "choices": list(NUMBERS[1:4]),
        }
    ]
    for o in objs:
        if shapes.count(o.shape) == 1:
            out.append(
                {
                    "kind": "colour",
                    "question": f"What colour is the {o.shape}?",
                    "answer": o.colour,
                    "choices": list(COLOURS),
                }
            )
            offset = _centre_x(o) - width / 2
            if abs(offset) > 0.15 * width:
                out.append(
                    {
                        "kind": "position",
                        "question": f"Is the {o.shape} on the left or on the right?",
                        "answer": "left" if offset < 0 else "right",
                        "choices": ["left", "right"],
                    }
                )
        if colours.count(o.colour) == 1:
            out.append(
                {
                    "kind": "shape",
                    "question": f"What shape is the {o.colour} object?",
                    "answer": o.shape,
                    "choices": list(SHAPES),
                }
            )
    return out


def pick_question(scene: Scene, width: int, rng: np.random.Generator) -> dict[str, Any]:
    """One question of a random kind (kinds drawn evenly, then a question of that kind)."""
    questions = scene_questions(scene, width)
    kinds = sorted({q["kind"] for q in questions})
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [q for q in questions if q["kind"] == kind]
    return of_kind[int(rng.integers(len(of_kind)))]


def _task_rows(
    rng: np.random.Generator, count: int, size: tuple[int, int], kind: str | None = None
) -> list[dict[str, Any]]:
    """`count` questions, one per scene: of a random kind, or all of `kind` (scenes without one are skipped)."""
    rows: list[dict[str, Any]] = []
    objects = (1, 3) if kind in (None, "count") else 1
    while len(rows) < count:
        i = len(rows)
        scene = render_scene(rng, size, n_objects=objects, style="flat" if i % 2 == 0 else "photo")
        if kind is None:
            q = pick_question(scene, size[1], rng)
        else:
            of_kind = [q for q in scene_questions(scene, size[1]) if q["kind"] == kind]
            if not of_kind:
                continue
            q = of_kind[int(rng.integers(len(of_kind)))]
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        rows.append(
            {
                "question_id": f"q{i:05d}",
                "image": {"bytes": buf.getvalue(), "path": None},
                "question": f"{q['question']} {ONE_WORD}",
                "answer": q["answer"],
                "kind": q["kind"],
                "choices": q["choices"],
                "label": q["choices"].index(q["answer"]),
            }
        )
    return rows


def write_lmms_tasks(
    root: Path,
    rng: np.random.Generator,
    count: int,
    size: tuple[int, int],
    kind_count: int = 0,
    kind_size: tuple[int, int] = (64, 64),
) -> int:
    """`root/<task>.parquet` for each local task: `count` questions, one per scene, each task on scenes of
    its own (so A on each benchmark's images is A on different images); with `kind_count`, also one task of
    that many questions per kind (`KIND_TASKS`) on `kind_size` scenes."""
    from datasets import Dataset, Features, Image, Sequence, Value

    root.mkdir(parents=True, exist_ok=True)
    features = Features(
        {
            "question_id": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "kind": Value("string"),
            "choices": Sequence(Value("string")),
            "label": Value("int64"),
        }
    )
    for name in LMMS_TASK_NAMES:
        rows = _task_rows(rng, count, size)
        Dataset.from_list(rows, features=features).to_parquet(str(root / f"{name}.parquet"))
    for name, kind in KIND_TASKS.items() if kind_count else ():
        rows = _task_rows(rng, kind_count, kind_size, kind)
        Dataset.from_list(rows, features=features).to_parquet(str(root / f"{name}.parquet"))
    return count * len(LMMS_TASK_NAMES) + kind_count * len(KIND_TASKS)
