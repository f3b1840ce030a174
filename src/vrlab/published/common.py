"""What every published format shares: the formats and their detection, the import options, reading weight
files without unpickling code, and the model config vrlab writes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vrlab.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLM_CONFIG
from vrlab.errors import VrlabError
from vrlab.mllm.conversation import TEMPLATES

FORMATS = ("auto", "vrlab", "vrlab_adapter", "llava", "tg_llava", "llava_stage1", "llava_hf", "llava_next_hf")
MODEL_FORMATS = ("vrlab", "llava", "tg_llava", "llava_hf")
IMPORT_RECORD = "import.json"

# LLaVA's conversation modes (`--conv-mode`, `--version`) -> vrlab's templates. Modes built on the LLM's own
# chat format map to `chat_template` (the tokenizer's), which is how the LLM's authors wrote that format.
CONV_MODES = {
    "plain": "plain",
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "vicuna_v1_1": "vicuna_v1",
    "llava_v1": "vicuna_v1",
    "llava_llama_3": "chat_template",
    "llama_3": "chat_template",
    "llava_llama_2": "chat_template",
    "llama_2": "chat_template",
    "mistral_instruct": "chat_template",
    "chatml_direct": "chat_template",
    "qwen_1_5": "chat_template",
    "qwen_2": "chat_template",
}
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_SHARDS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass(frozen=True)
class ImportOptions:
    """What a published checkpoint does not say, or what the user overrides (the `import` config section)."""

    format: str = "auto"
    tower: str | None = None  # registry name of the vision tower, instead of the config's mm_vision_tower
    text_tower: Any = None  # TG-LLaVA: the CLIP text tower (an id, or {source, model_subfolder, ...})
    template: str | None = None  # a vrlab template or a LLaVA conv mode; default vicuna_v1 (stage 2)
    qformer_heads: int = 16  # TG-LLaVA: heads of mm_cross_attn's Q-Former (bert-large's; not in the weights)
    registry: Mapping[str, Any] = field(default_factory=dict)
    compose: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None, **extra: Any) -> ImportOptions:
        known = {k: v for k, v in dict(section or {}).items() if k in cls.__dataclass_fields__}
        return cls(**{**known, **extra})


# --- reading ----------------------------------------------------------------------------------------------
def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors: safetensors, or a `.bin` state dict through `torch.load(weights_only=True)`."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses classes and callables
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise VrlabError(
            f"{path} holds objects other than tensors, so vrlab does not load it (it reads .bin weights "
            f"with torch.load(weights_only=True), which never runs code): {reason}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise VrlabError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise VrlabError(
            f"{path} is not a plain state dict: entry '{bad[0][0]}' is a {bad[0][1]}, not a tensor"
        )
    return dict(obj)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VrlabError(f"{path} is not valid JSON: {exc}") from exc


def llm_shards(folder: Path) -> list[Path]:
    for index in _SHARD_INDEXES:
        if (folder / index).is_file():
            files = sorted(set(read_json(folder / index).get("weight_map", {}).values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise VrlabError(f"{folder / index} lists shard(s) {missing} that are not in {folder}")
            return [folder / f for f in files]
    single = [folder / f for f in _SINGLE_SHARDS if (folder / f).is_file()]
    if single:
        return single[:1]
    return sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin"))


def detect_format(path: str | Path) -> str:
    """The format of a checkpoint folder (or an `mm_projector.bin` file); an error says what was looked for."""
    path = Path(path)
    if not path.exists():
        raise VrlabError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name.endswith(".bin") or path.suffix == ".safetensors":
            return "llava_stage1"
        raise VrlabError(f"{path} is a file; a checkpoint is a folder (or LLaVA's mm_projector.bin)")
    if (path / VLM_CONFIG).is_file():
        return "vrlab"
    if (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file():
        return "vrlab_adapter"
    config = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    arch = " ".join(config.get("architectures") or [])
    if "LlavaNext" in arch or config.get("model_type") == "llava_next":
        return "llava_next_hf"
    if "vision_config" in config and "text_config" in config and config.get("model_type") == "llava":
        return "llava_hf"
    if (path / "non_lora_trainables.bin").is_file():
        raise VrlabError(
            f"{path} is a LLaVA LoRA folder (adapter_model + non_lora_trainables.bin): merge it into its base "
            "model first (peft's merge_and_unload, as LLaVA's builder does) and import the merged folder"
        )
    if "mm_vision_tower" in config or (path / "mm_projector.bin").is_file():
        if not llm_shards(path):
            return "llava_stage1"
        return "tg_llava" if "mm_text_tower" in config else "llava"
    raise VrlabError(
        f"{path} is not a checkpoint vrlab knows: no {VLM_CONFIG} (vrlab model), {ADAPTER_CONFIG} (vrlab "
        "adapter), config.json with mm_vision_tower (LLaVA) or with vision_config (Hugging Face Llava), "
        "nor mm_projector.bin (a LLaVA stage-1 folder)"
    )


def file_digests(paths: list[Path], root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(set(paths)):
        digest = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[str(p.relative_to(root)) if p.is_relative_to(root) else p.name] = digest.hexdigest()
    return out


# --- the pieces ---------------------------------------------------------------------------------------------
def template_name(options: ImportOptions, default: str) -> str:
    name = options.template or default
    if name in TEMPLATES:
        return name
    if name in CONV_MODES:
        return CONV_MODES[name]
    raise VrlabError(
        f"import.template='{name}' is neither a vrlab template {list(TEMPLATES)} nor a LLaVA conv mode "
        f"vrlab maps ({sorted(CONV_MODES)})"
    )


def aspect_policy(value: Any, where: str) -> str:
    if value in (None, "", "square", "resize"):
        return "resize"
    if value == "pad":
        return "pad"
    raise VrlabError(
        f"{where}: image_aspect_ratio='{value}' (AnyRes tiling) needs per-image token counts, which vrlab "
        "does not support yet; only 'pad' and 'square' are imported"
    )


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (with or without LLaVA's leading `model.`), renamed without it."""
    out = {}
    for key, value in state.items():
        for p in (f"model.{prefix}.", f"{prefix}."):
            if key.startswith(p):
                out[key[len(p) :]] = value
    return out


def model_config(
    encoder: Any, adapter_cfg: Mapping[str, Any], template: str, aspect: str, text_tower: Mapping[str, Any]
) -> dict[str, Any]:
    """`vlm_config.json` as `VisionLanguageModel.build` would write it, plus the image policy LLaVA recorded."""
    return {
        "encoder": encoder.card.to_dict(),
        "llm": "llm",
        "adapter": dict(adapter_cfg),
        "template": template,
        "freeze_encoder": True,
        "text_tower": dict(text_tower),
        "compose": {},
        "trust_remote_code": False,
        "image_aspect_ratio": aspect,
    }
