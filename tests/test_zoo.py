"""Cards of current encoders: for each, a model of the card's architecture at the card's width and patch
size (one layer, random weights) saved in the released hub layout loads through the card, gives the card's
dim and grid, and composes with a CLIP card; and the README's encoder table lists every built-in card."""

import re
from pathlib import Path

import pytest
import torch

from vrlab.encoders.compose import CompositeEncoder
from vrlab.encoders.factory import build_card, build_encoder
from vrlab.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def siglip_full(folder, card):
    """A full SigLIP checkpoint (vision + text), as the fixed-resolution SigLIP 2 releases are."""
    from transformers import SiglipConfig, SiglipModel

    patch, size = {1152: (14, 384), 768: (16, 224)}[card.dim]  # the released configs' (384 is not 27 x 14)
    vision = dict(
        hidden_size=card.dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=16 if card.dim == 1152 else 12,
        patch_size=patch,
        image_size=size,
    )
    text = dict(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(folder)


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


def timm_hub(folder, card):
    """timm's hub layout (config.json with architecture and model_args, model.safetensors): the card's own
    architecture at its real width and patch size, two blocks deep (the cards read block -2)."""
    import timm
    from timm.models import save_for_hf

    arch = card.spec["source"].split(".")[0]
    model = timm.create_model(arch, pretrained=False, num_classes=0, depth=2)
    save_for_hf(model, folder, model_args={"depth": 2})
    return f"local-dir:{folder}"


CARDS = {
    "google/siglip2-so400m-patch14-384": siglip_full,
    "google/siglip2-base-patch16-224": siglip_full,
    "facebook/webssl-dino1b-full2b-224": dinov2,
    "timm/vit_pe_core_large_patch14_336.fb": timm_hub,
    "timm/vit_pe_spatial_large_patch14_448.fb": timm_hub,
    "timm/vit_pe_lang_large_patch14_448.fb": timm_hub,
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_card_loads_its_architecture_with_the_declared_shape_and_composes(
    name, registry, tmp_path, photo_files
):
    from vrlab.data.images import decode_image

    card = Registry.from_config(None).get(name)
    torch.manual_seed(0)
    source = CARDS[name](tmp_path / "model", card) or str(tmp_path / "model")
    encoder = build_card(card.with_overrides({"source": source})).eval()
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


def test_the_readme_encoder_table_lists_every_card_with_its_source():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| [^|]* \| [^|]* \| `([^`]+)` \|", readme, re.M))
    cards = Registry.from_config({"builtin": True}).list("*")
    missing = sorted(c.name for c in cards if rows.get(c.name) != c.source)
    assert not missing, f"README encoder table lacks or misstates: {missing}"


def test_a_size_off_the_patch_grid_is_refused_except_at_the_checkpoints_own_resolution(registry):
    from vrlab.errors import ShapeError

    with pytest.raises(ShapeError, match="not a multiple of its patch size"):
        build_encoder(registry, "tiny/clip", overrides={"image_size": 36})
