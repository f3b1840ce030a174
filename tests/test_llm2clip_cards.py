"""The LLM2CLIP cards (encoders/llm2clip/): Microsoft's released vision towers load without remote code.

Offline stand-ins laid out like the released checkpoints are loaded through the registry exactly as a user
would, by a card whose `source` (or `weights`) points at them:
- the OpenAI-based repos: a `model_type: "clip"` config.json whose `auto_map` names remote code that does not
  exist, and a model.safetensors with `vision_model.*`, `visual_projection.weight` and the text adaptor but no
  CLIP text tower; transformers' CLIPVisionModel must load the tower and nothing from the folder may run;
- the EVA02-based repos: a raw EVA-CLIP `.pt` (fp16, `visual.`-prefixed EVA-CLIP key names, text keys beside
  them) in a Hugging Face cache, read tensors-only into timm's EVA02-CLIP architecture.
The real cards are checked for their names, aliases and declared shapes (their weights are not here).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vrlab.encoders.factory import build_encoder
from vrlab.errors import VrlabError
from vrlab.registry import BUILTIN_ENCODER_DIR, Registry

REMOTE_CODE = {"AutoModel": "modeling_clip.LLM2CLIPModel", "AutoConfig": "configuration_clip.LLM2CLIPConfig"}
# name: (alias, target backend, dim, grid, image size, patch size)
RELEASED = {
    "microsoft/LLM2CLIP-Openai-L-14-336": ("llm2clip-l336", "HFVisionEncoder", 1024, (24, 24), 336, 14),
    "microsoft/LLM2CLIP-Openai-L-14-224": ("llm2clip-l224", "HFVisionEncoder", 1024, (16, 16), 224, 14),
    "microsoft/LLM2CLIP-Openai-B-16": ("llm2clip-b16", "HFVisionEncoder", 768, (14, 14), 224, 16),
    "microsoft/LLM2CLIP-EVA02-L-14-336": ("llm2clip-eva-l336", "TimmEncoder", 1024, (24, 24), 336, 14),
    "microsoft/LLM2CLIP-EVA02-B-16": ("llm2clip-eva-b16", "TimmEncoder", 768, (14, 14), 224, 16),
}


def write_card(folder: Path, card: dict) -> Registry:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return Registry.from_dirs([folder])  # with the built-in cards, so the aliases must not clash


# --- the OpenAI-based towers ----------------------------------------------------------------------
def released_openai_layout(folder: Path) -> dict[str, torch.Tensor]:
    """A tiny folder shaped like microsoft/LLM2CLIP-Openai-*: CLIP config + auto_map, tower + text adaptor."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = dict(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16).to_dict()
    config |= {"architectures": ["LLM2CLIPModel"], "auto_map": REMOTE_CODE}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tower = CLIPVisionModelWithProjection(CLIPConfig(vision_config=vision, projection_dim=16).vision_config)
    weights = {k: v.contiguous() for k, v in tower.state_dict().items()}
    assert {k.split(".")[0] for k in weights} == {"vision_model", "visual_projection"}
    # LLM2CLIP's text side is an adaptor over LLM features, not a CLIP text tower
    weights |= {
        "text.text_adaptor.0.fn.0.weight": torch.randn(16, 64),
        "text.text_adaptor.0.fn.0.bias": torch.randn(16),
        "text.text_adaptor.1.weight": torch.randn(16, 16),
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return weights


def test_openai_based_checkpoint_loads_its_tower_without_remote_code(tmp_path):
    from transformers import CLIPVisionModel

    folder = tmp_path / "LLM2CLIP-Openai-tiny"
    saved = released_openai_layout(folder)
    assert not (folder / "modeling_clip.py").exists()  # remote code, were it followed, would fail to load
    card = dict(
        name="test/llm2clip-openai",
        family="llm2clip",
        description="stand-in for microsoft/LLM2CLIP-Openai-*",
        dim=32,
        grid=[4, 4],
        _target_="vrlab.encoders.hf.HFVisionEncoder",
        source=str(folder),
        image_size=32,
        layer=-2,
        normalize="clip",
        resize="center_crop",
    )
    before = set(sys.modules)
    encoder = build_encoder(write_card(tmp_path / "cards", card), "test/llm2clip-openai").eval()
    new = set(sys.modules) - before
    assert not [m for m in new if m.startswith("transformers_modules")], new
    assert not [m for m in new if str(folder) in str(getattr(sys.modules[m], "__file__", "") or "")]
    assert type(encoder.model) is CLIPVisionModel
    assert (encoder.dim, tuple(encoder.grid), tuple(encoder.image_size)) == (32, (4, 4), (32, 32))
    # the released weights, not a fresh init (transformers 5 names the tower's keys without `vision_model.`)
    loaded = {k.removeprefix("vision_model."): v for k, v in encoder.model.state_dict().items()}
    for key in ("embeddings.patch_embedding.weight", "encoder.layers.1.mlp.fc2.weight"):
        torch.testing.assert_close(loaded[key], saved[f"vision_model.{key}"], rtol=0, atol=0)

    reference = CLIPVisionModel.from_pretrained(str(folder)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder(pixels).tokens
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


# --- the EVA02-based towers -----------------------------------------------------------------------
TINY_EVA = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
# timm name -> EVA-CLIP name (the inverse of timm.models.eva.checkpoint_filter_fn)
TO_EVA_CLIP = [
    ("attn.q_proj.bias", "attn.q_bias"),
    ("attn.v_proj.bias", "attn.v_bias"),
    ("attn.norm.", "attn.inner_attn_ln."),
    ("mlp.fc1_g.", "mlp.w1."),
    ("mlp.fc1_x.", "mlp.w2."),
    ("mlp.fc2.", "mlp.w3."),
    ("mlp.norm.", "mlp.ffn_ln."),
]


def released_eva_file(path: Path) -> torch.nn.Module:
    """A tiny EVA-CLIP `.pt` like LLM2CLIP-EVA02-*.pt; returns the timm model whose weights it holds."""
    import timm

    torch.manual_seed(0)
    # the EVA02-CLIP variant (separate q/k/v, sub-LN in attention and SwiGLU), with a 16-d CLIP projection head
    model = timm.create_model("eva02_base_patch16_clip_224", pretrained=False, num_classes=16, **TINY_EVA)
    with torch.no_grad():
        for p in model.parameters():  # norms off their init; fp16-exact, like the released fp16 file
            p.copy_((p + 0.02 * torch.randn_like(p)).half().float())
    state = {}
    for key, value in model.state_dict().items():
        for timm_name, eva_name in TO_EVA_CLIP:
            key = key.replace(timm_name, eva_name)
        state[f"visual.{key}"] = value.half()
    assert "visual.blocks.0.attn.q_bias" in state and "visual.blocks.0.mlp.w3.weight" in state
    # EVA-CLIP saves its rotary tables (timm rebuilds them); the file holds the text side too
    state |= {
        "visual.rope.freqs_cos": torch.randn(16, 16).half(),
        "visual.blocks.0.attn.rope.freqs_sin": torch.randn(16, 16).half(),
        "text.transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16).half(),
        "logit_scale": torch.tensor(4.6).half(),
    }
    torch.save(state, path)
    return model.eval()


def fake_hub_file(cache: Path, repo: str, filename: str) -> Path:
    """Where hf_hub_download finds `repo`'s `filename` offline: a snapshot in the cache, named by refs/main."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    (storage / "snapshots" / commit).mkdir(parents=True)
    return storage / "snapshots" / commit / filename


def eva_card(weights) -> dict:
    return dict(
        name="test/llm2clip-eva",
        family="llm2clip",
        description="stand-in for microsoft/LLM2CLIP-EVA02-*",
        dim=32,
        grid=[4, 4],
        _target_="vrlab.encoders.timm_backend.TimmEncoder",
        source="eva02_base_patch16_clip_224",
        model_kwargs={k: v for k, v in TINY_EVA.items() if k != "img_size"},
        image_size=32,
        weights=weights,
        layer=-2,
        normalize="clip",
        resize="center_crop",
    )


def test_eva_clip_pt_from_the_hub_cache_loads_into_timm_eva02_clip(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo, filename = "test-org/LLM2CLIP-EVA02-tiny", "LLM2CLIP-EVA02-tiny.pt"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reference = released_eva_file(fake_hub_file(tmp_path / "hub", repo, filename))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))

    card = eva_card({"repo": repo, "file": filename})
    encoder = build_encoder(write_card(tmp_path / "cards", card), "test/llm2clip-eva").eval()
    assert loads and all(kw.get("weights_only") is True for kw in loads), loads
    assert (encoder.dim, tuple(encoder.grid)) == (32, (4, 4))
    assert encoder.settings()["backend"]["weights"] == {"repo": repo, "file": filename}

    captured = {}
    reference.blocks[-2].register_forward_hook(lambda _m, _i, out: captured.update(out=out))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = encoder(pixels)
        pooled = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
    # block -2's output with the CLS token dropped; pooled is the normed CLS, before the CLIP projection
    torch.testing.assert_close(features.tokens, captured["out"][:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features.pooled, pooled, rtol=1e-5, atol=1e-5)


def test_a_weights_file_that_is_more_than_tensors_is_refused_unrun(tmp_path):
    path = tmp_path / "payload.pt"
    torch.save({"visual.pos_embed": torch.zeros(1, 17, 32), "extra": Payload()}, path)
    RAN.clear()
    registry = write_card(tmp_path / "cards", eva_card(str(path)))
    with pytest.raises(VrlabError, match="refusing to load"):
        build_encoder(registry, "test/llm2clip-eva")
    assert RAN == []  # a full-pickle torch.load would have called mark() while reading the file


def test_a_weights_file_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"visual.pos_embed": torch.zeros(1, 17, 32), "visual.something.weight": torch.zeros(2)}, path)
    registry = write_card(tmp_path / "cards", eva_card(str(path)))
    with pytest.raises(VrlabError, match=r"does not fit .*missing .*unexpected \['something.weight'\]"):
        build_encoder(registry, "test/llm2clip-eva")


RAN: list[str] = []


def mark() -> None:
    RAN.append("ran")


class Payload:
    def __reduce__(self):
        return (mark, ())


# --- the released cards ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin() -> Registry:
    return Registry.from_dirs()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_cards_resolve_by_name_and_alias(builtin, name):
    alias, backend, dim, grid, size, patch = RELEASED[name]
    card = builtin.get(alias)
    assert card is builtin.get(name) and card.name == name
    assert card.path.parent == BUILTIN_ENCODER_DIR / "llm2clip"
    assert (card.family, card.dim, card.grid, card.spec["image_size"]) == ("llm2clip", dim, grid, size)
    assert card.spec["_target_"].rsplit(".", 1)[1] == backend and card.spec["layer"] == -2
    assert not card.spec.get("trust_remote_code") and card.spec["normalize"] == "clip"
    assert "LLM2CLIP-fine-tuned" in card.description
    assert (grid[0] * patch, grid[1] * patch) == (size, size)
    if backend == "HFVisionEncoder":
        assert card.spec["source"] == name
    else:  # the repo's own .pt file, into timm's EVA02-CLIP architecture of the same size
        assert card.spec["weights"] == {"repo": name, "file": name.split("/")[1] + ".pt"}
        arch = card.spec["source"]
        assert arch.startswith("eva02_") and f"patch{patch}_clip_{size}" in arch
