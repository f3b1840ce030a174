"""Tiny randomly initialised encoders of every family, saved with each library's own save call.

`make demo` and the tests use these to exercise the real loading paths without downloads: each builder
constructs the model from a small config through the library's public API, writes it to a folder
(`save_pretrained`, timm's `save_for_hf`, an open_clip `local-dir:` folder, a diffusers pipeline folder) and
returns the encoder card (a dict) that loads it back through the registry like any hub checkpoint.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
VIT_SIZE, VIT_PATCH = 32, 8
DIFFUSION_SIZE = 64


def clip_tokenizer() -> Any:
    """The real OpenAI CLIP BPE tokenizer, rebuilt offline from the vocabulary inside the open_clip wheel."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


def _card(name: str, family: str, target: str, **spec: Any) -> dict[str, Any]:
    alias = "tiny-" + name.split("/")[-1]
    return {
        "name": name,
        "aliases": [alias],
        "family": family,
        "description": f"tiny random {family} model for demos and tests",
        "_target_": target,
        **spec,
    }


# --- transformers ---------------------------------------------------------------------------------
def build_clip(folder: Path) -> dict[str, Any]:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    vision = dict(image_size=VIT_SIZE, patch_size=VIT_PATCH, **VIT)
    # A full image-text checkpoint, like openai/clip-*: the backend must load only its vision tower.
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    return _card(
        "tiny/clip",
        "clip",
        "vrlab.encoders.hf.HFVisionEncoder",
        source=str(folder),
        layer=-2,
        normalize="clip",
        resize="center_crop",
    )


def build_siglip(folder: Path) -> dict[str, Any]:
    from transformers import SiglipConfig, SiglipModel

    text = dict(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    vision = dict(image_size=VIT_SIZE, patch_size=VIT_PATCH, **VIT)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    return _card(
        "tiny/siglip",
        "siglip",
        "vrlab.encoders.hf.HFVisionEncoder",
        source=str(folder),
        layer=-2,
        normalize="siglip",
        resize="squash",
    )


def build_dinov2(folder: Path) -> dict[str, Any]:
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(image_size=VIT_SIZE, patch_size=VIT_PATCH, **VIT)).save_pretrained(folder)
    return _card(
        "tiny/dinov2",
        "dinov2",
        "vrlab.encoders.hf.HFVisionEncoder",
        source=str(folder),
        layer=-2,
        normalize="imagenet",
        resize="center_crop",
    )


def build_dinov2_registers(folder: Path) -> dict[str, Any]:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(image_size=VIT_SIZE, patch_size=VIT_PATCH, num_register_tokens=4, **VIT)
    Dinov2WithRegistersModel(cfg).save_pretrained(folder)
    return _card(
        "tiny/dinov2-reg",
        "dinov2",
        "vrlab.encoders.hf.HFVisionEncoder",
        source=str(folder),
        layer=-2,
        normalize="imagenet",
        resize="center_crop",
    )


# --- timm and open_clip ---------------------------------------------------------------------------
def build_eva02_timm(folder: Path) -> dict[str, Any]:
    import timm
    from timm.models import save_for_hf

    kw = dict(img_size=VIT_SIZE, patch_size=VIT_PATCH, embed_dim=64, depth=3, num_heads=4)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, **kw)
    save_for_hf(model, folder, model_args=kw)
    return _card(
        "tiny/eva02-timm",
        "eva02",
        "vrlab.encoders.timm_backend.TimmEncoder",
        source=f"local-dir:{folder}",
        layer=-2,
        resize="center_crop",
    )


def build_eva02_clip(folder: Path) -> dict[str, Any]:
    import open_clip
    from safetensors.torch import save_file

    # The real EVA02-CLIP layout: a timm EVA02 trunk inside open_clip (open_clip passes no size kwargs to
    # timm, so this is eva02_tiny's real width at a small input size).
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "eva02_tiny_patch14_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "image_size": 56,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return _card(
        "tiny/eva02-clip",
        "eva02-clip",
        "vrlab.encoders.openclip.OpenCLIPEncoder",
        source=f"local-dir:{folder}",
        layer=-2,
        resize="center_crop",
    )


# --- diffusers ------------------------------------------------------------------------------------
def _vae(latent_channels: int = 4) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give SD's /8 downsampling; a /2 VAE makes latents (and attention) far too large.
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=DIFFUSION_SIZE,
    )


def _unet(cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=DIFFUSION_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def _text_encoder(hidden: int = 32, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _ddpm_config() -> dict[str, Any]:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _diffusion_card(name: str, family: str, folder: Path, **spec: Any) -> dict[str, Any]:
    return _card(
        name,
        family,
        "vrlab.encoders.diffusion.DiffusionEncoder",
        source=str(folder),
        image_size=DIFFUSION_SIZE,
        t=1,
        block=0,
        prompt="",
        seed=0,
        **spec,
    )


def build_sd(folder: Path) -> dict[str, Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(32),
        tokenizer=clip_tokenizer(),
        unet=_unet(32),
        scheduler=DDIMScheduler(**_ddpm_config()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return _diffusion_card("tiny/sd", "stable-diffusion", folder, pipeline_kwargs={"safety_checker": None})


def build_sdxl(folder: Path) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = clip_tokenizer()
    unet = _unet(
        32 + 32,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(32),
        text_encoder_2=_text_encoder(32, 16),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_ddpm_config()),
    )
    pipe.save_pretrained(folder)
    return _diffusion_card("tiny/sdxl", "stable-diffusion-xl", folder)


def build_sd_image_variations(folder: Path) -> dict[str, Any]:
    from diffusers import PNDMScheduler, StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=32, patch_size=8, projection_dim=32, **VIT)
    )
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImageVariationPipeline(
        vae=_vae(),
        image_encoder=image_encoder,
        unet=_unet(32),
        scheduler=PNDMScheduler(**_ddpm_config()),
        safety_checker=None,
        feature_extractor=fe,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return _diffusion_card(
        "tiny/sd-image-variations", "sd-image-variations", folder, pipeline_kwargs={"safety_checker": None}
    )


def build_dit(folder: Path) -> dict[str, Any]:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=DIFFUSION_SIZE // 8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    DiTPipeline(
        transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(**_ddpm_config())
    ).save_pretrained(folder)
    return _diffusion_card("tiny/dit", "dit", folder)


def build_sd3(folder: Path) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=DIFFUSION_SIZE // 8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=_text_encoder(16, 16),
        tokenizer=tok,
        text_encoder_2=_text_encoder(16, 16),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return _diffusion_card(
        "tiny/sd3", "sd3", folder, pipeline_kwargs={"text_encoder_3": None, "tokenizer_3": None}
    )


BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "clip": build_clip,
    "siglip": build_siglip,
    "dinov2": build_dinov2,
    "dinov2-reg": build_dinov2_registers,
    "eva02-timm": build_eva02_timm,
    "eva02-clip": build_eva02_clip,
    "sd": build_sd,
    "sdxl": build_sdxl,
    "sd-image-variations": build_sd_image_variations,
    "dit": build_dit,
    "sd3": build_sd3,
}


def build_vit_small(folder: Path) -> dict[str, Any]:
    """A randomly initialised ViT-S/16 at full size (22 M parameters), for throughput measurements."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    save_for_hf(model, folder, model_args={})
    return _card(
        "random/vit-s16",
        "vit",
        "vrlab.encoders.timm_backend.TimmEncoder",
        source=f"local-dir:{folder}",
        layer=-2,
        resize="squash",
    )


# Full-size random models: built for `make perf`, not part of the per-family test table.
PERF_BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {"vit-s": build_vit_small}


def build_tiny(family: str, models_dir: Path, cards_dir: Path, seed: int = 0) -> Path:
    """Build, save and register one tiny model; returns the card file. Seeded, so rebuilds are identical."""
    builders = {**BUILDERS, **PERF_BUILDERS}
    if family not in builders:
        raise KeyError(f"no tiny builder for family '{family}'; known: {sorted(builders)}")
    torch.manual_seed(seed)
    card = builders[family](Path(models_dir) / family)
    cards_dir = Path(cards_dir)
    cards_dir.mkdir(parents=True, exist_ok=True)
    path = cards_dir / f"{family}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path
