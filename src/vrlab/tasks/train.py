"""`vrlab task=train` (stage 1: the adapter; stage 2: adapter and LLM) and `task=generate` (answers of a
stage-2 model about images)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vrlab.data.images import decode_image, list_images
from vrlab.errors import VrlabError
from vrlab.mllm.data import ConversationDataset
from vrlab.mllm.model import VisionLanguageModel
from vrlab.mllm.train import STAMP_FILE, generate_batch, train
from vrlab.published import MODEL_FORMATS, detect_format
from vrlab.runtime import atomic_write_json, config_hash, resolve_device, run_dir, seed_everything, to_plain
from vrlab.tasks.config import adapter_checkpoint, benchmark_from_cfg, model_checkpoint

log = logging.getLogger(__name__)


def _model_from_cfg(cfg: Any) -> VisionLanguageModel:
    init = cfg.train.init_from
    if init and cfg.stage == 2 and detect_format(init) in MODEL_FORMATS:
        return VisionLanguageModel.from_pretrained(model_checkpoint(cfg, "train", init))
    adapter = dict(to_plain(cfg.adapter))
    text_tower = adapter.pop("text_tower", None)
    model = VisionLanguageModel.build(
        cfg.encoder,
        cfg.llm.source,
        adapter,
        template=cfg.llm.template if cfg.stage == 2 else cfg.train.stage1_template,
        registry_cfg=to_plain(cfg.registry),
        encoder_args=to_plain(cfg.encoder_args),
        compose=to_plain(cfg.compose),
        trust_remote_code=cfg.llm.trust_remote_code,
        text_tower=text_tower,
    )
    if init:
        model.load_adapter_checkpoint(adapter_checkpoint(cfg, init))
    model.config_dict["image_aspect_ratio"] = cfg.train.image_aspect_ratio
    if cfg.stage == 2:
        model.template = model.config_dict["template"] = cfg.llm.template
    return model


def _tune(cfg: Any) -> dict[str, Any] | None:
    """`train.encoder_tuning` when `train.tune_encoder` is on, else None."""
    if not cfg.train.get("tune_encoder"):
        return None
    return dict(to_plain(cfg.train.encoder_tuning))


def _inputs_fingerprint(cfg: Any, data: Any) -> str:
    """What a training run read: its settings, the encoder card's files, the LLM folder, the stage-1 adapter
    and the data card's files (sizes and modification times, nothing is read), so `train.skip_done` never
    keeps a model trained on something else."""
    from vrlab.fingerprint import card_fingerprint, spec_fingerprint
    from vrlab.registry import Registry

    cards = [c.to_dict() for c in Registry.from_config(to_plain(cfg.registry)).resolve(cfg.encoder)]
    paths = [p for p in (cfg.llm.source, cfg.train.init_from) if p]
    return config_hash(
        {
            "stage": cfg.stage,
            "encoder": [card_fingerprint(c) | {"card": c} for c in cards],
            "paths": spec_fingerprint({"paths": paths}),
            "llm": cfg.llm.source,
            "adapter": to_plain(cfg.adapter),
            "data": [
                data.to_dict(),
                spec_fingerprint({"json": str(Path(data.spec["root"]) / data.spec.get("file", ""))}),
            ],
            "args": to_plain(cfg.train[f"stage{cfg.stage}"]),
            "lora": to_plain(cfg.train.lora),
            **({"tune": _tune(cfg)} if _tune(cfg) else {}),
            "init_from": cfg.train.init_from,
            "seed": cfg.seed,
        }
    )


def _resume_from(resume: Any, out: Path, inputs: str) -> str | bool | None:
    """`train.resume`: `auto` continues from the last checkpoint in `<out>/trainer` when it records the same
    inputs (`STAMP_FILE`, written with it), so a requeued or restarted job picks up where it stopped; null
    starts over; a folder or true is passed to the Trainer as given. Nothing is written here, so every rank
    of a multi-process run decides alike."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume != "auto":
        return resume or None
    trainer_dir = out / "trainer"
    last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
    if last is None:
        return None
    stamp = Path(last) / STAMP_FILE
    if not stamp.is_file() or json.loads(stamp.read_text()).get("inputs") != inputs:
        log.warning(
            "%s is a checkpoint of a run with other inputs: training from the start (train.resume=%s to "
            "continue from it anyway)",
            last,
            last,
        )
        return None
    log.info("continuing from %s (train.resume=auto; train.resume=null starts over)", last)
    return last


def train_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=train stage=1|2 encoder=... llm=... adapter=... train.data=<LLaVA JSON benchmark card>`."""
    seed_everything(cfg.seed)
    if cfg.stage not in (1, 2):
        raise VrlabError(f"stage={cfg.stage} must be 1 or 2")
    loader = benchmark_from_cfg(cfg, cfg.train.data, {})
    inputs = _inputs_fingerprint(cfg, loader.card)
    done = Path(cfg.train.out) / "train_result.json" if cfg.train.out else None
    if cfg.train.skip_done and done is not None and done.exists():
        previous = json.loads(done.read_text())
        if previous.get("inputs") == inputs:
            log.info(
                "stage %d of %s already trained with these inputs (%s); skipped", cfg.stage, cfg.encoder, done
            )
            return previous
        log.info("stage %d of %s: inputs changed since %s; training again", cfg.stage, cfg.encoder, done)
    model = _model_from_cfg(cfg)
    dataset = ConversationDataset(loader, model, image_aspect_ratio=cfg.train.image_aspect_ratio)
    stage_args = dict(to_plain(cfg.train[f"stage{cfg.stage}"]))
    stage_args.setdefault("seed", cfg.seed)
    out = Path(
        cfg.train.out
        or run_dir(
            cfg.paths.outputs,
            f"train/stage{cfg.stage}",
            cfg.encoder,
            {
                "encoder": cfg.encoder,
                "llm": cfg.llm.source,
                "adapter": to_plain(cfg.adapter),
                "data": cfg.train.data,
                "args": stage_args,
                "lora": to_plain(cfg.train.lora),
                **({"tune": _tune(cfg)} if _tune(cfg) else {}),  # frozen runs keep their folders
            },
        )
    )
    result = train(
        model,
        dataset,
        out,
        cfg.stage,
        stage_args,
        resume=_resume_from(cfg.train.resume, out, inputs),
        stamp={"inputs": inputs},
        lora=to_plain(cfg.train.lora) if cfg.stage == 2 else None,
        tune=_tune(cfg),
    )
    result["inputs"] = inputs
    atomic_write_json(out / "train_result.json", result)
    log.info(
        "stage %d done: %d steps, loss %.3f -> %.3f, %.0f tokens/s; saved %s",
        cfg.stage,
        result["steps"],
        result["losses"][0] if result["losses"] else float("nan"),
        result["losses"][-1] if result["losses"] else float("nan"),
        result["tokens_per_second"],
        result["saved"],
    )
    return result


def generate_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=generate checkpoint=<stage-2 model> generate.images=[...] generate.prompt='...'`."""
    model = VisionLanguageModel.from_pretrained(model_checkpoint(cfg, "generate")).to(
        resolve_device(cfg.device)
    )
    paths = [Path(p) for p in to_plain(cfg.generate.images)]
    if len(paths) == 1 and paths[0].is_dir():
        paths = list_images(paths[0])[: cfg.generate.limit or None]
    images = [decode_image(p) for p in paths]
    answers = generate_batch(
        model,
        images,
        [cfg.generate.prompt] * len(images),
        cfg.generate.max_new_tokens,
    )
    for p, a in zip(paths, answers, strict=True):
        print(f"{p.name}: {a}")
    return {"answers": dict(zip([str(p) for p in paths], answers, strict=True))}
