"""A tiny language model for the demo and the tests: a BPE tokenizer trained on the generated benchmark's
text, a small random Llama (or T5) saved with `save_pretrained`, and a short text pretraining with the
`Trainer`, so the demo's MLLM starts from a pretrained LLM as real ones do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
    "{% else %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int = 600) -> Any:
    """A byte-level BPE tokenizer trained in milliseconds with `tokenizers`, with <image> as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def default_corpus() -> list[str]:
    """Text like the generated benchmark's captions and conversations, for the tiny tokenizer."""
    from vrlab.data.scenes import COLOURS, SHAPES
    from vrlab.mllm.conversation import VICUNA_SYSTEM

    words = [
        f"A drawing of a {c} {s}. A photo of a {c} {s}. What colour is the {s}? It is {c}."
        for s in SHAPES
        for c in COLOURS
    ]
    return [
        *words,
        VICUNA_SYSTEM,
        "USER: What is in the image? ASSISTANT: There are two shapes. How many shapes are there?",
        "There is one shape. There are three shapes. Name a shape with three corners. A triangle.",
    ] * 3


def build_llm(folder: Path, corpus: list[str] | None = None, kind: str = "llama", hidden: int = 64) -> Path:
    """A tiny randomly initialised LLM (`llama` causal or `t5` seq2seq) and its tokenizer, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tok = train_tokenizer(corpus or default_corpus())
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=hidden * 2,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                **ids,
            )
        )
    elif kind == "t5":
        model = T5ForConditionalGeneration(
            T5Config(
                vocab_size=len(tok),
                d_model=hidden,
                d_kv=16,
                d_ff=hidden * 2,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=tok.pad_token_id,
                **ids,
            )
        )
    else:
        raise KeyError(f"unknown tiny LLM kind '{kind}'; choose llama or t5")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def llava_texts(llava_root: str | Path) -> list[str]:
    """Captions and `vicuna_v1`-formatted conversations (placeholders dropped) of a generated LLaVA JSON folder."""
    from vrlab.mllm.conversation import IMAGE_TOKEN, vicuna_text

    root = Path(llava_root)
    texts = [s["conversations"][1]["value"] for s in json.loads((root / "captions.json").read_text())]
    for s in json.loads((root / "conversations.json").read_text()):
        turns = [{**t, "value": t["value"].replace(IMAGE_TOKEN, "").strip()} for t in s["conversations"]]
        texts.append(vicuna_text(turns))
    return texts


def reading_texts(llava_root: str | Path) -> list[str]:
    """Each image's one-word questions (`qa.json`) as `vicuna_v1` text with the scene's caption where the image
    goes: text pretraining that teaches the LLM to answer from a prefix, which the image takes in stage 2."""
    from vrlab.mllm.conversation import IMAGE_TOKEN, vicuna_text

    root = Path(llava_root)
    caption = {s["image"]: s["conversations"][1]["value"] for s in json.loads((root / "captions.json").read_text())}
    qa = root / "qa.json"
    if not qa.is_file():
        raise FileNotFoundError(2, "no qa.json: regenerate the benchmark (vrlab task=make_benchmark)", str(qa))
    texts = []
    for s in json.loads(qa.read_text()):
        turns = [{**t, "value": t["value"].replace(IMAGE_TOKEN, caption[s["image"]])} for t in s["conversations"]]
        texts.append(vicuna_text(turns))
    return texts


def pretrain_llm(
    folder: str | Path,
    texts: list[str],
    steps: int = 150,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """Language-model pretraining of a tiny LLM on `texts` (the Trainer, causal LM loss), saved in place.

    Real MLLMs start from a pretrained LLM; a random one gives the adapter nothing to steer.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    data = [
        {"input_ids": [tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids, tok.eos_token_id]}
        for t in texts
    ]
    args = TrainingArguments(
        output_dir=str(folder / ".pretrain"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    model.save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / ".pretrain", ignore_errors=True)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
