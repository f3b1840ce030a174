"""`vrlab task=train` (stage 1: the adapter; stage 2: adapter and LLM) and `task=generate` (answers of a
stage-2 model about images)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vrlab.checkpoint import VLM_CONFIG
from vrlab.data.images import decode_image, list_images
from vrlab.errors import VrlabError
from vrlab.mllm.data import ConversationDataset
from vrlab.mllm.model import VisionLanguageModel
from vrlab.mllm.train import generate_batch, train
from vrlab.runtime import atomic_write_json, resolve_device, run_dir, seed_everything, to_plain
from vrlab.tasks.config import benchmark_from_cfg

log = logging.getLogger(__name__)


def _model_from_cfg(cfg: Any) -> VisionLanguageModel:
    if cfg.train.init_from and cfg.stage == 2 and (Path(cfg.train.init_from) / VLM_CONFIG).exists():
        return VisionLanguageModel.from_pretrained(cfg.train.init_from)
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
    if cfg.train.init_from:
        model.load_adapter_checkpoint(cfg.train.init_from)
    if cfg.stage == 2:
        model.template = model.config_dict["template"] = cfg.llm.template
    return model


def train_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=train stage=1|2 encoder=... llm=... adapter=... train.data=<LLaVA JSON benchmark card>`."""
    seed_everything(cfg.seed)
    if cfg.stage not in (1, 2):
        raise VrlabError(f"stage={cfg.stage} must be 1 or 2")
    model = _model_from_cfg(cfg)
    loader = benchmark_from_cfg(cfg, cfg.train.data, {})
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
            },
        )
    )
    result = train(
        model,
        dataset,
        out,
        cfg.stage,
        stage_args,
        resume=cfg.train.resume,
        lora=to_plain(cfg.train.lora) if cfg.stage == 2 else None,
    )
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
    if not cfg.checkpoint:
        raise VrlabError("task=generate needs checkpoint=<folder written by stage 2>")
    model = VisionLanguageModel.from_pretrained(cfg.checkpoint).to(resolve_device(cfg.device))
    paths = [Path(p) for p in to_plain(cfg.generate.images)]
    if len(paths) == 1 and paths[0].is_dir():
        paths = list_images(paths[0])[: cfg.generate.limit or None]
    images = [decode_image(p) for p in paths]
    answers = generate_batch(
        model,
        images,
        [cfg.generate.prompt] * len(images),
        cfg.generate.max_new_tokens,
        cfg.train.image_aspect_ratio,
    )
    for p, a in zip(paths, answers, strict=True):
        print(f"{p.name}: {a}")
    return {"answers": dict(zip([str(p) for p in paths], answers, strict=True))}
