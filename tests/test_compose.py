"""Composite encoders: channel concatenation, grid policies, per-member normalisation and overrides."""

import pytest
import torch
import torch.nn.functional as F

from vrlab.data.images import decode_image
from vrlab.encoders.factory import build_encoder
from vrlab.errors import ShapeError


@pytest.fixture(scope="module")
def images(photo_files):
    return [decode_image(p) for p in photo_files[:2]]


def test_composite_concatenates_member_tokens(registry, images):
    composite = build_encoder(registry, "tiny/clip.tiny/dinov2")
    out = composite.encode_images(images)
    clip = build_encoder(registry, "tiny/clip").encode_images(images)
    dino = build_encoder(registry, "tiny/dinov2").encode_images(images)
    assert composite.dim == 128 and out.grid == (4, 4)
    torch.testing.assert_close(out.tokens, torch.cat([clip.tokens, dino.tokens], dim=-1))
    torch.testing.assert_close(out.pooled, torch.cat([clip.pooled, dino.pooled], dim=-1))
    assert composite.card.family == "composite"
    assert [m.name for m in composite.card.members] == ["tiny/clip", "tiny/dinov2"]


def test_each_member_keeps_its_own_transform(registry, images):
    composite = build_encoder(registry, "tiny/clip.tiny/siglip")
    pixels = composite.transform(images[0])
    clip_t = build_encoder(registry, "tiny/clip").transform(images[0])
    siglip_t = build_encoder(registry, "tiny/siglip").transform(images[0])
    torch.testing.assert_close(pixels[0], clip_t)  # centre crop, CLIP statistics
    torch.testing.assert_close(pixels[1], siglip_t)  # squash, [-1, 1]
    assert not torch.allclose(pixels[0], pixels[1])


def test_equal_policy_rejects_unequal_grids(registry):
    with pytest.raises(ShapeError) as err:
        build_encoder(registry, "tiny/clip.tiny/dinov2", overrides={"tiny/dinov2": {"image_size": 64}})
    msg = str(err.value)
    assert "'tiny/clip' 4x4" in msg and "'tiny/dinov2' 8x8" in msg and "compose.align=interpolate" in msg


def test_interpolate_policy_resamples_to_the_target_grid(registry, images):
    overrides = {"tiny/dinov2": {"image_size": 64}}
    composite = build_encoder(
        registry, "tiny/clip.tiny/dinov2", overrides=overrides, compose={"align": "interpolate"}
    )
    out = composite.encode_images(images)
    assert out.grid == (4, 4) and out.tokens.shape == (2, 16, 128)
    dino = build_encoder(registry, "tiny/dinov2", overrides={"image_size": 64}).encode_images(images)
    assert dino.grid == (8, 8)
    expected = (
        F.interpolate(dino.to_grid(), size=(4, 4), mode="bilinear", align_corners=False)
        .flatten(2)
        .transpose(1, 2)
    )
    torch.testing.assert_close(out.tokens[..., 64:], expected)
    # An explicit target grid upsamples every member.
    up = build_encoder(
        registry,
        "tiny/clip.tiny/dinov2",
        overrides=overrides,
        compose={"align": "interpolate", "grid": [8, 8]},
    )
    out8 = up.encode_images(images)
    assert out8.grid == (8, 8)
    torch.testing.assert_close(out8.tokens[..., 64:], dino.tokens)  # already 8x8: untouched


def test_normalize_makes_each_member_unit_length(registry, images):
    composite = build_encoder(registry, "tiny/clip.tiny/sd", compose={"normalize": True})
    tokens = composite.encode_images(images).tokens
    for part in (tokens[..., :64], tokens[..., 64:]):
        torch.testing.assert_close(part.norm(dim=-1), torch.ones(part.shape[:2]))
    assert composite.encode_images(images).pooled is None  # the SD member has no pooled output


def test_settings_record_the_policy(registry):
    composite = build_encoder(registry, "tiny/clip.tiny/dinov2", compose={"normalize": True})
    settings = composite.settings()
    assert settings["backend"]["align"] == "equal" and settings["backend"]["normalize"] is True
    assert [m["source"] for m in settings["backend"]["members"]] == [
        composite.members[0].source,
        composite.members[1].source,
    ]
