"""Two-stage training with the Hugging Face `Trainer` (`vrlab task=train stage=1|2`), and generation.

Stage 1 trains the adapter alone (encoder and LLM frozen) and saves it in the stage-1 format, which
`extract.projector=` loads for the A score. Stage 2 trains the adapter and the LLM, in full or with LoRA
(`peft`), optionally starting from a stage-1 adapter, and saves a model `VisionLanguageModel.from_pretrained`
rebuilds. bf16, gradient checkpointing and resuming come from the Trainer; `conf/accelerate/` holds DDP,
FSDP and DeepSpeed configs for `accelerate launch -m vrlab.cli task=train ...`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from vrlab.errors import VrlabError
from vrlab.mllm.data import Collator, ConversationDataset
from vrlab.mllm.model import VisionLanguageModel

log = logging.getLogger(__name__)


def set_trainable(model: VisionLanguageModel, stage: int, lora: Mapping[str, Any] | None = None) -> list[str]:
    """Freeze per stage; returns the names of the trainable parameters."""
    model.requires_grad_(False)
    model.adapter.requires_grad_(True)
    if stage == 2:
        if lora and lora.get("r"):
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=int(lora["r"]),
                lora_alpha=int(lora.get("alpha", 2 * lora["r"])),
                lora_dropout=float(lora.get("dropout", 0.05)),
                target_modules=lora.get("target_modules", "all-linear"),
                task_type="SEQ_2_SEQ_LM" if model.is_seq2seq else "CAUSAL_LM",
            )
            model.llm = get_peft_model(model.llm, cfg)
        else:
            model.llm.requires_grad_(True)
    elif stage != 1:
        raise VrlabError(f"stage={stage} must be 1 (adapter) or 2 (adapter + LLM)")
    return [n for n, p in model.named_parameters() if p.requires_grad]


class ThroughputLog(TrainerCallback):
    """Records every logged loss and the training tokens per second (non-padding input positions)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, float] | None = None, **kw: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


class CountingCollator(Collator):
    def __init__(self, model: VisionLanguageModel, meter: ThroughputLog) -> None:
        super().__init__(model, "right")
        self.meter = meter

    def __call__(self, batch: Any) -> dict[str, Any]:
        out = super().__call__(batch)
        self.meter.tokens += int(out["attention_mask"].sum())
        return out


def train(
    model: VisionLanguageModel,
    dataset: ConversationDataset,
    out_dir: str | Path,
    stage: int,
    args: Mapping[str, Any],
    resume: str | bool | None = None,
    lora: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one stage; returns losses, throughput and where the result was saved."""
    out_dir = Path(out_dir)
    trainable = set_trainable(model, stage, lora)
    log.info(
        "stage %d: %d trainable tensors (%.2f M parameters)",
        stage,
        len(trainable),
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    meter = ThroughputLog()
    defaults = {
        "output_dir": str(out_dir / "trainer"),
        "remove_unused_columns": False,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
    }
    targs = TrainingArguments(**{**defaults, **dict(args)})
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=CountingCollator(model, meter),
        callbacks=[meter],
    )
    result = trainer.train(resume_from_checkpoint=resume or None)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if stage == 1:
        from vrlab.mllm.adapters import save_projector

        saved = save_projector(
            model.adapter, out_dir / "adapter", {**model.config_dict["adapter"], "stage": 1}
        )
    else:
        saved = model.save_pretrained(out_dir / "model")
    return {
        "losses": history,
        "tokens_per_second": meter.tokens_per_second(),
        "saved": str(saved),
        "train_runtime": result.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
    }


def _model_from_cfg(cfg: Any) -> VisionLanguageModel:
    from vrlab.runtime import to_plain

    if cfg.train.init_from and cfg.stage == 2 and (Path(cfg.train.init_from) / "vlm_config.json").exists():
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
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.runtime import atomic_write_json, run_dir, seed_everything, to_plain

    seed_everything(cfg.seed)
    if cfg.stage not in (1, 2):
        raise VrlabError(f"stage={cfg.stage} must be 1 or 2")
    model = _model_from_cfg(cfg)
    loader = load_benchmark(cfg.train.data, cfg.paths.data, to_plain(cfg.registry))
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


def generate_batch(
    model: VisionLanguageModel,
    images: list[torch.Tensor | None],
    prompts: list[str],
    max_new_tokens: int = 32,
    aspect: str = "pad",
) -> list[str]:
    """Answer one prompt per image (None for text-only), batched with left padding, greedy."""
    from vrlab.mllm.conversation import IMAGE_TOKEN, tokenize

    items = []
    for image, prompt in zip(images, prompts, strict=True):
        text = f"{IMAGE_TOKEN}\n{prompt}" if image is not None and IMAGE_TOKEN not in prompt else prompt
        ids, labels = tokenize(
            [{"from": "human", "value": text}],
            model.template,
            model.tokenizer,
            image is not None,
            generation=True,
        )
        item = {"input_ids": ids, "labels": labels, "has_image": image is not None, "guide": prompt}
        if image is not None:
            item["pixels"] = model.image_input(image, aspect)
        items.append(item)
    batch = Collator(model, padding_side="left")(items)
    batch.pop("labels")
    batch.pop("decoder_labels", None)
    device = next(model.parameters()).device
    batch = {
        k: (v.to(device) if torch.is_tensor(v) else tuple(t.to(device) for t in v)) for k, v in batch.items()
    }
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in model.tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate_task(cfg: Any) -> dict[str, Any]:
    """`vrlab task=generate checkpoint=<stage-2 model> generate.images=[...] generate.prompt='...'`."""
    from vrlab.data.images import decode_image, list_images
    from vrlab.runtime import resolve_device, to_plain

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
