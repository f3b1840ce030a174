"""Diffusers backend: one-step (DIFT-style) denoiser features from Stable Diffusion, SDXL, SD image
variations, DiT and SD3, loaded with `DiffusionPipeline.from_pretrained(source)`.

For each batch: VAE latents (sampled with seeded noise, times the scaling factor), seeded noise added at
timestep `t`, one denoiser pass with empty-prompt conditioning (the image's CLIP embedding for
sd-image-variations, the class embedding zeroed for DiT, CLIP-L + CLIP-G with T5 dropped for SD3), and the
output of block `block` (UNet up-block, or transformer block for DiT/SD3, which are 2x2 space-to-depth'd).
The forward pass stops right after that block. Defaults follow the law paper's code (t=1, block 0, 768 px,
prompt '').

Noise is drawn from a generator seeded with `seed` for one image and shared by every image of a batch, so
an image's features do not depend on which batch, rank or resumed run it lands in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.encoders.base import Features, VisionEncoder, image_transform
from vrlab.errors import VrlabError

KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionImageVariationPipeline": "image_variation",
    "DiTPipeline": "dit",
    "StableDiffusion3Pipeline": "sd3",
}


class _StopForward(Exception):
    """Raised by the feature hook so the denoiser skips every block after the chosen one."""


class DiffusionEncoder(VisionEncoder):
    """Features of a diffusion denoiser at one noise level."""

    lazy_shape = True

    def __init__(
        self,
        source: str,
        t: int = 1,
        block: int = 0,
        image_size: int | Sequence[int] = 768,
        prompt: str = "",
        ensemble_size: int = 1,
        seed: int = 0,
        latent: str = "sample",
        added_conditioning: bool = False,
        image_encoder_normalize: bool = False,
        space_to_depth: bool | None = None,
        kind: str | None = None,
        pipeline_kwargs: Mapping[str, Any] | None = None,
        revision: str | None = None,
        **transform: Any,
    ) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, DiffusionPipeline

        if latent not in ("sample", "mean"):
            raise VrlabError(f"latent='{latent}' must be 'sample' or 'mean'")
        if ensemble_size < 1:
            raise VrlabError(f"ensemble_size={ensemble_size} must be at least 1")
        pipe = DiffusionPipeline.from_pretrained(source, revision=revision, **dict(pipeline_kwargs or {}))
        self.kind = kind or KINDS.get(type(pipe).__name__)
        if self.kind not in KINDS.values():
            raise VrlabError(
                f"pipeline {type(pipe).__name__} at '{source}' is not supported; set kind to one of {sorted(set(KINDS.values()))}"
            )
        self.source, self.t, self.block, self.prompt = source, int(t), int(block), prompt
        self.ensemble_size, self.seed, self.latent = int(ensemble_size), int(seed), latent
        self.added_conditioning, self.image_encoder_normalize = (
            bool(added_conditioning),
            bool(image_encoder_normalize),
        )
        self.space_to_depth = self.kind in ("dit", "sd3") if space_to_depth is None else bool(space_to_depth)
        self.vae = pipe.vae.eval()
        self.denoiser = (pipe.transformer if self.kind in ("dit", "sd3") else pipe.unet).eval()
        if self.kind == "sd3":
            self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
            self.scheduler = None
        else:
            # The law code noises with DDIM's schedule whatever scheduler the pipeline ships.
            self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.transform = image_transform(image_size, "diffusion", "squash", **transform)
        blocks = self._blocks()
        if not -len(blocks) <= self.block < len(blocks):
            raise VrlabError(
                f"block={block} is out of range for '{source}', which has {len(blocks)} feature blocks"
            )
        self._conditioning(pipe)
        self._hooks = [blocks[self.block].register_forward_hook(self._capture)]
        if self.kind == "dit":
            from diffusers.models.embeddings import LabelEmbedding

            # Remove the class conditioning, as the law code does: only the timestep embedding remains.
            self._hooks += [
                m.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
                for m in self.denoiser.modules()
                if isinstance(m, LabelEmbedding)
            ]
        if self.kind == "sdxl" and not self.added_conditioning:
            # The law code's custom UNet forward never adds SDXL's text/time embedding.
            self._hooks.append(
                self.denoiser.add_embedding.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
            )
        self._captured: torch.Tensor | None = None

    # --- set-up ----------------------------------------------------------------------------------
    def _blocks(self) -> torch.nn.ModuleList:
        return self.denoiser.transformer_blocks if self.kind in ("dit", "sd3") else self.denoiser.up_blocks

    @torch.no_grad()
    def _conditioning(self, pipe: Any) -> None:
        """Encode the prompt once; text encoders are then dropped (the image encoder stays for image variations)."""
        cond: dict[str, torch.Tensor] = {}
        if self.kind == "sd":
            cond["encoder_hidden_states"] = pipe.encode_prompt(self.prompt, "cpu", 1, False)[0]
        elif self.kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                self.prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            cond["encoder_hidden_states"], cond["text_embeds"] = embeds, pooled
        elif self.kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=self.prompt,
                prompt_2=None,
                prompt_3=None,
                device="cpu",
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            cond["encoder_hidden_states"], cond["pooled_projections"] = embeds, pooled
        elif self.kind == "image_variation":
            self.image_encoder = pipe.image_encoder.eval()
            fe = pipe.feature_extractor
            mean = getattr(fe, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
            std = getattr(fe, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]
            self.register_buffer("clip_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("clip_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for key, value in cond.items():
            self.register_buffer(f"cond_{key}", value.detach().float(), persistent=False)
        self._cond_keys = tuple(cond)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        # SD3 joint blocks return (context, hidden); the last one returns (None, hidden).
        self._captured = output[-1] if isinstance(output, tuple) else output
        raise _StopForward

    def backend_settings(self) -> dict[str, Any]:
        return {
            "backend": "diffusers",
            "source": self.source,
            "kind": self.kind,
            "t": self.t,
            "block": self.block,
            "prompt": self.prompt,
            "ensemble_size": self.ensemble_size,
            "seed": self.seed,
            "latent": self.latent,
            "added_conditioning": self.added_conditioning,
            "image_encoder_normalize": self.image_encoder_normalize,
            "space_to_depth": self.space_to_depth,
        }

    # --- forward ---------------------------------------------------------------------------------
    def _noise(
        self, shape: Sequence[int], device: torch.device, dtype: torch.dtype, offset: int
    ) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1000 + offset)
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels).latent_dist
        lat = dist.mean
        if self.latent == "sample":
            lat = lat + dist.std * self._noise((1, *lat.shape[1:]), lat.device, lat.dtype, offset=0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * self.vae.config.scaling_factor

    def _denoise(self, noisy: torch.Tensor, pixels: torch.Tensor) -> None:
        b = noisy.shape[0]
        ts = torch.full((b,), self.t, device=noisy.device, dtype=torch.long)
        cond = {
            k: getattr(self, f"cond_{k}").expand(b, *getattr(self, f"cond_{k}").shape[1:])
            for k in self._cond_keys
        }
        if self.kind in ("sd", "sdxl"):
            extra = {}
            if self.kind == "sdxl":
                h, w = pixels.shape[-2:]
                time_ids = torch.tensor([h, w, 0, 0, h, w], device=noisy.device, dtype=noisy.dtype).expand(
                    b, 6
                )
                extra["added_cond_kwargs"] = {"text_embeds": cond.pop("text_embeds"), "time_ids": time_ids}
            self.denoiser(noisy, ts, encoder_hidden_states=cond["encoder_hidden_states"], **extra)
        elif self.kind == "image_variation":
            x = F.interpolate(
                pixels, size=self.image_encoder.config.image_size, mode="bilinear", align_corners=False
            )
            if self.image_encoder_normalize:
                x = ((x + 1) / 2 - self.clip_mean) / self.clip_std
            emb = self.image_encoder(pixel_values=x).image_embeds.unsqueeze(1)
            self.denoiser(noisy, ts, encoder_hidden_states=emb.repeat_interleave(b // emb.shape[0], dim=0))
        elif self.kind == "dit":
            self.denoiser(
                noisy, timestep=ts, class_labels=torch.zeros(b, dtype=torch.long, device=noisy.device)
            )
        else:  # sd3
            self.denoiser(
                hidden_states=noisy,
                timestep=ts,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
            )

    def forward(self, pixels: torch.Tensor) -> Features:
        lat = self._latents(pixels)
        b, e = lat.shape[0], self.ensemble_size
        noise = self._noise((e, *lat.shape[1:]), lat.device, lat.dtype, offset=1)
        lat_e = lat.repeat_interleave(e, dim=0)  # [b*e, ...]: image i's e copies are adjacent
        noise_e = noise.repeat(b, 1, 1, 1)
        if self.kind == "sd3":
            sigma = self.t / self.num_train_timesteps  # flow matching: x_t = (1 - s) x0 + s eps
            noisy = (1 - sigma) * lat_e + sigma * noise_e
        else:
            ts = torch.full((b * e,), self.t, dtype=torch.long, device=lat.device)
            noisy = self.scheduler.add_noise(lat_e, noise_e, ts)
        pix_e = pixels.repeat_interleave(e, dim=0) if self.kind == "image_variation" else pixels
        self._captured = None
        with contextlib.suppress(_StopForward):
            self._denoise(noisy, pix_e)
        if self._captured is None:
            raise VrlabError(
                f"block {self.block} of '{self.source}' was never reached in the denoiser's forward pass"
            )
        fmap = self._to_map(self._captured, lat.shape[-2:])
        fmap = fmap.view(b, e, *fmap.shape[1:]).mean(dim=1)
        if self.space_to_depth:
            c, h, w = fmap.shape[1:]
            fmap = F.unfold(fmap, kernel_size=2, stride=2).view(b, c * 4, h // 2, w // 2)
        self._captured = None
        h, w = fmap.shape[2:]
        return Features(tokens=fmap.flatten(2).transpose(1, 2), grid=(h, w), pooled=None)

    def _to_map(self, out: torch.Tensor, latent_hw: Sequence[int]) -> torch.Tensor:
        """Block output as `[B, C, h, w]`; transformer tokens are reshaped over the patch grid."""
        if out.dim() == 4:
            return out
        patch = self.denoiser.config.patch_size
        h, w = latent_hw[0] // patch, latent_hw[1] // patch
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
