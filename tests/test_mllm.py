"""VisionLanguageModel: splicing and label masking token by token, every adapter's shapes and gradients,
stage-1 learning, freezing, resume, save/load, TG-LLaVA's zero start, batched generation, and bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import task_args

from vrlab.checkpoint import save_adapter
from vrlab.data.loaders import LlavaJsonLoader
from vrlab.data.synthetic import write_llava
from vrlab.demo.tiny_llm import build_llm, default_corpus, llava_texts, pretrain_llm
from vrlab.errors import ShapeError, VrlabError
from vrlab.mllm.conversation import IGNORE_INDEX, IMAGE_TOKEN, tokenize
from vrlab.mllm.data import Collator, ConversationDataset
from vrlab.mllm.inference import caption_likelihood
from vrlab.mllm.model import VisionLanguageModel, load_llm
from vrlab.mllm.train import generate_batch, train

QF = {"type": "qformer", "num_queries": 4, "hidden": 32, "layers": 2, "heads": 4}
TG = {"type": "tg", "hidden": 32, "heads": 4}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """32 generated caption/conversation samples in LLaVA JSON."""
    root = tmp_path_factory.mktemp("llava")
    write_llava(root, np.random.default_rng(0), 32, (96, 128))
    return root


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, llava):
    """A tiny Llama whose tokenizer is trained on the generated text, pretrained on it as a language model."""
    folder = tmp_path_factory.mktemp("llm") / "llama"
    texts = llava_texts(llava)
    build_llm(folder, corpus=texts + default_corpus())
    pretrain_llm(folder, texts, steps=120)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_llm(tmp_path_factory.mktemp("t5") / "t5", kind="t5")


@pytest.fixture(scope="module")
def text_tower(tiny_root):
    return {
        "source": str(tiny_root / "models" / "sd"),
        "model_subfolder": "text_encoder",
        "tokenizer_subfolder": "tokenizer",
    }


def make(registry_dirs, llm, adapter, encoder="tiny/clip", **kw):
    torch.manual_seed(0)
    return VisionLanguageModel.build(
        encoder, str(llm), adapter, registry_cfg={"encoder_dirs": registry_dirs}, **kw
    )


@pytest.fixture
def dirs(tiny_root):
    return [str(tiny_root / "cards")]


def batch_of(model, llava, file="conversations.json", n=3, indices=None):
    ds = ConversationDataset(LlavaJsonLoader(llava, file), model)
    return Collator(model)([ds[i] for i in (indices or range(n))])


# --- splicing ---------------------------------------------------------------------------------------------
def test_splicing_and_labels_token_by_token(dirs, llm_dir, llava):
    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"}).eval()
    tok = model.tokenizer
    convs = [
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    ids, labels = tokenize(convs, "vicuna_v1", tok, has_image=True)
    ids, labels = model.expand_placeholder(ids, labels)
    n = model.num_vision_tokens
    assert n == 16
    pos = [i for i, t in enumerate(ids) if t == model.image_token_id]
    assert len(pos) == n and pos == list(range(pos[0], pos[0] + n))  # one contiguous block
    # The placeholder moved to the front of its turn, right after "USER: ".
    prefix = tok.decode(ids[: pos[0]])
    assert prefix.endswith("USER: ") and "What is shown?" in tok.decode(ids[pos[-1] + 1 :])
    # Labels: only the two answers (with </s>) are supervised, token for token.
    answers = [
        tok(" A red circle.</s>", add_special_tokens=False).input_ids,
        tok(" Red.</s>", add_special_tokens=False).input_ids,
    ]
    supervised = [(i, t) for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert [t for _, t in supervised] == answers[0] + answers[1]
    assert all(ids[i] == t for i, t in supervised)
    # Embeddings: vision tokens exactly at the placeholder block, the LLM's embeddings elsewhere.
    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    pixels = model.image_input(image).unsqueeze(0)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = model.embed(input_ids, pixels, torch.tensor([True]))
        vision = model.encode_images(pixels)
        table = model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[0, pos], vision[0])
    other = [i for i in range(len(ids)) if i not in pos]
    assert torch.equal(embeds[0, other], table[input_ids[0, other]])


@pytest.mark.parametrize("template", ["plain", "chat_template"])
def test_other_templates_mask_everything_but_answers(dirs, llm_dir, template):
    model = make(dirs, llm_dir, {"type": "linear"})
    convs = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A blue ring."}]
    _, labels = tokenize(convs, template, model.tokenizer, has_image=True)
    kept = model.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert kept.strip().startswith("A blue ring.") and "Describe" not in kept and IMAGE_TOKEN not in kept


# A ChatML template that adds a system prompt when the conversation has none, as Qwen2.5's does.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chatml_template_with_a_default_system_prompt_labels_only_the_answers(dirs, llm_dir):
    model = make(dirs, llm_dir, {"type": "linear"})
    tok = model.tokenizer
    tok.chat_template = CHATML
    convs = [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "A blue ring."},
        {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Blue."},
    ]
    ids, labels = tokenize(convs, "chat_template", tok, has_image=True)
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in convs],
        tokenize=False,
    )
    answers = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(answers) == "A blue ring.<|im_end|>\nBlue.<|im_end|>\n"
    prompt, _ = tokenize(convs[:1], "chat_template", tok, has_image=True, generation=True)
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert "You are a helpful assistant." in tok.decode(prompt)


@pytest.mark.parametrize(
    ("convs", "has_image", "message"),
    [
        (
            [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}],
            True,
            "no '<image>' placeholder",
        ),
        (
            [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}],
            True,
            "2 '<image>' placeholders",
        ),
        (
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
            False,
            "placeholder but no image",
        ),
        (
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}],
            True,
            "appears in an answer",
        ),
    ],
)
def test_placeholder_errors_name_the_sample(dirs, llm_dir, convs, has_image, message):
    model = make(dirs, llm_dir, {"type": "linear"})
    with pytest.raises(VrlabError, match=rf"sample 's7'.*{message}|{message}"):
        tokenize(convs, "vicuna_v1", model.tokenizer, has_image, sample_id="s7")


# --- adapters ----------------------------------------------------------------------------------------------
ADAPTER_CASES = [
    (a, e)
    for a in ({"type": "linear"}, {"type": "mlp2x_gelu"}, QF, TG)
    for e in ("tiny/clip", "tiny/clip.tiny/dinov2")
]
ADAPTER_CASES.append(
    ({**TG, "detail": True, "detail_latents": 4}, "tiny/clip")
)  # the detail branch tiles one encoder


@pytest.mark.parametrize(("adapter", "encoder"), ADAPTER_CASES)
def test_adapter_shapes_and_gradients(dirs, llm_dir, llava, text_tower, adapter, encoder):
    model = make(dirs, llm_dir, adapter, encoder=encoder, text_tower=text_tower)
    batch = batch_of(
        model, llava, n=2, indices=[0, len(json.loads((llava / "conversations.json").read_text())) - 1]
    )
    assert batch["has_image"].tolist() == [True, False]  # one text-only sample in the batch
    out = model(**batch)
    width = model.llm.config.hidden_size
    vision = model.encode_images(
        batch["pixel_values"],
        batch.get("guide_ids", None)[:1] if "guide_ids" in batch else None,
        batch.get("guide_mask", None)[:1] if "guide_mask" in batch else None,
    )
    expected_tokens = {"qformer": 4}.get(adapter["type"], 16) + (4 if adapter.get("detail") else 0)
    assert vision.shape == (1, expected_tokens, width) == (1, model.num_vision_tokens, width)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    grads = [p.grad for p in model.adapter.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen, no graph through it


def test_tg_at_initialisation_equals_the_model_without_it(dirs, llm_dir, llava, text_tower):
    tg = make(dirs, llm_dir, TG, text_tower=text_tower).eval()
    plain = make(dirs, llm_dir, {"type": "mlp2x_gelu"}).eval()
    plain.llm.load_state_dict(tg.llm.state_dict())
    plain.adapter.net.load_state_dict(tg.adapter.projector.state_dict())
    b_tg, b_plain = batch_of(tg, llava), batch_of(plain, llava)
    assert torch.equal(b_tg["input_ids"], b_plain["input_ids"])
    with torch.no_grad():
        assert torch.equal(tg(**b_tg).logits, plain(**b_plain).logits)
        tg.adapter.zero.weight.normal_()  # once trained, the guidance changes the outputs
        assert not torch.equal(tg(**b_tg).logits, plain(**b_plain).logits)


def siglip_text_tower(folder, width=24, length=16):
    """A tiny full SigLIP checkpoint (as google/siglip-* are) with its own small tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    words = ["<pad>", "</s>", "<unk>", "what", "colour", "is", "the", "circle", "square", "shape", "?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    text = dict(
        vocab_size=32,
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=length,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_tg_guides_with_a_siglip_text_tower(dirs, llm_dir, llava, tmp_path):
    from transformers import SiglipTextModel

    folder = siglip_text_tower(tmp_path / "siglip")
    model = make(dirs, llm_dir, TG, text_tower={"source": str(folder)}).eval()
    assert type(model.guide_model).__name__ == "SiglipTextModel"
    assert model.config_dict["adapter"]["text_dim"] == 24  # read from the tower, not assumed
    batch = batch_of(model, llava)
    assert batch["guide_ids"].shape[1] == 16 and bool(
        batch["guide_mask"].all()
    )  # SigLIP's max_length padding
    ids = model.guide_tokenizer(
        ["what colour is the circle ?"], padding="max_length", max_length=16
    ).input_ids
    assert model.tokenize_guide(["what colour is the circle ?"])[0].tolist() == ids
    reference = SiglipTextModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = reference(input_ids=torch.tensor(ids)).pooler_output
        ours = model.guide_model(input_ids=torch.tensor(ids)).pooler_output
        assert torch.allclose(pooled, ours)
        model.adapter.zero.weight.normal_()
        out = model(**batch).logits
        other = dict(batch, guide_ids=model.tokenize_guide(["square"] * 3)[0])
        assert not torch.allclose(out, model(**other).logits)  # the guide text matters
    saved = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "vlm"))
    assert type(saved.guide_model).__name__ == "SiglipTextModel"


def test_a_text_tower_that_is_not_clip_or_siglip_is_refused(dirs, llm_dir):
    with pytest.raises(VrlabError, match="is a llama model; TG-LLaVA's guide takes CLIP, SigLIP or SigLIP 2"):
        make(dirs, llm_dir, TG, text_tower={"source": str(llm_dir)})


def test_seq2seq_llm_gets_vision_tokens_in_its_encoder(dirs, t5_dir, llava):
    model = make(dirs, t5_dir, QF, encoder="tiny/clip.tiny/dinov2")
    batch = batch_of(model, llava, n=2)
    assert "decoder_labels" in batch and (batch["labels"] == IGNORE_INDEX).all()
    out = model(**batch)
    assert out.logits.shape[:2] == batch["decoder_labels"].shape
    out.loss.backward()
    answers = generate_batch(
        model.eval(), [torch.randint(0, 255, (3, 30, 30), dtype=torch.uint8)], ["What?"], 5
    )
    assert isinstance(answers[0], str)


# --- training ----------------------------------------------------------------------------------------------
def stage_args(**kw):
    return {
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "lr_scheduler_type": "constant",
        "seed": 0,
        "disable_tqdm": True,
        **kw,
    }


def caption_loss(model, llava, shuffle):
    ds = ConversationDataset(LlavaJsonLoader(llava, "captions.json"), model)
    items = [ds[i] for i in range(len(ds))]
    if shuffle:
        pixels = [it["pixels"] for it in items]
        for it, p in zip(items, pixels[1:] + pixels[:1], strict=True):
            it["pixels"] = p
    with torch.no_grad():
        return float(model.eval()(**Collator(model)(items)).loss)


def test_stage1_lowers_the_loss_and_uses_the_image(dirs, llm_dir, llava, tmp_path):
    # 64 px (8x8 tokens) instead of the card's 32 px: a random encoder needs the resolution to tell scenes apart.
    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"}, template="plain", encoder_args={"image_size": 64})
    dataset = ConversationDataset(LlavaJsonLoader(llava, "captions.json"), model)
    every = list(range(len(dataset)))
    untrained = caption_likelihood(model.eval(), dataset, every, progress=False)["A"]
    result = train(model, dataset, tmp_path, 1, stage_args(num_train_epochs=20))
    # caption-likelihood A: the trained stage-1 model finds its captions likelier than its untrained start
    assert caption_likelihood(model.eval(), dataset, every, progress=False)["A"] > untrained + 0.5
    losses = result["losses"]
    assert len(losses) == 80
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    # The adapter carries image information: captions are likelier with their own image than a shuffled one.
    matched, shuffled = caption_loss(model, llava, shuffle=False), caption_loss(model, llava, shuffle=True)
    # Random tiny encoders carry little about a scene (about 0.04 nats here); the direction must still hold.
    assert matched < shuffled
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["type"] == "mlp2x_gelu" and saved["in_dim"] == 64 and saved["encoder"] == "tiny/clip"
    assert saved["template"] == "plain"  # what caption-likelihood A scores with


# --- caption-likelihood A (the Law paper's published A) ------------------------------------------------
def test_caption_likelihood_equals_a_hand_computation_and_minus_the_loss(dirs, llm_dir, llava):
    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"}, template="plain").eval()
    loader = LlavaJsonLoader(llava, "captions.json")
    dataset = ConversationDataset(loader, model)
    indices = [0, 3, 4, 9, 17]
    result = caption_likelihood(model, dataset, indices, batch_size=2, progress=False)
    # By hand, one pair at a time (no padding): the caption and its separator end the sequence.
    total, count = 0.0, 0
    for i in indices:
        item = dataset[i]
        batch = Collator(model)([item])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0].double()
        caption = loader.samples[i]["conversations"][1]["value"]
        target = model.tokenizer(caption + "\n", add_special_tokens=False).input_ids
        ids = batch["input_ids"][0].tolist()
        length, n = len(ids), len(target)
        assert ids[length - n :] == target
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        total += sum(float(logp[length - n - 1 + j, target[j]]) for j in range(n))
        count += n
        assert result["per_pair"][loader.samples[i]["id"]]["tokens"] == n
    assert result["A"] == pytest.approx(total / count, rel=1e-5) and result["n_tokens"] == count
    # The pairs as one batch, labels on the captions only: A is minus the stage-1 loss.
    with torch.no_grad():
        loss = float(model(**Collator(model)([dataset[i] for i in indices])).loss)
    assert result["A"] == pytest.approx(-loss, rel=1e-5)


@pytest.mark.parametrize("mode", ["stage1", "stage2", "lora"])
def test_only_the_intended_parameters_change(dirs, llm_dir, llava, tmp_path, mode):
    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = ConversationDataset(LlavaJsonLoader(llava, "conversations.json"), model)
    stage = 1 if mode == "stage1" else 2
    train(
        model,
        dataset,
        tmp_path,
        stage,
        stage_args(max_steps=3, learning_rate=1e-3),
        lora={"r": 4, "alpha": 8, "dropout": 0.0} if mode == "lora" else None,
    )
    # peft renames wrapped weights (llm.base_model.model.<name>, .base_layer); map them back to compare.
    after = {
        k.replace("llm.base_model.model.", "llm.").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
    }
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    groups = {k.split(".")[0] for k in changed}
    assert "encoder" not in groups
    assert "adapter" in groups
    assert ("llm" in groups) == (mode == "stage2")  # LoRA leaves the base LLM weights untouched
    if mode == "lora":
        lora = [k for k in model.state_dict() if "lora_" in k]
        after = model.state_dict()
        assert lora and any(not torch.all(after[k] == 0) for k in lora if "lora_B" in k)


def test_resume_continues_with_the_same_losses(dirs, llm_dir, llava, tmp_path):
    def run(out, max_steps, resume=None):
        model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
        ds = ConversationDataset(LlavaJsonLoader(llava, "conversations.json"), model)
        args = stage_args(
            max_steps=max_steps, save_strategy="steps", save_steps=3, per_device_train_batch_size=4
        )
        return train(model, ds, out, 1, args, resume=resume)["losses"]

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 3)
    resumed = run(tmp_path / "part", 6, resume=str(tmp_path / "part" / "trainer" / "checkpoint-3"))
    assert len(full) == 6
    np.testing.assert_allclose(resumed[-3:], full[3:], rtol=1e-5)


def test_from_pretrained_round_trip_gives_identical_logits(dirs, llm_dir, llava, tmp_path, text_tower):
    for adapter in ({"type": "mlp2x_gelu"}, TG):
        model = make(dirs, llm_dir, adapter, encoder="tiny/clip.tiny/dinov2", text_tower=text_tower).eval()
        with torch.no_grad():
            model.adapter.state_dict()[next(iter(model.adapter.state_dict()))].add_(
                0.1
            )  # not the initial weights
        model.save_pretrained(tmp_path / adapter["type"])
        loaded = VisionLanguageModel.from_pretrained(tmp_path / adapter["type"])
        batch = batch_of(model, llava)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_batched_generation_equals_per_sample(dirs, llm_dir, photo_files):
    from vrlab.data.images import decode_image

    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"}).eval()
    images = [decode_image(p) for p in photo_files[:3]] + [None]
    prompts = ["What is in the image?", "How many shapes are there?", "Describe it.", "Name a shape."]
    batched = generate_batch(model, images, prompts, max_new_tokens=8)
    single = [
        generate_batch(model, [im], [p], max_new_tokens=8)[0] for im, p in zip(images, prompts, strict=True)
    ]
    assert batched == single and all(isinstance(a, str) for a in batched)


# --- bad inputs ------------------------------------------------------------------------------------------
def test_adapter_checkpoint_that_does_not_fit_is_refused(dirs, llm_dir, tmp_path):
    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
    other = make(dirs, llm_dir, {"type": "mlp2x_gelu"}, encoder="tiny/eva02-clip")  # 192 wide
    save_adapter(other.adapter, tmp_path / "a", other.config_dict["adapter"])
    with pytest.raises(ShapeError, match=r"expects input width 192 .*'tiny/clip' gives 64"):
        model.load_adapter_checkpoint(tmp_path / "a")


def test_llm_without_pad_token_pads_with_eos(tmp_path, llm_dir, caplog):
    from transformers import AutoTokenizer

    folder = tmp_path / "nopad"
    tok = AutoTokenizer.from_pretrained(llm_dir)
    tok.pad_token = None
    tok.save_pretrained(folder)
    copy_model = load_llm(str(llm_dir))[0]
    copy_model.save_pretrained(folder)
    _, loaded = load_llm(str(folder))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    assert "no pad token" in caplog.text


def test_missing_image_file_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.json").write_text(json.dumps([{"id": "q1", "image": "gone.png", "conversations": []}]))
    with pytest.raises(VrlabError, match="gone.png"):
        LlavaJsonLoader(tmp_path, "c.json")


@pytest.mark.slow
def test_train_and_generate_tasks_end_to_end(compose_cfg, dirs, llm_dir, data_root, tmp_path):
    from vrlab.cli import run_task

    common = task_args(data_root, dirs[0], llm_dir, small_batches=True)
    s1 = run_task(
        compose_cfg(
            "task=train", "stage=1", "train.data=synth-captions", f"train.out={tmp_path / 's1'}", *common
        )
    )
    s2 = run_task(
        compose_cfg(
            "task=train",
            "stage=2",
            "train.data=synth-conversations",
            f"train.out={tmp_path / 's2'}",
            f"train.init_from={s1['saved']}",
            *common,
        )
    )
    assert Path(s2["saved"], "vlm_config.json").exists() and s1["tokens_per_second"] > 0
    # train.skip_done: the same inputs skip training; a changed stage-1 adapter (new weights) trains again
    stage2 = [
        "task=train",
        "stage=2",
        "train.data=synth-conversations",
        f"train.out={tmp_path / 's2'}",
        f"train.init_from={s1['saved']}",
        "train.skip_done=true",
        *common,
    ]
    model_file = next(Path(s2["saved"]).rglob("*.safetensors"))
    before = model_file.stat().st_mtime_ns
    again = run_task(compose_cfg(*stage2))
    assert again["inputs"] == s2["inputs"] and model_file.stat().st_mtime_ns == before
    weights = next(Path(s1["saved"]).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: counts as new inputs
    retrained = run_task(compose_cfg(*stage2))
    assert retrained["inputs"] != s2["inputs"] and model_file.stat().st_mtime_ns != before
    out = run_task(
        compose_cfg(
            "task=generate",
            f"checkpoint={s2['saved']}",
            f"generate.images=[{data_root / 'synthetic/llava/images'}]",
            "generate.limit=2",
            "generate.max_new_tokens=6",
            *common,
        )
    )
    assert len(out["answers"]) == 2
    # train.tune_encoder from the command line: the tower's last used block trains, the model says so
    tuned = run_task(
        compose_cfg(
            "task=train",
            "stage=2",
            "train.data=synth-conversations",
            f"train.init_from={s1['saved']}",
            "train.tune_encoder=true",
            "train.encoder_tuning.last_blocks=1",
            "+train.stage2.max_steps=2",
            *common,
        )
    )
    assert tuned["saved"] != s2["saved"]  # its own run folder, not the frozen run's
    record = json.loads(Path(tuned["saved"], "vlm_config.json").read_text())["tuned_encoder"]
    assert record["last_blocks"] == 1 and record["learning_rate"] == 2e-6


def test_caption_likelihood_task_and_the_law_table(compose_cfg, dirs, llm_dir, data_root, tmp_path):
    from vrlab.cli import run_task

    common = task_args(data_root, dirs[0], llm_dir)
    s1 = run_task(
        compose_cfg(
            "task=train",
            "stage=1",
            "train.data=synth-captions",
            f"train.out={tmp_path / 's1'}",
            "train.stage1.per_device_train_batch_size=2",
            "train.stage1.num_train_epochs=8",
            "train.stage1.learning_rate=1e-2",
            *common,
        )
    )
    start = make(
        dirs, llm_dir, {"type": "mlp2x_gelu"}
    )  # an untrained stage-1 checkpoint (no template recorded)
    save_adapter(start.adapter, tmp_path / "start", {**start.config_dict["adapter"], "stage": 1})

    def a_of(adapter, label, *extra):
        return run_task(
            compose_cfg(
                "task=alignment",
                "alignment.protocol=caption_likelihood",
                f"alignment.adapter={adapter}",
                f"alignment.label={label}",
                "alignment.n_pairs=4",
                *common,
                *extra,
            )
        )

    trained, untrained = a_of(s1["saved"], "trained"), a_of(tmp_path / "start", "untrained")
    assert trained["A"] > untrained["A"]
    settings = trained["settings"]
    assert trained["protocol"] == "caption_likelihood" and settings["template"] == "plain"
    assert untrained["settings"]["template"] == "plain" and settings["captions"] == "synth-captions"
    assert len(settings["sample_ids"]) == 4 and settings["sample_ids"] == untrained["settings"]["sample_ids"]
    assert settings["checkpoint_digest"] != untrained["settings"]["checkpoint_digest"]
    again = a_of(s1["saved"], "trained")
    assert again["A"] == trained["A"] and again["output"] == trained["output"]
    other = a_of(s1["saved"], "trained-5", "alignment.n_pairs=5", "seed=1")
    assert other["settings"]["sample_ids"] != settings["sample_ids"] and other["output"] != trained["output"]
    Path(other["output"]).unlink()  # another pair sample: the table below would refuse it, by name
    # The law table: one A per representation; a reference-cosine result beside it is refused, by protocol.
    (tmp_path / "scores.csv").write_text("representation,bench\ntrained,50\nuntrained,40\n")
    table = [f"law.scores={tmp_path / 'scores.csv'}", *common]
    built = run_task(compose_cfg("task=law_table", *table))
    assert (
        built["rows"] == 2
        and "A" in built["columns"]
        and not any(c.startswith("A_") for c in built["columns"])
    )
    cosine = Path(trained["output"]).parents[1] / "cosine" / "alignment.json"
    cosine.parent.mkdir()
    cosine.write_text(
        json.dumps({"representation": "r", "protocol": "reference_cosine", "A": {"bench": 0.5}})
    )
    with pytest.raises(
        VrlabError,
        match="mix A protocols.*(caption_likelihood.*reference_cosine|reference_cosine.*caption_likelihood)",
    ):
        run_task(compose_cfg("task=law_table", *table))
    kept = run_task(compose_cfg("task=law_table", "law.alignment_protocol=caption_likelihood", *table))
    assert kept["rows"] == 2


# --- a vision tower trained in stage 2 ---------------------------------------------------------------------
def _tower(model):
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


@pytest.mark.parametrize(
    ("mode", "tune"),
    [
        ("frozen", None),
        ("whole", {"learning_rate": 1e-3}),
        ("last_block", {"learning_rate": 1e-3, "last_blocks": 1}),
        ("lora", {"learning_rate": 1e-3, "lora_r": 4}),
        ("rate_zero", {"learning_rate": 0.0}),
    ],
)
def test_stage2_tunes_the_tower_as_asked_and_reloads_it(dirs, llm_dir, llava, tmp_path, mode, tune):
    from vrlab.mllm.tower import merged_state

    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
    before = _tower(model)
    dataset = ConversationDataset(LlavaJsonLoader(llava, "conversations.json"), model)
    adapter_before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    train(model, dataset, tmp_path, 2, stage_args(max_steps=3, learning_rate=1e-3), tune=tune)
    after = merged_state(model.encoder)
    assert set(after) == set(before)  # LoRA merged back under the tower's own names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the card reads hidden state -2: the last of the tiny CLIP's 3 layers feeds nothing, layer 1 is the last used
    assert not any(".encoder.layers.2." in k for k in changed)
    if mode in ("frozen", "rate_zero"):  # rate 0: the tower's own rate applies, not the LLM's
        assert not changed
    elif mode == "last_block":
        assert changed and all(".encoder.layers.1." in k for k in changed)
        assert not any("embeddings" in k for k in changed)
    else:
        assert any(".encoder.layers.1." in k for k in changed)
        # the whole tower trains its embeddings too; LoRA adapts linear layers only
        assert any("embeddings" in k for k in changed) == (mode == "whole")
    assert any(not torch.equal(adapter_before[k], v) for k, v in model.adapter.state_dict().items())
    saved = model.save_pretrained(tmp_path / "model")
    config = json.loads((saved / "vlm_config.json").read_text())
    adapter_config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    if tune is None:
        assert "tuned_encoder" not in config and not (saved / "encoder").exists()
        return
    assert config["tuned_encoder"]["lora_r"] == (4 if mode == "lora" else 0)
    assert adapter_config["tuned_encoder"] == "../encoder/encoder.safetensors"
    reloaded = VisionLanguageModel.from_pretrained(saved)
    for k, v in reloaded.encoder.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_extraction_with_a_tuned_models_adapter_runs_its_tuned_tower(
    dirs, llm_dir, llava, tmp_path, compose_cfg, data_root
):
    """A on a tuned model is A of its tuned tower: its adapter brings the tower along, into a new store."""
    from vrlab.data.images import decode_image
    from vrlab.extract import run_extraction
    from vrlab.tasks.config import extraction_request

    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
    dataset = ConversationDataset(LlavaJsonLoader(llava, "conversations.json"), model)
    train(model, dataset, tmp_path, 2, stage_args(max_steps=3), tune={"learning_rate": 1e-2})
    saved = model.save_pretrained(tmp_path / "model")
    cfg = compose_cfg(f"registry.encoder_dirs={dirs}", f"paths.data={data_root}", "extract.num_workers=0")
    store = run_extraction(
        extraction_request(cfg, "tiny/clip", "synth-voc-test", limit=2, adapter=str(saved / "adapter"))
    )
    assert store.manifest["settings"]["tuned_tower"]
    reloaded = VisionLanguageModel.from_pretrained(saved)
    item = store.ids[0]
    from vrlab.data.benchmarks import load_benchmark

    bench = load_benchmark("synth-voc-test", data_root, {"encoder_dirs": dirs})
    image = decode_image(next(it.path for it in bench.items if it.id == item))
    with torch.no_grad():
        expected = reloaded.adapter(reloaded.encoder.encode_images([image], dtype="float32").tokens)[0]
        frozen = make(dirs, llm_dir, {"type": "mlp2x_gelu"}).encoder.encode_images([image]).tokens[0]
    torch.testing.assert_close(store.tokens(item).float(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reloaded.encoder.encode_images([image]).tokens[0], frozen)


def test_tuning_a_diffusion_tower_or_past_its_blocks_is_refused(dirs, llm_dir):
    from vrlab.mllm.tower import tune_tower

    with pytest.raises(VrlabError, match="last_blocks=9, but 'tiny/clip' has 2 blocks up to the layer"):
        tune_tower(make(dirs, llm_dir, {"type": "mlp2x_gelu"}).encoder, {"last_blocks": 9})
    with pytest.raises(VrlabError, match="diffusion features are not trained"):
        tune_tower(make(dirs, llm_dir, {"type": "mlp2x_gelu"}, encoder="tiny/sd").encoder, {})
    with pytest.raises(VrlabError, match="stage-2 setting"):
        from vrlab.mllm.train import set_trainable

        set_trainable(make(dirs, llm_dir, {"type": "mlp2x_gelu"}), 1, tune={})


def test_images_follow_the_aspect_policy_the_model_was_trained_with(dirs, llm_dir, photo_files):
    """Every path (training data, generation, scoring, probes) asks `image_input` without a policy and gets
    the model's own; an explicit policy still wins."""
    from vrlab.data.images import decode_image

    model = make(dirs, llm_dir, {"type": "mlp2x_gelu"})
    image = decode_image(photo_files[0])  # not square: pad and resize differ
    assert image.shape[1] != image.shape[2]
    pad, resize = model.image_input(image, "pad"), model.image_input(image, "resize")
    assert not torch.equal(pad, resize)
    assert torch.equal(model.image_input(image), pad)  # nothing recorded: LLaVA-1.5's pad
    model.config_dict["image_aspect_ratio"] = "resize"
    assert torch.equal(model.image_input(image), resize)
    assert torch.equal(model.image_input(image, "pad"), pad)
