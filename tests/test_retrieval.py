"""Image-text retrieval: recall@k on hand-worked matrices (ties, several captions per image) and against
independent computations, the caption loader and its errors, tiny CLIP / SigLIP / open_clip models loaded
through `load_retrieval_model` against their libraries' own feature calls, `evaluate_retrieval` end to end,
and `task=retrieval` composed from the real config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import top_k_accuracy_score

from vrlab.data.benchmarks import load_benchmark
from vrlab.data.captions import CaptionLoader
from vrlab.errors import VrlabError
from vrlab.retrieval import (
    HFRetrievalModel,
    OpenCLIPRetrievalModel,
    RetrievalModel,
    evaluate_retrieval,
    load_retrieval_model,
    recall_at_k,
)

TRUST = {"trusted_targets": ["vrlab.data.captions.CaptionLoader"]}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
KS = (1, 2, 5)


# --- recall@k -----------------------------------------------------------------------------------------
def brute_force(sim: torch.Tensor, owner: list[int], ks) -> dict[str, float]:
    """Python loops over a stable descending sort (equal scores: lower index first)."""
    n_images, n_texts = sim.shape
    s = sim.tolist()
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_images):
            order = sorted(range(n_texts), key=lambda j, i=i: -s[i][j])[:k]
            hits += any(owner[j] == i for j in order)
        out[f"image_to_text@{k}"] = hits / n_images
    for k in ks:
        hits = 0
        for j in range(n_texts):
            order = sorted(range(n_images), key=lambda i, j=j: -s[i][j])[:k]
            hits += owner[j] in order
        out[f"text_to_image@{k}"] = hits / n_texts
    return out


def test_recall_on_a_hand_worked_matrix():
    # image 0: captions 0, 1 (only the second ranks high); image 1: caption 2; image 2: captions 3, 4
    owner = [0, 0, 1, 2, 2]
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3, 0.2],  # best own caption (1) at rank 0
            [0.8, 0.1, 0.7, 0.6, 0.0],  # own caption 2 at rank 1
            [0.5, 0.4, 0.9, 0.1, 0.2],  # own captions 4, 3 at ranks 3, 4
        ]
    )
    got = recall_at_k(sim, owner, KS)
    # columns: caption 0 -> image 0 third; 1 -> first; 2 -> second; 3 -> third; caption 4 ties images 0 and
    # 2 at 0.2 and the lower index (image 0) ranks first, so its own image is second
    assert got == {
        "image_to_text@1": 1 / 3,
        "image_to_text@2": 2 / 3,
        "image_to_text@5": 1.0,
        "text_to_image@1": 1 / 5,
        "text_to_image@2": 3 / 5,
        "text_to_image@5": 1.0,
    }
    assert got == brute_force(sim, owner, KS)


def test_ties_rank_the_lower_index_first():
    sim = torch.full((2, 2), 0.5)  # every score tied
    got = recall_at_k(sim, [0, 1], (1, 2))
    # image 0 / caption 0 win their ties, image 1 / caption 1 lose them
    assert got == {
        "image_to_text@1": 0.5,
        "image_to_text@2": 1.0,
        "text_to_image@1": 0.5,
        "text_to_image@2": 1.0,
    }
    # a k beyond the number of candidates counts every query as a hit
    assert recall_at_k(torch.tensor([[0.0, 1.0]]), [0, 0], (1, 10)) == {
        "image_to_text@1": 1.0,
        "image_to_text@10": 1.0,
        "text_to_image@1": 1.0,
        "text_to_image@10": 1.0,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n_images = 7
    owner = [i for i in range(n_images) for _ in range(1 + i % 3)]
    sim = torch.randint(0, 4, (n_images, len(owner)), generator=g).float() / 4  # many ties
    assert recall_at_k(sim, owner, (1, 3, 5)) == brute_force(sim, owner, (1, 3, 5))


def test_recall_matches_scikit_learn_without_ties():
    g = torch.Generator().manual_seed(3)
    n_images = 9
    owner = [i for i in range(n_images) for _ in range(2)]
    sim = torch.randn(n_images, len(owner), generator=g)
    got = recall_at_k(sim, owner, (1, 3))
    for k in (1, 3):  # one true image per caption: top-k accuracy over the images
        expected = top_k_accuracy_score(owner, sim.T.numpy(), k=k, labels=list(range(n_images)))
        assert got[f"text_to_image@{k}"] == pytest.approx(expected)
    # one caption per image: image->text is top-k accuracy too
    perm = torch.randperm(n_images, generator=g).tolist()
    sim1 = torch.randn(n_images, n_images, generator=g)
    owner1 = [perm.index(j) for j in range(n_images)]  # caption j belongs to image perm^-1(j)
    got1 = recall_at_k(sim1, owner1, (1, 3))
    for k in (1, 3):
        expected = top_k_accuracy_score(perm, sim1.numpy(), k=k, labels=list(range(n_images)))
        assert got1[f"image_to_text@{k}"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("sim", "owner", "ks", "match"),
    [
        (torch.zeros(3), [0, 0, 0], KS, r"\[n_images, n_texts\]"),
        (torch.zeros(0, 3), [0, 0, 0], KS, "at least one image"),
        (torch.zeros(2, 2), [0], KS, "1 entries for 2 captions"),
        (torch.zeros(2, 2), [0, 2], KS, r"caption_image\[1\] = 2 is not an image index"),
        (torch.zeros(2, 2), [0, -1], KS, r"caption_image\[1\] = -1"),
        (torch.zeros(2, 2), [0.0, 1.0], KS, "integer image indices"),
        (torch.zeros(3, 2), [0, 1], KS, r"images \[2\] have no caption"),
        (
            torch.tensor([[0.0, float("nan")], [0.0, 1.0]]),
            [0, 1],
            KS,
            r"NaN or infinite values in image rows \[0\]",
        ),
        (torch.tensor([[0.0, 1.0], [float("inf"), 1.0]]), [0, 1], KS, r"rows \[1\]"),
        (torch.zeros(2, 2), [0, 1], (), "ks must be"),
        (torch.zeros(2, 2), [0, 1], (0, 1), "ks must be"),
    ],
)
def test_recall_refuses_bad_inputs(sim, owner, ks, match):
    with pytest.raises(VrlabError, match=match):
        recall_at_k(sim, owner, ks)


# --- the caption loader -------------------------------------------------------------------------------
def write_caption_set(root: Path, n: int = 6, records: list | None = None) -> Path:
    """The generator's layout: images/00000.png ... and captions.json with a short and a long caption."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(root / "images" / f"{i:05d}.png")
    if records is None:
        records = [
            {"image": f"{i:05d}.png", "caption": [f"image {i}", f"a long caption of image number {i}"]}
            for i in range(n)
        ]
    (root / "captions.json").write_text(json.dumps(records))
    return root


def test_caption_loader_reads_lists_strings_and_repeated_images(tmp_path):
    records = [
        {"image": "00000.png", "caption": ["zero a", "zero b"]},
        {"image": "00001.png", "caption": "one"},  # a single string
        {"image": "00000.png", "caption": "zero c"},  # the same image again: one item, three captions
    ]
    loader = CaptionLoader(write_caption_set(tmp_path, 2, records), "captions.json", "images")
    assert loader.task == "retrieval"
    assert [it.id for it in loader.items] == ["00000", "00001"]
    assert loader.items[0].path == tmp_path / "images" / "00000.png"
    assert loader.captions == ["zero a", "zero b", "one", "zero c"]
    assert loader.caption_image == [0, 0, 1, 0]
    assert [it.meta["captions"] for it in loader.items] == [[0, 1, 3], [2]]
    s = loader.settings()
    assert (s["file"], s["image_folder"], s["n"], s["n_captions"]) == ("captions.json", "images", 2, 4)
    records[1]["caption"] = "one, edited"
    edited = CaptionLoader(write_caption_set(tmp_path, 2, records), "captions.json", "images")
    assert edited.settings()["captions_digest"] != s["captions_digest"]


def test_caption_loader_ids_keep_subfolders(tmp_path):
    # COCO Karpathy paths carry their folder: image_folder is empty and the id keeps the folder
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    records = [{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["a", "b"]}]
    (tmp_path / "k.json").write_text(json.dumps(records))
    loader = CaptionLoader(tmp_path, "k.json")
    assert [it.id for it in loader.items] == ["val2014/COCO_val2014_000000000001"]
    with pytest.raises(VrlabError, match="set the card's image_folder to ''"):
        CaptionLoader(tmp_path, "k.json", "val2014")


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"image": "00000.png", "caption": "a"}, {"image": "00001.png"}], r"record 1 lacks key 'caption'"),
        ([{"caption": "a"}], r"record 0 lacks key 'image'"),
        (
            [{"image": "00007.png", "caption": "a"}],
            r"image of record 0 in .*captions.json not found: .*00007.png",
        ),
        ([{"image": "00000.png", "caption": []}], r"record 0 \('00000.png'\) needs 'caption'"),
        (
            [{"image": "00000.png", "caption": ["a", ""]}],
            r"record 0 .* empty or non-string caption at index 1",
        ),
        ([["00000.png", "a"]], r"record 0 is a list"),
        ({"image": "00000.png"}, "must hold a non-empty JSON list"),
        ([], "must hold a non-empty JSON list"),
    ],
)
def test_caption_loader_errors_name_the_file_and_record(tmp_path, records, match):
    root = write_caption_set(tmp_path, 2, records)
    with pytest.raises(VrlabError, match=match) as err:
        CaptionLoader(root, "captions.json", "images")
    assert str(root / "captions.json") in str(err.value)


def test_caption_loader_malformed_or_missing_file(tmp_path):
    write_caption_set(tmp_path, 1)
    (tmp_path / "captions.json").write_text('[{"image": "00000.png", "caption": ')
    with pytest.raises(VrlabError, match=rf"malformed JSON in {tmp_path / 'captions.json'}"):
        CaptionLoader(tmp_path, "captions.json", "images")
    with pytest.raises(VrlabError, match=rf"annotation file not found: {tmp_path / 'other.json'}"):
        CaptionLoader(tmp_path, "other.json", "images")


def test_synth_retrieval_card_reads_the_generated_layout(tmp_path):
    write_caption_set(tmp_path / "synthetic" / "captions", 4)
    loader = load_benchmark("synth-retrieval", tmp_path, TRUST)
    assert isinstance(loader, CaptionLoader) and loader.card.name == "synth-retrieval"
    assert len(loader) == 4 and len(loader.captions) == 8 and loader.caption_image == [0, 0, 1, 1, 2, 2, 3, 3]


# --- models -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tok():
    """The real CLIP BPE tokenizer (built offline, seconds: once per module)."""
    from vrlab.demo.tiny_encoders import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory, clip_tok) -> Path:
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    text = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    clip_tok.save_pretrained(folder)
    return folder


def _images(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(n)]


TEXTS = ["a red square", "two green circles on a blue background", "word " * 120]  # the last is truncated


def test_hf_clip_features_equal_the_models_own(hf_clip):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = load_retrieval_model(f"hf:{hf_clip}")
    assert isinstance(model, HFRetrievalModel) and isinstance(model, RetrievalModel)
    assert model.settings()["transform"]["resize"] == "center_crop"
    ref = CLIPModel.from_pretrained(hf_clip).eval()
    tok = AutoTokenizer.from_pretrained(hf_clip)
    images = _images()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=pixels)
        batch = tok(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        want_txt = ref.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want_img, want_txt = (getattr(w, "pooler_output", w) for w in (want_img, want_txt))
    got_img, got_txt = model.encode_images(images), model.encode_texts(TEXTS)
    assert got_img.shape == (3, 16) and got_txt.shape == (3, 16)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=1e-4)


def test_hf_siglip_pads_to_max_length_without_a_mask(tmp_path, clip_tok):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    ref = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    ref.save_pretrained(tmp_path)
    tok = clip_tok
    tok.save_pretrained(tmp_path)
    model = load_retrieval_model(f"hf:{tmp_path}")
    assert model.settings()["transform"]["resize"] == "squash"
    assert model.settings()["transform"]["mean"] == [0.5, 0.5, 0.5]
    texts = TEXTS[:2]  # both shorter than 16 tokens: padding to the longest would differ
    ids = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    images = _images(2)
    pixels = torch.stack(images).float() / 255 * 2 - 1  # 32x32 already: only SigLIP's [-1, 1] scaling
    with torch.no_grad():
        want_txt = ref.get_text_features(input_ids=ids)
        want_img = ref.get_image_features(pixel_values=pixels)
    want_img, want_txt = (getattr(w, "pooler_output", w) for w in (want_img, want_txt))
    torch.testing.assert_close(model.encode_texts(texts), want_txt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode_images(images), want_img, atol=1e-5, rtol=1e-4)
    assert model.encode_texts(TEXTS[2:]).shape == (1, 32)  # a long caption is truncated, not refused


def test_open_clip_local_dir_features_equal_the_models_own(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    ref = open_clip.CLIP(**cfg).eval()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(ref.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    model = load_retrieval_model(f"open_clip:local-dir:{tmp_path}")
    assert isinstance(model, OpenCLIPRetrievalModel) and model.settings()["source"] == str(tmp_path)
    images = _images(2)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want_img = ref.encode_image((torch.stack(images).float() / 255 - mean) / std)
        want_txt = ref.encode_text(open_clip.get_tokenizer(f"local-dir:{tmp_path}")(TEXTS))
    torch.testing.assert_close(model.encode_images(images), want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.encode_texts(TEXTS), want_txt, atol=1e-5, rtol=1e-4)


def test_load_retrieval_model_dispatch_and_errors(tmp_path, monkeypatch):
    with pytest.raises(VrlabError, match="unknown retrieval model 'clip-large'; use hf:"):
        load_retrieval_model("clip-large")
    with pytest.raises(VrlabError, match="no retrieval model given"):
        load_retrieval_model("")
    with pytest.raises(VrlabError, match=rf"cannot load retrieval model 'hf:{tmp_path / 'nope'}'"):
        load_retrieval_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(VrlabError, match="has no llm2clip_config.json"):
        load_retrieval_model(f"llm2clip:{tmp_path}")
    llm2clip = pytest.importorskip("vrlab.llm2clip.model")
    seen = []

    class Fake(torch.nn.Module):
        def encode_images(self, images):
            return torch.zeros(len(images), 2)

        def encode_texts(self, texts):
            return torch.zeros(len(texts), 2)

    monkeypatch.setattr(
        llm2clip.LLM2CLIPModel, "from_pretrained", classmethod(lambda cls, f: seen.append(f) or Fake())
    )
    (tmp_path / "llm2clip_config.json").write_text("{}")
    for spec in (str(tmp_path), f"llm2clip:{tmp_path}"):
        assert isinstance(load_retrieval_model(spec), Fake)
    assert seen == [tmp_path, tmp_path]


# --- evaluation ---------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Images -> one-hot of their colour; 'image i ...' captions -> one-hot of i: every pair is a hit."""

    def encode_images(self, images):
        keys = [tuple(int(c) for c in im[:, 0, 0]) for im in images]
        return F.one_hot(torch.tensor([COLOURS.index(k) for k in keys]), len(COLOURS)).float()

    def encode_texts(self, texts):
        return F.one_hot(torch.tensor([int(t.split()[-1]) for t in texts]), len(COLOURS)).float()


def test_evaluate_wires_images_captions_and_limit(tmp_path):
    records = [{"image": f"{i:05d}.png", "caption": [f"image {i}", f"number {i}"]} for i in range(6)]
    records[5]["caption"][1] = "number 0"  # image 5's second caption describes image 0
    loader = CaptionLoader(write_caption_set(tmp_path, 6, records), "captions.json", "images")
    got = evaluate_retrieval(Oracle(), loader, batch_size=4, ks=(1, 3), progress=False)
    assert (got["n_images"], got["n_texts"], got["embed_dim"], got["ks"]) == (6, 12, 6, [1, 3])
    # image 5 keeps a hit through its first caption; caption 11 finds image 0 first and its own image
    # (tied at 0 with images 1-4, after them by the tie rule) only at k=6
    assert got["image_to_text@1"] == 1.0
    assert got["text_to_image@1"] == pytest.approx(11 / 12)
    first = evaluate_retrieval(Oracle(), loader, batch_size=4, ks=(1,), limit=3, progress=False)
    assert (first["n_images"], first["n_texts"]) == (3, 6) and first["text_to_image@1"] == 1.0
    with pytest.raises(VrlabError, match="limit must be"):
        evaluate_retrieval(Oracle(), loader, limit=0)
    with pytest.raises(VrlabError, match="not a retrieval model"):
        evaluate_retrieval(object(), loader)


def test_evaluate_equals_recall_on_an_independent_similarity(hf_clip, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    loader = CaptionLoader(write_caption_set(tmp_path, 6), "captions.json", "images")
    model = load_retrieval_model(f"hf:{hf_clip}")
    got = evaluate_retrieval(model, loader, batch_size=4, ks=KS, progress=False)
    ref, tok = CLIPModel.from_pretrained(hf_clip).eval(), AutoTokenizer.from_pretrained(hf_clip)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = torch.stack(
        [torch.from_numpy(np.array(Image.open(it.path))).permute(2, 0, 1) for it in loader.items]
    )
    with torch.no_grad():
        img = ref.get_image_features(pixel_values=(pixels.float() / 255 - mean) / std)
        batch = tok(loader.captions, padding=True, return_tensors="pt")
        txt = ref.get_text_features(**batch)
    img, txt = (getattr(w, "pooler_output", w) for w in (img, txt))
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    assert {k: v for k, v in got.items() if "@" in k} == brute_force(sim, loader.caption_image, KS)
    assert got["n_images"] == 6 and got["n_texts"] == 12


def test_retrieval_task_writes_its_result(compose_cfg, hf_clip, tmp_path):
    from vrlab.tasks.retrieval import retrieval_task

    write_caption_set(tmp_path / "data" / "synthetic" / "captions", 4)
    overrides = [
        "task=retrieval",
        "benchmark=synth-retrieval",
        f"paths.data={tmp_path / 'data'}",
        "device=cpu",
        "registry.trusted_targets=[vrlab.data.captions.CaptionLoader]",
        f"++retrieval.model=hf:{hf_clip}",
        "++retrieval.batch_size=3",
        "++retrieval.ks=[1,2]",
        "++retrieval.limit=null",
    ]
    record = retrieval_task(compose_cfg(*overrides))
    out = Path(record["output"])
    assert out.parent.parent == tmp_path / "outputs" / "retrieval" and out.name == "retrieval.json"
    written = json.loads(out.read_text())
    metrics = {k: v for k, v in written.items() if "@" in k}
    assert set(metrics) == {"image_to_text@1", "image_to_text@2", "text_to_image@1", "text_to_image@2"}
    assert metrics == {k: record[k] for k in metrics}
    assert (written["n_images"], written["n_texts"], written["benchmark"]) == (4, 8, "synth-retrieval")
    assert written["model"] == f"hf:{hf_clip}" and "torch" in written["versions"]
    loader = load_benchmark("synth-retrieval", tmp_path / "data", TRUST)
    direct = evaluate_retrieval(load_retrieval_model(f"hf:{hf_clip}"), loader, ks=(1, 2), progress=False)
    assert metrics == {k: v for k, v in direct.items() if "@" in k}
    again = retrieval_task(compose_cfg(*overrides))  # same settings: the same folder
    assert again["output"] == record["output"]
    limited = retrieval_task(compose_cfg(*overrides[:-1], "++retrieval.limit=2"))
    assert limited["output"] != record["output"] and limited["n_images"] == 2
    with pytest.raises(VrlabError, match="retrieval.batch_size"):
        retrieval_task(compose_cfg(*overrides, "++retrieval.batch_size=0"))
    with pytest.raises(VrlabError, match="needs retrieval.model"):
        retrieval_task(compose_cfg(*overrides, "++retrieval.model=null"))
