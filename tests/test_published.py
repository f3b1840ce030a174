"""Published checkpoints: tiny folders written in each released layout (LLaVA's config fields, its shard and
key names, `mm_projector.bin`, TG-LLaVA's LAVIS Q-Former names, Hugging Face Llava), built here from the
formats, not from vrlab's own save; vrlab imports them, and the numbers equal an independent computation."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vrlab.adapters import load_token_adapter
from vrlab.demo.tiny_llm import build_llm, default_corpus
from vrlab.errors import VrlabError
from vrlab.mllm.data import generation_batch
from vrlab.mllm.model import VisionLanguageModel
from vrlab.published import ImportOptions, detect_format, ensure_vrlab, import_checkpoint
from vrlab.registry import Registry


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_llm(tmp_path_factory.mktemp("llm") / "llama", corpus=default_corpus())


@pytest.fixture(scope="module")
def llm(llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llm_dir).eval(), AutoTokenizer.from_pretrained(llm_dir)


def options(tiny_root, **kw):
    return ImportOptions(registry={"encoder_dirs": [str(tiny_root / "cards")]}, **kw)


def projector(in_dim, out_dim, depth=2, seed=0):
    """LLaVA's projector weights under its own names: `model.mm_projector.{0,2,...}` or bare for linear."""
    g = torch.Generator().manual_seed(seed)
    if depth == 0:
        return {
            "model.mm_projector.weight": torch.randn(out_dim, in_dim, generator=g) * 0.2,
            "model.mm_projector.bias": torch.randn(out_dim, generator=g) * 0.2,
        }
    state = {}
    for i in range(depth):
        fan_in = in_dim if i == 0 else out_dim
        state[f"model.mm_projector.{2 * i}.weight"] = torch.randn(out_dim, fan_in, generator=g) * 0.2
        state[f"model.mm_projector.{2 * i}.bias"] = torch.randn(out_dim, generator=g) * 0.2
    return state


def by_hand(state, tokens):
    """LLaVA's projector applied to tokens: Linear, then (GELU, Linear) per further layer."""
    if "model.mm_projector.weight" in state:
        return F.linear(tokens, state["model.mm_projector.weight"], state["model.mm_projector.bias"])
    i, x = 0, tokens
    while f"model.mm_projector.{i}.weight" in state:
        if i:
            x = F.gelu(x)
        x = F.linear(x, state[f"model.mm_projector.{i}.weight"], state[f"model.mm_projector.{i}.bias"])
        i += 2
    return x


def llava_config(llm_model, tower, dim, **fields):
    """LLaVA-1.5's config.json: the LLM's fields plus LLaVA's, with LLaVA-1.5's release `model_type`."""
    config = llm_model.config.to_dict()
    config.update(
        dict(
            model_type="llava",
            architectures=["LlavaLlamaForCausalLM"],
            mm_vision_tower=tower,
            mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            mm_hidden_size=dim,
            image_aspect_ratio="pad",
            mm_use_im_start_end=False,
            mm_use_im_patch_token=False,
            mm_patch_merge_type="flat",
            tune_mm_mlp_adapter=False,
            use_mm_proj=True,
        ),
        **fields,
    )
    return config


def write_llava(folder, llm, config, extra):
    """A LLaVA-1.5 release folder: config.json, two pickled shards with their index, the tokenizer."""
    model, tokenizer = llm
    folder.mkdir(parents=True)
    state = {**model.state_dict(), **extra}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as transformers 4.31 saved
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k].clone() for k in half}, folder / name)
        weight_map.update(dict.fromkeys(half, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return folder


def write_stage1(folder, config, state):
    folder.mkdir(parents=True)
    torch.save(state, folder / "mm_projector.bin")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def clip(registry):
    from vrlab.encoders.factory import build_encoder

    return build_encoder(registry, "tiny/clip").eval()


def test_imported_llava_logits_equal_hf_llava_with_the_same_weights(
    tiny_root, registry, llm, clip, tmp_path, logit_gap
):
    from transformers import CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

    model, tokenizer = llm
    width = model.config.hidden_size
    proj = projector(clip.dim, width)
    src = write_llava(tmp_path / "llava-v1.5-tiny", llm, llava_config(model, "tiny/clip", clip.dim), proj)
    assert detect_format(src) == "llava"
    out = import_checkpoint(src, tmp_path / "imported", options(tiny_root))
    ours = VisionLanguageModel.from_pretrained(out)
    record = json.loads((out / "import.json").read_text())
    assert record["format"] == "llava" and set(record["files"]) >= {
        "config.json",
        "pytorch_model-00001-of-00002.bin",
    }
    assert record["dropped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert ours.template == "vicuna_v1" and ours.config_dict["image_aspect_ratio"] == "pad"

    # Hugging Face's own LLaVA, assembled from the same published tensors, not from vrlab's import.
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tower = CLIPVisionModel.from_pretrained(registry.get("tiny/clip").source)
    h, w = clip.grid
    hf = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=tower.config.to_dict(),
            text_config=model.config.to_dict(),
            image_token_index=image_id,
            image_seq_length=h * w,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
    ).eval()
    hf.model.vision_tower.load_state_dict(tower.state_dict())
    hf.model.multi_modal_projector.load_state_dict(
        {
            "linear_1.weight": proj["model.mm_projector.0.weight"],
            "linear_1.bias": proj["model.mm_projector.0.bias"],
            "linear_2.weight": proj["model.mm_projector.2.weight"],
            "linear_2.bias": proj["model.mm_projector.2.bias"],
        }
    )
    hf.model.language_model.load_state_dict(model.model.state_dict())
    hf.lm_head.load_state_dict(model.lm_head.state_dict())

    diff = logit_gap(ours, hf)
    print(f"imported LLaVA vs HF Llava: max logit difference {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("depth,declared", [(2, "mlp2x_gelu"), (0, None), (3, "mlp3x_gelu")])
def test_imported_stage1_projector_equals_the_projector_by_hand(
    tiny_root, llm, clip, tmp_path, photo_files, depth, declared
):
    from vrlab.data.images import decode_image

    model, _ = llm
    width = model.config.hidden_size
    state = projector(clip.dim, width, depth)
    config = llava_config(model, "tiny/clip", clip.dim, mm_projector_type=declared)
    if declared is None:  # LLaVA v0 / LMVR configs have no mm_projector_type: linear
        del config["mm_projector_type"]
    src = write_stage1(tmp_path / "pretrain", config, state)
    assert detect_format(src) == "llava_stage1"
    folder = ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root))
    assert ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root)) == folder  # imported once
    adapter, cfg = load_token_adapter(folder, expect_in_dim=clip.dim)
    assert cfg["type"] == (declared or "linear")
    tokens = clip.encode_images([decode_image(p) for p in photo_files[:2]]).tokens
    with torch.no_grad():
        assert torch.allclose(adapter(tokens), by_hand(state, tokens), atol=1e-6)


def test_extraction_takes_a_llava_stage1_folder_as_its_adapter(
    tiny_root, llm, clip, compose_cfg, data_root, tmp_path
):
    from vrlab.extract import run_extraction
    from vrlab.tasks.config import extraction_request

    model, _ = llm
    state = projector(clip.dim, model.config.hidden_size)
    src = write_stage1(tmp_path / "pretrain", llava_config(model, "tiny/clip", clip.dim), state)
    cfg = compose_cfg(
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]", f"paths.data={data_root}", "extract.num_workers=0"
    )
    raw = run_extraction(extraction_request(cfg, "tiny/clip", "synth-voc-test", limit=4))
    projected = run_extraction(
        extraction_request(cfg, "tiny/clip", "synth-voc-test", limit=4, adapter=str(src))
    )
    assert projected.path != raw.path
    ids = raw.ids[:4]
    expected = by_hand(state, torch.stack([raw.tokens(i).float() for i in ids]))
    assert torch.allclose(torch.stack([projected.tokens(i).float() for i in ids]), expected, atol=1e-5)


def test_a_law_style_composite_tower_name_resolves(tiny_root, llm, registry, tmp_path):
    from vrlab.encoders.factory import build_encoder

    names = [
        c.name
        for c in Registry.from_config(None).resolve("openai/clip-vit-large-patch14.facebook/dinov2-large")
    ]
    assert names == ["openai/clip-vit-large-patch14", "facebook/dinov2-large"]  # the released configs' names
    model, _ = llm
    composite = build_encoder(registry, "tiny/clip.tiny/dinov2")
    config = llava_config(model, "tiny/clip.tiny/dinov2", composite.dim)
    src = write_stage1(tmp_path / "law-pretrain", config, projector(composite.dim, model.config.hidden_size))
    folder = ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root))
    _, cfg = load_token_adapter(folder, expect_in_dim=composite.dim)
    assert cfg["encoder"] == composite.name and cfg["in_dim"] == composite.dim


def test_a_law_diffusion_projector_brings_its_feature_settings_to_extraction(
    tiny_root, llm, registry, compose_cfg, data_root, tmp_path
):
    """The Law paper's configs are the only record of their diffusion settings (img_size, t, up_ft_index);
    a projector trained at t=50 must not be applied to features taken at the card's t=1."""
    from vrlab.encoders.factory import build_encoder
    from vrlab.tasks.config import extraction_request

    model, _ = llm
    composite = build_encoder(registry, "tiny/clip.tiny/sd")
    config = llava_config(model, "tiny/clip.tiny/sd", composite.dim, mm_vision_select_layer=-1)
    config.update(t=50, up_ft_index=0)  # up_ft_index equals the card's: no override needed for it
    src = write_stage1(tmp_path / "law-sd", config, projector(composite.dim, model.config.hidden_size))
    cfg = compose_cfg(f"registry.encoder_dirs=[{tiny_root / 'cards'}]", f"paths.data={data_root}")
    request = extraction_request(cfg, "tiny/clip.tiny/sd", "synth-voc-test", adapter=str(src))
    assert request.encoder_args == {"tiny/clip": {"layer": -1}, "tiny/sd": {"t": 50}}
    theirs = extraction_request(
        cfg, "tiny/clip.tiny/sd", "synth-voc-test", adapter=str(src), encoder_args={"tiny/sd": {"t": 5}}
    )
    assert theirs.encoder_args["tiny/sd"] == {"t": 5}  # the user's own setting wins (with a warning)


class Payload:
    """An object whose unpickling would create a file: loading must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("bad", ["object", "int"])
def test_a_pickled_projector_with_a_non_tensor_is_refused(tiny_root, llm, clip, tmp_path, bad):
    model, _ = llm
    marker = tmp_path / "code-ran"
    state = projector(clip.dim, model.config.hidden_size)
    state["extra"] = Payload(marker) if bad == "object" else 3
    src = write_stage1(tmp_path / "pretrain", llava_config(model, "tiny/clip", clip.dim), state)
    with pytest.raises(VrlabError, match=r"mm_projector\.bin") as err:
        ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root))
    assert ("objects other than tensors" if bad == "object" else "'extra' is a int") in str(err.value)
    assert not marker.exists()
    # nothing under imports/ looks like a finished import (rglob of a missing folder finds nothing)
    assert not [
        *(tmp_path / "imports").rglob("adapter_config.json"),
        *(tmp_path / "imports").rglob("import.json"),
    ]


def test_a_missing_tower_is_named_and_import_tower_overrides_it(tiny_root, llm, clip, tmp_path):
    model, _ = llm
    state = projector(clip.dim, model.config.hidden_size)
    src = write_stage1(tmp_path / "pretrain", llava_config(model, "/data/ckpts/tiny-clpi", clip.dim), state)
    with pytest.raises(VrlabError, match=r"vision tower '/data/ckpts/tiny-clpi' is not a registered encoder"):
        ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root))
    folder = ensure_vrlab(src, "adapter", tmp_path / "imports", options(tiny_root, tower="tiny/clip"))
    assert json.loads((folder / "adapter_config.json").read_text())["encoder"] == "tiny/clip"


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("mm_vision_select_feature", "cls_patch", "keeps the CLS token"),
        ("mm_use_im_start_end", True, "mm_use_im_start_end=true"),
        ("image_aspect_ratio", "anyres", "AnyRes"),
        ("mm_projector_type", "identity", "not linear or mlp<N>x_gelu"),
        ("mm_hidden_size", 7, "mm_hidden_size=7"),
    ],
)
def test_what_vrlab_cannot_run_is_refused_naming_the_key(tiny_root, llm, clip, tmp_path, field, value, why):
    model, _ = llm
    config = llava_config(model, "tiny/clip", clip.dim)
    config[field] = value
    src = write_llava(tmp_path / "llava", llm, config, projector(clip.dim, model.config.hidden_size))
    with pytest.raises(VrlabError, match=why) as err:
        ensure_vrlab(src, "model", tmp_path / "imports", options(tiny_root))
    assert "config.json" in str(err.value)
    assert not (tmp_path / "imports").exists() or not list((tmp_path / "imports").iterdir())


def lavis_qformer(hidden, layers, text_dim, n_latents, seed=0):
    """TG-LLaVA's mm_cross_attn under its own names (LAVIS BertLMHeadModel inside), and the equivalent
    transformers Q-Former with the same tensors, as the independent reference."""
    from vrlab.adapters import _qformer

    torch.manual_seed(seed)
    reference = _qformer(hidden, layers, 4, hidden, cross_every=2)
    for p in reference.parameters():
        p.data.normal_(0, 0.2)
    lavis = {}
    for key, value in reference.state_dict().items():
        name = key.replace("layernorm.", "embeddings.LayerNorm.", 1) if key.startswith("layernorm.") else key
        name = name.replace(".attention.attention.", ".attention.self.").replace(
            ".crossattention.attention.", ".crossattention.self."
        )
        lavis[f"model.mm_cross_attn.Qformer.bert.{name}"] = value.clone()
    for i in range(layers):  # the text path a query-only forward never uses
        lavis[f"model.mm_cross_attn.Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = torch.zeros(
            4, hidden
        )
        lavis[f"model.mm_cross_attn.Qformer.bert.encoder.layer.{i}.output.dense.weight"] = torch.zeros(
            hidden, 4
        )
    lavis["model.mm_cross_attn.Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(10, hidden)
    lavis["model.mm_cross_attn.Qformer.cls.predictions.bias"] = torch.zeros(10)
    g = torch.Generator().manual_seed(seed + 1)
    extra = {
        "model.mm_cross_attn.query_tokens": torch.randn(1, n_latents, hidden, generator=g) * 0.2,
        "model.mm_cross_attn.resize_linear.weight": torch.randn(hidden, text_dim, generator=g) * 0.2,
        "model.mm_cross_attn.resize_linear.bias": torch.randn(hidden, generator=g) * 0.2,
        "model.mm_cross_attn.zero_layer.weight": torch.randn(hidden, hidden, generator=g)
        * 0.2,  # trained: not 0
        "model.mm_cross_attn.zero_layer.bias": torch.randn(hidden, generator=g) * 0.2,
    }
    return {**lavis, **extra}, reference.eval()


def test_tg_llava_cross_attention_maps_onto_the_tg_adapter_and_its_detail_branch_is_refused(
    tiny_root, llm, clip, tmp_path
):
    from vrlab.adapters import cross_attend

    model, _ = llm
    width, text_dim = model.config.hidden_size, 32
    cross, reference = lavis_qformer(clip.dim, 2, text_dim, clip.num_tokens)
    proj = projector(clip.dim, width)
    text_tower = {
        "source": str(tiny_root / "models" / "sd"),
        "model_subfolder": "text_encoder",
        "tokenizer_subfolder": "tokenizer",
    }
    config = llava_config(model, "tiny/clip", clip.dim, mm_text_tower="openai/clip-vit-large-patch14-336")
    config["mm_text_hidden_size"] = text_dim
    src = write_llava(tmp_path / "tg-llava", llm, config, {**proj, **cross})
    assert detect_format(src) == "tg_llava"
    opts = options(tiny_root, text_tower=text_tower, qformer_heads=4)
    out = import_checkpoint(src, tmp_path / "imported", opts)
    vlm = VisionLanguageModel.from_pretrained(out)
    assert vlm.config_dict["adapter"]["type"] == "tg"
    dropped = json.loads((out / "import.json").read_text())["dropped"]
    assert "model.mm_cross_attn.Qformer.cls.predictions.bias" in dropped

    text = torch.randn(2, text_dim)
    tokens = torch.randn(2, clip.num_tokens, clip.dim)
    with torch.no_grad():
        guide = cross_attend(
            reference,
            cross["model.mm_cross_attn.query_tokens"],
            F.linear(
                text,
                cross["model.mm_cross_attn.resize_linear.weight"],
                cross["model.mm_cross_attn.resize_linear.bias"],
            ).unsqueeze(1),
        )
        guide = F.linear(
            guide,
            cross["model.mm_cross_attn.zero_layer.weight"],
            cross["model.mm_cross_attn.zero_layer.bias"],
        )
        assert torch.allclose(vlm.adapter(tokens, text), by_hand(proj, tokens + guide), atol=1e-5)

    detail = {
        "model.mm_patch_encoder.latents": torch.zeros(1, 4, 8),
        "model.mm_patch_encoder.proj.0.weight": torch.zeros(8, 8),
    }
    src2 = write_llava(tmp_path / "tg-llava-full", llm, config, {**proj, **cross, **detail})
    with pytest.raises(VrlabError, match=r"model\.mm_patch_encoder\.latents"):
        import_checkpoint(src2, tmp_path / "imported2", opts)
    assert not (tmp_path / "imported2").exists() and not list(tmp_path.glob(".imported2*"))


@pytest.mark.parametrize("adapter", ["mlp2x_gelu", "linear"])
def test_hf_llava_round_trips_with_export(tiny_root, llm_dir, tmp_path, photo_files, adapter):
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from vrlab.export_hf import export_llava

    torch.manual_seed(0)
    original = VisionLanguageModel.build(
        "tiny/clip",
        str(llm_dir),
        {"type": adapter},
        registry_cfg={"encoder_dirs": [str(tiny_root / "cards")]},
    )
    for p in original.adapter.parameters():
        p.data.normal_(0, 0.2)
    hf = export_llava(original.save_pretrained(tmp_path / "vlm"), tmp_path / "hf")
    assert detect_format(hf) == "llava_hf"
    back = VisionLanguageModel.from_pretrained(import_checkpoint(hf, tmp_path / "back", options(tiny_root)))
    assert back.config_dict["adapter"]["type"] == adapter
    images = [pil_to_tensor(Image.open(p).convert("RGB")) for p in photo_files[:2]]
    batch = generation_batch(original, images, ["What is in the image?", "Describe it."])
    with torch.no_grad():
        diff = (original.eval()(**batch).logits - back(**batch).logits).abs().max().item()
    assert diff < 1e-4


def test_tasks_take_a_published_checkpoint_and_import_it_once(
    tiny_root, llm, clip, compose_cfg, tmp_path, photo_files
):
    from vrlab.tasks.imports import import_task
    from vrlab.tasks.train import generate_task

    model, _ = llm
    src = write_llava(
        tmp_path / "llava",
        llm,
        llava_config(model, "tiny/clip", clip.dim),
        projector(clip.dim, model.config.hidden_size),
    )
    overrides = [f"registry.encoder_dirs=[{tiny_root / 'cards'}]", f"checkpoint={src}"]
    cfg = compose_cfg(
        *overrides, "task=generate", f"generate.images=[{photo_files[0]}]", "generate.max_new_tokens=3"
    )
    first = generate_task(cfg)
    imported = list((Path(cfg.paths.outputs) / "imports").iterdir())
    assert len(imported) == 1 and (imported[0] / "vlm_config.json").is_file()
    stamp = (imported[0] / "import.json").stat().st_mtime_ns
    assert generate_task(cfg) == first  # same inputs, same answers, same import
    assert (imported[0] / "import.json").stat().st_mtime_ns == stamp
    report = import_task(compose_cfg(*overrides, "task=import"))
    assert Path(report["output"]) == imported[0] and report["format"] == "llava"

    stage1 = write_stage1(
        tmp_path / "pretrain", llava_config(model, "tiny/clip", clip.dim), projector(clip.dim, 64)
    )
    with pytest.raises(VrlabError, match="llava_stage1 checkpoint .* a model is needed"):
        generate_task(compose_cfg(f"registry.encoder_dirs=[{tiny_root / 'cards'}]", f"checkpoint={stage1}"))


def test_an_llm_padded_beyond_its_tokenizer_keeps_its_rows(tmp_path):
    """A tokenizer without `<image>` and an embedding matrix with spare rows (llava-hf has 32064, Qwen2
    pads too): adding `<image>` must use a spare row, not shrink the matrix to the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vrlab.mllm.model import load_llm

    words = ["<pad>", "</s>", "a", "red", "square", "blue", "circle"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words) + 8, **config))
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    loaded, tok = load_llm(str(tmp_path / "padded"))
    assert tok.convert_tokens_to_ids("<image>") == len(words)
    assert loaded.get_input_embeddings().weight.shape[0] == len(words) + 8
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
