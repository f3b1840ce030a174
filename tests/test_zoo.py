"""Cards of current encoders: for each, a model of the card's architecture at the card's width and patch
size (one layer, random weights) saved in the released hub layout loads through the card, gives the card's
dim and grid, and composes with a CLIP card; and the README's encoder table lists every built-in card."""

from pathlib import Path

import pytest
import torch

from vrlab.encoders.compose import CompositeEncoder
from vrlab.encoders.factory import build_card, build_encoder
from vrlab.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


# the text side of every full checkpoint below: one tiny layer (only the vision tower is under test)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def siglip_full(folder, card):
    """A full SigLIP checkpoint (vision + text), as the fixed-resolution SigLIP 2 releases are."""
    from transformers import SiglipConfig, SiglipModel

    # the released configs' patch and size (384 is not 27 x 14)
    patch, size = {1152: (14, 384), 1024: (16, 256), 768: (16, 224)}[card.dim]
    vision = dict(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=12 if card.dim == 768 else 16,
        patch_size=patch,
        image_size=size,
    )
    SiglipModel(SiglipConfig(vision_config=vision, text_config=TEXT)).save_pretrained(folder)


def dinov2(folder, card):
    """A `Dinov2Model` folder, as Web-SSL DINO releases are."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    )
    Dinov2Model(config).save_pretrained(folder)


def siglip2_naflex(folder, card):
    """A full SigLIP 2 NaFlex checkpoint (`Siglip2Model`, vision + text), as released."""
    from transformers import Siglip2Config, Siglip2Model

    vision = dict(
        hidden_size=card.dim, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16, patch_size=16
    )
    Siglip2Model(Siglip2Config(vision_config=vision, text_config=TEXT)).save_pretrained(folder)


def dinov3(folder, card):
    """A `DINOv3ViTModel` folder with its 4 register tokens, as released."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16 if card.dim == 1024 else 12,
        patch_size=16,
        image_size=224,
        num_register_tokens=4,
    )
    DINOv3ViTModel(config).save_pretrained(folder)


def mae(folder, card):
    """A `ViTMAEForPreTraining` folder (encoder under `vit.`, plus the pixel decoder), as released."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        patch_size=16,
        image_size=224,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    ViTMAEForPreTraining(config).save_pretrained(folder)


def internvl(folder, card):
    """An InternVL `-hf` checkpoint: the whole MLLM (vision tower, projector, a one-layer Qwen2 LLM)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = dict(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=[448, 448],
        patch_size=[14, 14],
    )
    text = dict(TEXT, model_type="qwen2", num_key_value_heads=1)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=1)
    InternVLForConditionalGeneration(config).save_pretrained(folder)


def qwen25vl(folder, card):
    """A Qwen2.5-VL checkpoint: the whole MLLM, its vision tower one block deep at the 7B's widths."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(
        depth=1,
        hidden_size=1280,
        intermediate_size=64,
        num_heads=16,
        out_hidden_size=card.dim,
        fullatt_block_indexes=[0],
        window_size=112,
    )
    text = dict(TEXT, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)


# timm's depth argument per family: a ViT two blocks deep (the cards read block -2), a CNN one block a stage
SHALLOW = {"convnext": {"depths": (1, 1, 1, 1)}, "fastvit": {"layers": (1, 1, 1, 1, 1)}}


def timm_hub(folder, card):
    """timm's hub layout (config.json with architecture, model_args and the pretrained config of the card's
    tag, model.safetensors): the card's own architecture at its real width, patch size and stride, shallow."""
    import timm
    from timm.models import save_for_hf

    arch = card.spec["source"].split(".")[0]
    shallow = next((v for k, v in SHALLOW.items() if arch.startswith(k)), {"depth": 2})
    model = timm.create_model(card.spec["source"], pretrained=False, num_classes=0, **shallow)
    save_for_hf(model, folder, model_args=shallow)
    return f"local-dir:{folder}"


CARDS = {
    "google/siglip2-so400m-patch14-384": siglip_full,
    "google/siglip2-base-patch16-224": siglip_full,
    "google/siglip-large-patch16-256": siglip_full,
    "google/siglip2-large-patch16-256": siglip_full,
    "facebook/webssl-dino1b-full2b-224": dinov2,
    "timm/vit_pe_core_large_patch14_336.fb": timm_hub,
    "timm/vit_pe_spatial_large_patch14_448.fb": timm_hub,
    "timm/vit_pe_lang_large_patch14_448.fb": timm_hub,
    "timm/aimv2_large_patch14_224.apple_pt": timm_hub,
    "timm/aimv2_large_patch14_336.apple_pt": timm_hub,
    "timm/aimv2_large_patch14_448.apple_pt": timm_hub,
    "timm/vit_large_patch16_radio_v3.c_radio": timm_hub,
    "timm/convnext_large.dinov3_lvd1689m": timm_hub,
    "timm/fastvit_mci4.apple_mclip2_dfndr2b": timm_hub,
    "google/siglip2-so400m-patch16-naflex": siglip2_naflex,
    "facebook/dinov3-vitl16-pretrain-lvd1689m": dinov3,
    "facebook/dinov3-vitb16-pretrain-lvd1689m": dinov3,
    "facebook/vit-mae-large": mae,
    "OpenGVLab/InternVL3-1B-hf": internvl,
    "Qwen/Qwen2.5-VL-7B-Instruct": qwen25vl,
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_card_loads_its_architecture_with_the_declared_shape_and_composes(
    name, registry, tmp_path, photo_files
):
    from vrlab.data.images import decode_image

    card = Registry.from_config(None).get(name)
    encoder = _built(name, tmp_path)
    assert (encoder.dim, tuple(encoder.grid)) == (card.dim, card.grid)
    with torch.no_grad():
        features = encoder.encode_images([decode_image(p) for p in photo_files[:2]])
    h, w = card.grid
    assert features.tokens.shape == (2, h * w, card.dim) and bool(torch.isfinite(features.tokens).all())
    clip = build_encoder(registry, "tiny/clip").eval()
    composite = CompositeEncoder([encoder, clip], align="interpolate", grid=tuple(clip.grid))
    with torch.no_grad():
        joint = composite.encode_images([decode_image(photo_files[0])])
    assert joint.tokens.shape == (1, clip.num_tokens, card.dim + clip.dim)


def test_the_readme_encoder_table_lists_every_card_with_its_source(compose_cfg):
    """The README's table is what `vrlab task=encoders encoders.format=markdown` prints for the built-in cards."""
    from vrlab.tasks.catalog import encoders_markdown, encoders_task

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| Card | Aliases |")
    in_readme = readme[start : readme.index("\n\n", start)]
    rows = encoders_task(compose_cfg("task=encoders"))
    assert {r["name"] for r in rows} == {c.name for c in Registry.from_config({"builtin": True}).list("*")}
    assert in_readme == encoders_markdown(rows), (
        "regenerate with `vrlab task=encoders encoders.format=markdown`"
    )


def test_a_size_off_the_patch_grid_is_refused_except_at_the_checkpoints_own_resolution(registry):
    from vrlab.errors import ShapeError

    with pytest.raises(ShapeError, match="not a multiple of its patch size"):
        build_encoder(registry, "tiny/clip", overrides={"image_size": 36})


def _square(photo, size):
    """A `size` x `size` uint8 crop of a photo, so no resize stands between two preprocessors."""
    from vrlab.data.images import decode_image

    return decode_image(photo)[:, :size, :size].contiguous()


def _built(name, tmp_path, **overrides):
    card = Registry.from_config(None).get(name)
    torch.manual_seed(0)
    source = CARDS[name](tmp_path / "model", card) or str(tmp_path / "model")
    return build_card(card.with_overrides({"source": source, **overrides})).eval()


def test_qwen_vl_tokens_match_its_own_image_processor(tmp_path, photo_files):
    """vrlab's patch layout and normalisation give the merger tokens Qwen's own processor gives."""
    from transformers import Qwen2VLImageProcessor

    encoder = _built("Qwen/Qwen2.5-VL-7B-Instruct", tmp_path, image_size=112)
    image = _square(photo_files[0], 112)
    inputs = Qwen2VLImageProcessor(do_resize=False)(images=[image], return_tensors="pt")
    with torch.no_grad():
        ours = encoder.encode_images([image], dtype="float32").tokens
        ref = encoder.model(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert ours.shape == (1, 16, encoder.dim)
    torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=1e-4)


def test_siglip2_naflex_tokens_match_its_own_image_processor(tmp_path, photo_files):
    """vrlab's patch rows, mask and spatial shapes give the hidden states SigLIP 2's processor gives."""
    from transformers import Siglip2ImageProcessor

    encoder = _built("google/siglip2-so400m-patch16-naflex", tmp_path, image_size=128)
    image = _square(photo_files[1], 128)
    inputs = Siglip2ImageProcessor(max_num_patches=64)(images=[image], return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[8, 8]]  # the processor kept the size: no resampling
    with torch.no_grad():
        ours = encoder.encode_images([image], dtype="float32").tokens
        ref = encoder.model(**inputs, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_mae_sees_every_patch_in_order(tmp_path, photo_files):
    """MAE without masking: hidden state 0 is each patch's embedding plus its own position, in raster order
    (random noise would shuffle the tokens and a non-zero mask ratio drop some)."""
    from vrlab.data.images import decode_image

    encoder = _built("facebook/vit-mae-large", tmp_path, layer=0)
    pixels = encoder.transform(decode_image(photo_files[0]))[None]
    with torch.no_grad():
        tokens = encoder(pixels).tokens
        again = encoder(pixels).tokens
        emb = encoder.model.embeddings
        expected = emb.patch_embeddings(pixels) + emb.position_embeddings[:, 1:]
    assert tokens.shape == (1, 196, encoder.dim)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(tokens, again)


def test_a_tower_that_finds_none_of_its_weights_is_refused(tmp_path):
    """The InternViT card without its key mapping finds none of the tower's weights in the InternVL
    checkpoint: that is an error naming the source, not a randomly initialised tower."""
    from vrlab.errors import VrlabError

    with pytest.raises(VrlabError, match=r"does not hold the weights InternVLVisionModel needs.*key_mapping"):
        _built("OpenGVLab/InternVL3-1B-hf", tmp_path, key_mapping=None)
