"""Two-stage training with the Hugging Face `Trainer` (`vrlab task=train stage=1|2`), and generation.

Stage 1 trains the adapter alone (encoder and LLM frozen) and saves it in the stage-1 format, which
`extract.adapter=` loads for the A score. Stage 2 trains the adapter and the LLM, in full or with LoRA
(`peft`), optionally starting from a stage-1 adapter, and optionally the vision tower too with its own
learning rate (`tune`, see `vrlab.mllm.tower`), and saves a model `VisionLanguageModel.from_pretrained`
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
from transformers import Trainer, TrainerCallback

from vrlab.checkpoint import save_adapter
from vrlab.errors import VrlabError
from vrlab.mllm.data import Collator, ConversationDataset
from vrlab.mllm.inference import generate_answers
from vrlab.mllm.model import VisionLanguageModel
from vrlab.mllm.tower import tune_tower
from vrlab.runtime import atomic_write_json, training_arguments

log = logging.getLogger(__name__)


def set_trainable(
    model: VisionLanguageModel,
    stage: int,
    lora: Mapping[str, Any] | None = None,
    tune: Mapping[str, Any] | None = None,
) -> list[str]:
    """Freeze per stage; with `tune` (stage 2), the tower trains too. Returns the trainable parameters' names."""
    model.requires_grad_(False)
    model.adapter.requires_grad_(True)
    if tune is not None:
        if stage != 2:
            raise VrlabError(
                "train.tune_encoder=true is a stage-2 setting (stage 1 trains the adapter alone)"
            )
        model.config_dict["tuned_encoder"] = tune_tower(model.encoder, tune)
        model.freeze_encoder = model.config_dict["freeze_encoder"] = False
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


STAMP_FILE = "vrlab_inputs.json"  # in every Trainer checkpoint: what it was trained on


class CheckpointStamp(TrainerCallback):
    """Writes `stamp` (the run's inputs) into every checkpoint folder the Trainer saves, from rank 0, so a later
    run can tell whether a checkpoint is its own before resuming from it."""

    def __init__(self, stamp: Mapping[str, Any]) -> None:
        self.stamp = dict(stamp)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(folder / STAMP_FILE, self.stamp)


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


class TowerTrainer(Trainer):
    """The Trainer with the tower's parameters in their own group at their own learning rate."""

    def __init__(self, *args: Any, tower_lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tower_lr = tower_lr

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        if self.tower_lr is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        tower = {id(p) for p in self.model.encoder.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in tower], "weight_decay": self.args.weight_decay},
            {
                "params": [p for p in trainable if id(p) in tower],
                "weight_decay": self.args.weight_decay,
                "lr": self.tower_lr,
            },
        ]
        cls, kw = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = cls(groups, **kw)
        return self.optimizer


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
    tune: Mapping[str, Any] | None = None,
    stamp: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one stage; returns losses, throughput and where the result was saved. `stamp` is written into
    every checkpoint (`STAMP_FILE`)."""
    out_dir = Path(out_dir)
    trainable = set_trainable(model, stage, lora, tune)
    log.info(
        "stage %d: %d trainable tensors (%.2f M parameters)",
        stage,
        len(trainable),
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    meter = ThroughputLog()
    targs = training_arguments(out_dir, args)
    tuned = model.config_dict.get("tuned_encoder") if tune is not None else None
    trainer = TowerTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=CountingCollator(model, meter),
        callbacks=[meter, *([CheckpointStamp(stamp)] if stamp else [])],
        tower_lr=tuned["learning_rate"] if tuned else None,
    )
    result = trainer.train(resume_from_checkpoint=resume or None)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if stage == 1:
        # the template is recorded: caption-likelihood A scores captions exactly as this stage labelled them
        adapter_cfg = {**model.config_dict["adapter"], "stage": 1, "template": model.template}
        saved = save_adapter(model.adapter, out_dir / "adapter", adapter_cfg)
    else:
        saved = model.save_pretrained(out_dir / "model")
    return {
        "losses": history,
        "tokens_per_second": meter.tokens_per_second(),
        "saved": str(saved),
        "train_runtime": result.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
    }


def generate_batch(
    model: VisionLanguageModel,
    images: list[torch.Tensor | None],
    prompts: list[str],
    max_new_tokens: int = 32,
    aspect: str | None = None,
) -> list[str]:
    """Answer one prompt per image (None for text-only), batched with left padding, greedy."""
    return generate_answers(model, images, prompts, {"max_new_tokens": max_new_tokens}, aspect=aspect)
