"""LLM2CLIP: the bidirectional LLM text encoder, both losses against hand computations, the released adapter's
names and size, released-layout folders loaded without remote code, the caption store, and both stages
(the CLIP stage's loss falls and retrieval on the generated captions beats the untrained adapter)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vrlab.data.benchmarks import load_benchmark
from vrlab.demo.tiny_llm import build_llm, default_corpus
from vrlab.errors import VrlabError
from vrlab.llm2clip.losses import clip_loss, hard_negative_nll
from vrlab.llm2clip.model import LLM2CLIPModel, TextAdaptor
from vrlab.llm2clip.text import LLMTextEncoder, bidirectional, bidirectional_mask


@pytest.fixture(scope="module")
def llm(tmp_path_factory, data_root):
    captions = json.loads((data_root / "synthetic" / "captions" / "captions.json").read_text())
    corpus = default_corpus() + [c for r in captions for c in r["caption"]]
    torch.manual_seed(0)
    return build_llm(tmp_path_factory.mktemp("llm") / "llama", corpus=corpus, hidden=32)


def test_the_encoder_attends_both_ways_and_the_model_stays_causal_outside_it(llm):
    enc = LLMTextEncoder(llm)
    batch = enc.tokenize(["a red circle at the top left of the picture"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 7) % len(enc.tokenizer)
    first = torch.zeros_like(mask)
    first[0, 0] = 1  # pool token 0 alone: its hidden state

    with torch.no_grad():
        a, b = enc(ids, mask, first), enc(changed, mask, first)
        assert (a - b).abs().max() > 1e-4  # token 0 sees token 3
        # the same model with a plain 2D mask, outside the encoder: causal, token 0 sees only itself
        c = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]
        d = enc.model(input_ids=changed, attention_mask=mask).last_hidden_state[0, 0]
        assert torch.allclose(c, d, atol=1e-6)
        assert all(m.is_causal for m in enc.model.modules() if hasattr(m, "is_causal"))
        # inside the context with the 4D mask: exactly what the encoder pooled
        with bidirectional([m for m in enc.model.modules() if hasattr(m, "is_causal")]):
            e = enc.model(input_ids=ids, attention_mask=bidirectional_mask(mask, torch.float32))
        assert torch.allclose(e.last_hidden_state[0, 0], a[0], atol=1e-6)


def test_mean_pooling_covers_the_caption_and_closing_token_only_and_ignores_padding(llm):
    enc = LLMTextEncoder(llm)
    texts = ["a blue square", "a photo with a textured background showing two shapes"]
    batch = enc.tokenize(texts, ["Given a sentence, retrieve a detailed relevant sentence", ""])
    for i, text in enumerate(texts):
        n = len(enc.tokenizer(text + enc.tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        assert batch["embed_mask"][i].tolist() == [0] * (batch["embed_mask"].shape[1] - n) + [1] * n
    # left padding and batch composition do not change a text's embedding (pad keys are masked)
    alone = enc.encode(texts[:1], batch_size=1)
    together = enc.encode(texts, batch_size=2)[:1]
    assert torch.allclose(alone, together, atol=1e-5)
    # hand-computed mean over the masked positions
    with torch.no_grad():
        one = enc.tokenize(texts[:1])
        with bidirectional([m for m in enc.model.modules() if hasattr(m, "is_causal")]):
            hidden = enc.model(
                input_ids=one["input_ids"],
                attention_mask=bidirectional_mask(one["attention_mask"], torch.float32),
            ).last_hidden_state[0]
    keep = one["embed_mask"][0].bool()
    assert torch.allclose(alone[0], hidden[keep].mean(0), atol=1e-5)


def test_hard_negative_nll_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(4, 6, generator=g) for _ in range(3))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    docs = np.concatenate([unit(p.numpy()), unit(n.numpy())])
    want = 0.0
    for i in range(4):
        s = 50.0 * unit(q.numpy())[i] @ docs.T
        want += -(s[i] - np.log(np.exp(s - s.max()).sum()) - s.max())
    assert hard_negative_nll(q, p, n) == pytest.approx(want / 4, rel=1e-5)
    assert hard_negative_nll(q, p, n, scale=1.0) != pytest.approx(want / 4, rel=1e-3)


def test_clip_loss_equals_a_hand_computation():
    from sklearn.metrics import log_loss

    g = torch.Generator().manual_seed(1)
    v, u = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    scale = torch.tensor(1 / 0.07)
    vn, un = (x / x.norm(dim=1, keepdim=True) for x in (v, u))
    logits = (scale * vn @ un.T).numpy().astype(np.float64)

    def ce(z):
        p = np.exp(z - z.max(1, keepdims=True))
        return log_loss(np.arange(5), p / p.sum(1, keepdims=True), labels=np.arange(5))

    assert float(clip_loss(v, u, scale)) == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)


def released_names(blocks=4):
    names = []
    for i in range(blocks):
        names += [f"text.text_adaptor.{i}.ln.{w}" for w in ("weight", "bias")]
        names += [f"text.text_adaptor.{i}.fn.{j}.{w}" for j in (0, 3) for w in ("weight", "bias")]
    return names + [f"text.text_adaptor.{blocks + k}.{w}" for k in (0, 1) for w in ("weight", "bias")]


def test_the_adapter_has_the_released_size():
    # the released TextProj: 273.8 M parameters for a 4096-wide LLM, 69.8 M for a 2048-wide one (1280 out)
    with torch.device("meta"):
        for width, millions in ((4096, 273.8), (2048, 69.8)):
            n = sum(p.numel() for p in TextAdaptor(width, 1280).parameters())
            assert round(n / 1e6, 1) == millions


def test_the_released_adapter_names_round_trip(tiny_root, tmp_path):
    registry = {"encoder_dirs": [str(tiny_root / "cards")]}
    model = LLM2CLIPModel.build("tiny/clip", 8, 6, registry_cfg=registry)
    assert sorted(k for k in model.state_dict() if k.startswith("text.")) == sorted(released_names())
    g = torch.Generator().manual_seed(2)
    released = {
        k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items() if k.startswith("text.")
    }
    released["vision_model.post_layernorm.weight"] = torch.ones(3)  # other tensors of a released file
    save_file(released, tmp_path / "released.safetensors")
    from safetensors.torch import load_file

    model.load_released_adapter(load_file(tmp_path / "released.safetensors"))
    for k, v in released.items():
        if k.startswith("text."):
            assert torch.equal(model.state_dict()[k], v)
    again = LLM2CLIPModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(VrlabError, match="text_adaptor"):
        model.load_released_adapter({"visual.head.weight": torch.ones(1)})
    wrong = LLM2CLIPModel.build("tiny/clip", 16, 6, registry_cfg=registry)
    with pytest.raises(VrlabError, match="widths"):
        wrong.load_released_adapter(released)


def test_a_released_layout_llm_loads_as_a_plain_llama_without_remote_code(llm, tmp_path):
    import shutil

    folder = tmp_path / "cc-finetuned"
    shutil.copytree(llm, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "architectures": ["LlamaEncoderModel"],
        "auto_map": {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"},  # a file that does not exist
    }
    (folder / "config.json").write_text(json.dumps(config))
    enc = LLMTextEncoder(folder)
    assert type(enc.model).__name__ == "LlamaModel"
    assert not any("modeling_llama_encoder" in m for m in sys.modules)
    texts = ["a green cross", "an orange ring at the top"]
    assert torch.allclose(enc.encode(texts), LLMTextEncoder(llm).encode(texts), atol=1e-6)


def test_caption_embeddings_are_stored_once_and_change_with_the_captions(llm, tmp_path):
    from vrlab.llm2clip.train import embed_captions

    enc = LLMTextEncoder(llm)
    captions = ["a red circle", "a blue ring", "a green cross"]
    ids = ["a#0", "a#1", "b#0"]
    store = embed_captions(enc, captions, ids, tmp_path, str(llm), shard_size=2)
    assert torch.allclose(store.load("pooled"), enc.encode(captions), atol=1e-6)
    stamp = (store.path / "manifest.json").stat().st_mtime_ns
    again = embed_captions(enc, captions, ids, tmp_path, str(llm), shard_size=2)
    assert again.path == store.path and (store.path / "manifest.json").stat().st_mtime_ns == stamp
    other = embed_captions(enc, [*captions[:2], "a green square"], ids, tmp_path, str(llm), shard_size=2)
    assert other.path != store.path


def test_the_text_stage_trains_a_lora_and_saves_a_plain_llm(llm, tmp_path):
    from vrlab.llm2clip.train import CaptionTriplets, train_text_stage

    pairs = [
        ("a red circle.", "a flat drawing of a red circle at the left."),
        ("a blue ring.", "a photo of a blue ring."),
    ]
    pairs += [("a green cross.", "a flat drawing showing a green cross at the top right.")]
    data = CaptionTriplets(pairs, seed=0)
    for i in range(len(pairs)):
        row = data[i]
        short_query = row["query"] == pairs[i][0]
        assert row["positive"] == pairs[i][1 if short_query else 0]
        assert row["negative"] in [p[1 if short_query else 0] for j, p in enumerate(pairs) if j != i]
    result = train_text_stage(
        str(llm),
        pairs,
        tmp_path,
        {"max_steps": 3, "per_device_train_batch_size": 3, "learning_rate": 1e-2, "logging_steps": 1},
        lora={"r": 4},
    )
    assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
    assert result["lora"]["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    tuned = LLMTextEncoder(result["saved"])
    assert type(tuned.model).__name__ == "LlamaModel"
    assert not any("lora" in k for k in tuned.model.state_dict())
    texts = ["a red circle."]
    assert not torch.allclose(tuned.encode(texts), LLMTextEncoder(llm).encode(texts), atol=1e-4)


def test_the_clip_stage_loss_falls_and_retrieval_improves(llm, tiny_root, data_root, tmp_path):
    from vrlab.llm2clip.train import ImageCaptionEmbeddings, embed_captions, train_clip_stage
    from vrlab.retrieval import evaluate_retrieval

    registry = {"encoder_dirs": [str(tiny_root / "cards")]}
    loader = load_benchmark("synth-retrieval", data_root, registry)
    enc = LLMTextEncoder(llm)
    ids = [f"c{i}" for i in range(len(loader.captions))]
    embeddings = embed_captions(enc, loader.captions, ids, tmp_path / "stores", str(llm)).load("pooled")
    torch.manual_seed(0)
    model = LLM2CLIPModel.build(
        "tiny/clip", enc.dim, 32, registry_cfg=registry, text_encoder={"source": str(llm)}
    )
    model.attach_text_encoder(enc)
    before = evaluate_retrieval(model, loader, batch_size=8)
    captions_of = [[] for _ in loader.items]
    for row, image in enumerate(loader.caption_image):
        captions_of[image].append(row)
    data = ImageCaptionEmbeddings(
        [it.path for it in loader.items], captions_of, embeddings, model.vision.transform
    )
    args = {
        "num_train_epochs": 30,
        "per_device_train_batch_size": 16,
        "learning_rate": 2e-3,
        "logging_steps": 1,
    }
    result = train_clip_stage(model, data, tmp_path, args)
    losses = result["losses"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = evaluate_retrieval(model, loader, batch_size=8)
    gain = sum(after[k] - before[k] for k in after if "@" in k)
    assert gain > 0.5, (before, after)
    assert result["logit_scale"] <= 100.0 + 1e-4
    assert not any(k.startswith("_text_encoder") for k in model.state_dict())
    saved = LLM2CLIPModel.from_pretrained(result["saved"])
    images = [loader.items[0].path]
    from vrlab.data.images import decode_image

    pixels = [decode_image(p) for p in images]
    assert torch.allclose(saved.encode_images(pixels), model.encode_images(pixels), atol=1e-5)
