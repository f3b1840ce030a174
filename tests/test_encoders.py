"""Every encoder family, table-driven: a tiny random model saved to a folder, loaded back through the registry
from its card, run on real decoded photos; shapes, grid, finiteness, determinism, and tokens checked against
a direct computation with the library's own model."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vrlab.data.images import decode_image
from vrlab.encoders.factory import build_encoder
from vrlab.errors import VrlabError

# family -> (grid, dim). Worked out from the tiny architectures in vrlab.demo.tiny_encoders:
#   ViTs: 32 px / patch 8 = 4x4, width 64; EVA02-CLIP: 56 px / patch 14 = 4x4, eva02_tiny width 192.
#   SD UNets: 64 px -> 8x8 latents -> lowest level 2x2 -> up-block 0 upsamples to 4x4, 64 channels.
#   DiT: 8x8 latents / patch 2 = 4x4 tokens of 32 -> space-to-depth 2x2 of 128.
#   SD3: 4x4 tokens of 2 heads x 8 = 16 -> space-to-depth 2x2 of 64.
FAMILIES = {
    "clip": ((4, 4), 64),
    "siglip": ((4, 4), 64),
    "dinov2": ((4, 4), 64),
    "dinov2-reg": ((4, 4), 64),
    "eva02-timm": ((4, 4), 64),
    "eva02-clip": ((4, 4), 192),
    "sd": ((4, 4), 64),
    "sdxl": ((4, 4), 64),
    "sd-image-variations": ((4, 4), 64),
    "dit": ((2, 2), 128),
    "sd3": ((2, 2), 64),
}
DIFFUSION = {"sd", "sdxl", "sd-image-variations", "dit", "sd3"}


@pytest.fixture(scope="module")
def images(photo_files):
    return [decode_image(p) for p in photo_files[:3]]


def pixels_of(encoder, images):
    return torch.stack([encoder.transform(img) for img in images])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_through_registry_and_runs(family, registry, images):
    grid, dim = FAMILIES[family]
    encoder = build_encoder(registry, f"tiny/{family}")
    assert encoder.card.family and encoder.card.name == f"tiny/{family}"
    out = encoder.encode_images(images)
    assert tuple(out.grid) == grid == tuple(encoder.grid)
    assert out.tokens.shape == (len(images), grid[0] * grid[1], dim)
    assert encoder.dim == dim
    assert torch.isfinite(out.tokens).all()
    assert out.tokens.std() > 0  # not a constant map
    # Determinism: a second build from the same card gives bit-identical tokens.
    again = build_encoder(registry, f"tiny/{family}").encode_images(images)
    assert torch.equal(out.tokens, again.tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_features_do_not_depend_on_batch_composition(family, registry, images):
    encoder = build_encoder(registry, f"tiny/{family}")
    batch = encoder.encode_images(images).tokens
    alone = torch.cat([encoder.encode_images([img]).tokens for img in images])
    torch.testing.assert_close(alone, batch, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(DIFFUSION))
def test_diffusion_seed_controls_noise(family, registry, images):
    base = build_encoder(registry, f"tiny/{family}", overrides={"t": 500}).encode_images(images[:1]).tokens
    same = (
        build_encoder(registry, f"tiny/{family}", overrides={"t": 500, "seed": 0})
        .encode_images(images[:1])
        .tokens
    )
    other = (
        build_encoder(registry, f"tiny/{family}", overrides={"t": 500, "seed": 1})
        .encode_images(images[:1])
        .tokens
    )
    assert torch.equal(base, same)
    assert not torch.allclose(base, other)


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "dinov2-reg"])
def test_hf_tokens_equal_hidden_states_of_the_library_model(family, registry, tiny_root, images):
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    encoder = build_encoder(registry, f"tiny/{family}")
    folder = tiny_root / "models" / family
    model_type = AutoConfig.from_pretrained(folder).model_type
    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}.get(model_type, AutoModel)
    reference = cls.from_pretrained(folder).eval()
    pixels = pixels_of(encoder, images)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    n_prefix = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2-reg": 1 + 4}[family]
    torch.testing.assert_close(encoder(pixels).tokens, hidden[:, n_prefix:])


def test_timm_tokens_equal_block_output(registry, images):
    encoder = build_encoder(registry, "tiny/eva02-timm")
    model = encoder.model
    captured = {}
    hook = model.blocks[-2].register_forward_hook(lambda m, i, o: captured.update(x=o))
    pixels = pixels_of(encoder, images)
    with torch.no_grad():
        tokens = encoder(pixels).tokens
        model.forward_features(pixels)
    hook.remove()
    torch.testing.assert_close(tokens, captured["x"][:, model.num_prefix_tokens :])


def test_openclip_tokens_equal_trunk_block_output(registry, images):
    encoder = build_encoder(registry, "tiny/eva02-clip")
    trunk = encoder.visual.trunk
    captured = {}
    hook = trunk.blocks[-2].register_forward_hook(lambda m, i, o: captured.update(x=o))
    pixels = pixels_of(encoder, images)
    with torch.no_grad():
        out = encoder(pixels)
        pooled = encoder.visual(pixels)
    hook.remove()
    torch.testing.assert_close(out.tokens, captured["x"][:, trunk.num_prefix_tokens :])
    torch.testing.assert_close(out.pooled, pooled)  # the CLIP image embedding


def _noise(seed: int, offset: int, shape) -> torch.Tensor:
    # The documented noise convention of DiffusionEncoder: one draw per forward, shared by the batch.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + offset))


def test_sd_features_equal_a_full_unet_pass(registry, tiny_root, images):
    """DIFT-style reference written with diffusers directly: no early stop, own hook, own noising."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    encoder = build_encoder(registry, "tiny/sd", overrides={"latent": "mean", "t": 261})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_root / "models" / "sd", safety_checker=None)
    pixels = pixels_of(encoder, images)
    with torch.no_grad():
        lat = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = _noise(0, 1, (1, *lat.shape[1:])).expand_as(lat)
        ts = torch.full((len(images),), 261, dtype=torch.long)
        noisy = DDIMScheduler.from_config(pipe.scheduler.config).add_noise(lat, noise, ts)
        text = pipe.encode_prompt("", "cpu", 1, False)[0].expand(len(images), -1, -1)
        captured = {}
        hook = pipe.unet.up_blocks[0].register_forward_hook(lambda m, i, o: captured.update(x=o))
        pipe.unet(noisy, ts, encoder_hidden_states=text)
        hook.remove()
        expected = captured["x"].flatten(2).transpose(1, 2)
        torch.testing.assert_close(encoder(pixels).tokens, expected, atol=1e-5, rtol=1e-5)


def test_sd3_features_equal_a_full_transformer_pass(registry, tiny_root, images):
    from diffusers import StableDiffusion3Pipeline

    encoder = build_encoder(registry, "tiny/sd3", overrides={"latent": "mean", "t": 300})
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny_root / "models" / "sd3", text_encoder_3=None, tokenizer_3=None
    )
    pixels = pixels_of(encoder, images)
    b = len(images)
    with torch.no_grad():
        lat = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        sigma = 300 / 1000
        noisy = (1 - sigma) * lat + sigma * _noise(0, 1, (1, *lat.shape[1:]))
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt="",
            prompt_2=None,
            prompt_3=None,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        captured = {}
        hook = pipe.transformer.transformer_blocks[0].register_forward_hook(
            lambda m, i, o: captured.update(x=o[1])
        )
        pipe.transformer(
            hidden_states=noisy,
            timestep=torch.full((b,), 300),
            encoder_hidden_states=embeds.expand(b, -1, -1),
            pooled_projections=pooled.expand(b, -1),
        )
        hook.remove()
        tokens = captured["x"]  # [B, 16, 16] over a 4x4 patch grid
        fmap = tokens.transpose(1, 2).reshape(b, 16, 4, 4)
        expected = F.pixel_unshuffle(fmap, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(encoder(pixels).tokens, expected, atol=1e-5, rtol=1e-5)


def test_dit_ignores_class_conditioning(registry, images):
    encoder = build_encoder(registry, "tiny/dit", overrides={"t": 400})
    pixels = pixels_of(encoder, images[:1])
    with torch.no_grad():
        a = encoder(pixels).tokens
        # Class embeddings are zeroed by a hook, so re-seeding the table changes nothing.
        from diffusers.models.embeddings import LabelEmbedding

        for m in encoder.denoiser.modules():
            if isinstance(m, LabelEmbedding):
                m.embedding_table.weight.normal_()
        b = encoder(pixels).tokens
    assert torch.equal(a, b)


def test_image_size_override_changes_the_grid(registry, images):
    encoder = build_encoder(
        registry, "tiny/clip", overrides={"image_size": 48}
    )  # position embeddings interpolated
    out = encoder.encode_images(images[:1])
    assert out.grid == (6, 6) and out.tokens.shape == (1, 36, 64)


def test_layer_out_of_range_is_a_clear_error(registry):
    with pytest.raises(VrlabError, match=r"tiny/clip.*layer=9 is out of range"):
        build_encoder(registry, "tiny/clip", overrides={"layer": 9})


def test_missing_weights_name_the_encoder(tmp_path: Path):
    from vrlab.registry import Registry

    (tmp_path / "ghost.yaml").write_text(
        "name: ghost/model\n_target_: vrlab.encoders.hf.HFVisionEncoder\nsource: /nonexistent/folder\n"
    )
    registry = Registry.from_dirs([tmp_path], builtin=False)
    with pytest.raises(VrlabError, match=r"ghost/model.*ghost\.yaml"):
        build_encoder(registry, "ghost/model")


def test_non_finite_features_are_reported_with_the_encoder_name(registry, images):
    encoder = build_encoder(registry, "tiny/dinov2")
    with torch.no_grad():
        encoder.model.embeddings.patch_embeddings.projection.weight.fill_(float("nan"))
    with pytest.raises(VrlabError, match=r"tiny/dinov2.*non-finite tokens"):
        encoder.encode_images(images[:1])
