"""Zero-shot image-text retrieval: recall@k as LLM2CLIP and CLIP_benchmark define it, the small protocol a
retrieval model satisfies, its implementations for Hugging Face CLIP/SigLIP and open_clip models, and the
evaluation of a model on a `CaptionLoader`.

Definitions (LLM2CLIP's `training/zeroshot_retrieval.py`, copied from CLIP_benchmark): with the similarity
of every image to every caption, an image is a hit at k ("image_to_text", their "text_retrieval") when ANY
of its captions is among its k most similar captions; a caption is a hit at k ("text_to_image", their
"image_retrieval") when its own image is among its k most similar images. Recall@k is the fraction of hits,
in [0, 1] (not percent). Ties: candidates with equal scores rank in index order (the lower index first, as a
stable descending sort puts them), so a result never depends on how `torch.topk` breaks ties on a device.
A k larger than the number of candidates makes every query a hit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from vrlab.data.images import DEFAULT_MAX_PIXELS, decode_image
from vrlab.encoders.base import RESIZE_POLICIES, as_size, autocast_context, image_transform
from vrlab.errors import ShapeError, VrlabError

log = logging.getLogger(__name__)

KS = (1, 5, 10)
LLM2CLIP_CONFIG = "llm2clip_config.json"
HF_TYPES = {"clip": ("clip", "center_crop"), "siglip": ("siglip", "squash")}  # normalisation, resize
OPEN_CLIP_RESIZE = {"shortest": "center_crop", "longest": "letterbox", "squash": "squash"}
SPEC_HELP = (
    "hf:<hub id or folder>, open_clip:<model>@<pretrained tag or file>, or a folder with " + LLM2CLIP_CONFIG
)


@runtime_checkable
class RetrievalModel(Protocol):
    """What retrieval needs of a model: raw (unnormalised) embeddings of images and texts in one space."""

    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 images `[3, H, W]` (any sizes) -> `[B, D]`, the model's own preprocessing applied."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> `[M, D]`, tokenised as the model was trained."""
        ...


# --- recall@k -----------------------------------------------------------------------------------------
def _check_ks(ks: Sequence[int]) -> list[int]:
    if (
        isinstance(ks, str | bytes)
        or not ks
        or any(isinstance(k, bool) or not isinstance(k, Integral) or k < 1 for k in ks)
    ):
        raise VrlabError(f"ks must be a non-empty list of positive integers, got {ks!r}")
    return [int(k) for k in ks]


def _check_inputs(similarity: torch.Tensor, caption_image: Sequence[int]) -> torch.Tensor:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ShapeError(f"similarity must be a [n_images, n_texts] tensor, got {shape}")
    n_images, n_texts = similarity.shape
    if n_images == 0 or n_texts == 0:
        raise VrlabError(f"retrieval needs at least one image and one caption, got {n_images} x {n_texts}")
    if not torch.isfinite(similarity).all():
        rows = (~torch.isfinite(similarity)).any(1).nonzero().flatten().tolist()
        raise VrlabError(f"the similarity matrix holds NaN or infinite values in image rows {rows[:10]}")
    if len(caption_image) != n_texts:
        raise ShapeError(f"caption_image has {len(caption_image)} entries for {n_texts} captions (columns)")
    if isinstance(caption_image, torch.Tensor):
        owner = caption_image.detach().flatten().cpu()
    else:
        owner = torch.as_tensor([int(i) if isinstance(i, Integral) else i for i in caption_image])
    if owner.dtype.is_floating_point or owner.dtype == torch.bool:
        raise VrlabError("caption_image must hold integer image indices")
    owner = owner.long()
    bad = ((owner < 0) | (owner >= n_images)).nonzero().flatten().tolist()
    if bad:
        raise VrlabError(
            f"caption_image[{bad[0]}] = {int(owner[bad[0]])} is not an image index (0..{n_images - 1})"
        )
    orphans = (torch.bincount(owner, minlength=n_images) == 0).nonzero().flatten().tolist()
    if orphans:
        raise VrlabError(f"images {orphans[:10]} have no caption; every image needs at least one")
    return owner


def _ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of `scores[r, positive[r]]` within row r: candidates scoring higher, plus candidates
    scoring equal with a lower index (the tie rule)."""
    pos = scores.gather(1, positive[:, None])
    before = torch.arange(scores.shape[1], device=scores.device)[None, :] < positive[:, None]
    return (scores > pos).sum(1) + ((scores == pos) & before).sum(1)


def retrieval_ranks(
    similarity: torch.Tensor, caption_image: Sequence[int], chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank of any caption of each image among all captions `[n_images]`, rank of each caption's own
    image among all images `[n_texts]`), 0-based, ties in index order. Rows go in chunks of `chunk`
    captions, so memory stays at chunk x max(n_images, n_texts)."""
    owner = _check_inputs(similarity, caption_image)
    # float64 stays float64: rounding it to float32 could create ties the scores do not have
    sim = similarity if similarity.dtype in (torch.float32, torch.float64) else similarity.float()
    owner = owner.to(sim.device)
    n_images, n_texts = sim.shape
    caption_rank = torch.empty(n_texts, dtype=torch.long, device=sim.device)
    image_rank = torch.empty(n_texts, dtype=torch.long, device=sim.device)
    for start in range(0, n_texts, chunk):
        c = torch.arange(start, min(start + chunk, n_texts), device=sim.device)
        caption_rank[c] = _ranks(sim[owner[c]], c)  # caption c within its image's row
        image_rank[c] = _ranks(sim[:, c].T, owner[c])  # its image within caption c's column
    best = torch.full((n_images,), n_texts, dtype=torch.long, device=sim.device)
    best.scatter_reduce_(0, owner, caption_rank, reduce="amin")
    return best.cpu(), image_rank.cpu()


def recall_at_k(
    similarity: torch.Tensor, caption_image: Sequence[int], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k in [0, 1] both ways: `image_to_text@k` (an image is a hit if any of its captions is in its
    top k) and `text_to_image@k` (a caption is a hit if its image is in its top k). `similarity` is
    `[n_images, n_texts]`; `caption_image[j]` is the image index of caption j."""
    ks = _check_ks(ks)
    best, image_rank = retrieval_ranks(similarity, caption_image)
    # exact fractions (counts over a Python division), not float32 means
    out = {f"image_to_text@{k}": int((best < k).sum()) / len(best) for k in ks}
    return out | {f"text_to_image@{k}": int((image_rank < k).sum()) / len(image_rank) for k in ks}


# --- models -------------------------------------------------------------------------------------------
def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object (projection in `pooler_output`), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _device(model: Any) -> torch.device:
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next((p.device for p in params), torch.device("cpu"))


class HFRetrievalModel(nn.Module):
    """A Hugging Face CLIPModel or SiglipModel with its tokenizer (never remote code).

    Images go through vrlab's `image_transform` at the model's image_size: CLIP statistics with a centre
    crop (CLIPImageProcessor), SigLIP statistics with a plain resize (SiglipImageProcessor). Texts are
    truncated at the text tower's positions; SigLIP pads to that length and gets no attention mask, as it
    was trained.
    """

    def __init__(self, source: str, revision: str | None = None, **transform: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
        self.model_type = getattr(config, "model_type", "")
        if self.model_type not in HF_TYPES:
            raise VrlabError(
                f"hf:{source} is a '{self.model_type}' model; retrieval supports {sorted(HF_TYPES)} "
                "checkpoints with both towers"
            )
        self.source, self.revision = source, revision
        self.model = AutoModel.from_pretrained(source, revision=revision, trust_remote_code=False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        normalize, resize = HF_TYPES[self.model_type]
        size = as_size(config.vision_config.image_size)
        self.transform = image_transform(size, normalize, resize, **transform)
        self.max_length = int(config.text_config.max_position_embeddings)

    def settings(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "source": self.source,
            "revision": self.revision,
            "model_type": self.model_type,
            "transform": self.transform.settings(),
            "max_length": self.max_length,
        }

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack([self.transform(img) for img in images]).to(_device(self))
        return _features(self.model.get_image_features(pixel_values=pixels)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        siglip = self.model_type == "siglip"
        tokens = self.tokenizer(
            list(texts),
            padding="max_length" if siglip else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = _device(self)
        kwargs = {"input_ids": tokens["input_ids"].to(device)}
        if not siglip and "attention_mask" in tokens:
            kwargs["attention_mask"] = tokens["attention_mask"].to(device)
        return _features(self.model.get_text_features(**kwargs)).float().cpu()


class OpenCLIPRetrievalModel(nn.Module):
    """An open_clip model (`name` a built-in architecture, `hf-hub:org/repo` or `local-dir:/folder`) with
    `pretrained` a tag or a weights file (loaded weights_only), and open_clip's tokenizer for it.

    Images go through vrlab's `image_transform` built from the model's own preprocess config (size, mean,
    std, interpolation, resize mode: shortest -> center_crop, longest -> letterbox, squash -> squash).
    """

    def __init__(self, name: str, pretrained: str | None = None, **transform: Any) -> None:
        super().__init__()
        import open_clip

        self.name, self.pretrained = name, pretrained or None
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=self.pretrained, weights_only=True
        )
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = as_size(cfg.get("size") or self.model.visual.image_size)
        defaults = {
            "resize": OPEN_CLIP_RESIZE.get(cfg.get("resize_mode", "shortest"), "center_crop"),
            "interpolation": cfg.get("interpolation")
            if cfg.get("interpolation") in ("bilinear", "bicubic")
            else None,
        }
        if not {"mean", "normalize"} & set(transform) and cfg.get("mean") is not None:
            transform |= {"mean": cfg["mean"], "std": cfg["std"]}
        options = {k: v for k, v in defaults.items() if v is not None} | transform
        resize = options.pop("resize")
        if resize not in RESIZE_POLICIES:
            raise VrlabError(
                f"open_clip:{name}: unknown resize policy '{resize}'; choose one of {RESIZE_POLICIES}"
            )
        self.transform = image_transform(size, "clip", resize, **options)

    @property
    def source(self) -> str:
        return self.name.removeprefix("local-dir:")

    def settings(self) -> dict[str, Any]:
        return {
            "backend": "open_clip",
            "source": self.source,
            "pretrained": self.pretrained,
            "transform": self.transform.settings(),
        }

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack([self.transform(img) for img in images]).to(_device(self))
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(_device(self))).float().cpu()


def _build(spec: str, **options: Any) -> Any:
    kind, sep, rest = spec.partition(":")
    if sep and kind == "hf" and rest:
        return HFRetrievalModel(rest, **options)
    if sep and kind == "open_clip" and rest:
        name, _, pretrained = rest.partition("@")
        return OpenCLIPRetrievalModel(name, pretrained or None, **options)
    folder = Path(rest if sep and kind == "llm2clip" else spec).expanduser()
    if (folder / LLM2CLIP_CONFIG).is_file():
        from vrlab.llm2clip.model import LLM2CLIPModel  # the LLM2CLIP stack loads only when asked for

        if options:
            raise VrlabError(f"an LLM2CLIP model ({folder}) takes no options, got {sorted(options)}")
        return LLM2CLIPModel.from_pretrained(folder)
    if sep and kind == "llm2clip":
        raise VrlabError(f"retrieval model '{spec}': {folder} has no {LLM2CLIP_CONFIG}")
    raise VrlabError(f"unknown retrieval model '{spec}'; use {SPEC_HELP}")


def load_retrieval_model(spec: str, device: str | torch.device = "cpu", **options: Any) -> Any:
    """The retrieval model `spec` names, in eval mode on `device`: `hf:<hub id or folder>` (CLIP, SigLIP),
    `open_clip:<model>@<pretrained tag or file>` (`@...` optional, e.g. for `local-dir:` folders), or a
    folder with `llm2clip_config.json` (also as `llm2clip:<folder>`). `options` are image transform
    options (resize, normalize, mean, std, ...) for the hf and open_clip kinds."""
    if not isinstance(spec, str) or not spec.strip():
        raise VrlabError(f"no retrieval model given; use {SPEC_HELP}")
    try:
        model = _build(spec.strip(), **options)
    except VrlabError:
        raise
    except Exception as exc:  # hub misses, missing files, wrong architectures: one line naming the model
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VrlabError(f"cannot load retrieval model '{spec}': {first}") from exc
    return model.to(device).eval()


# --- evaluation ---------------------------------------------------------------------------------------
def _embed(batches: Any, encode: Any, what: str, model: Any, total: int, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=total, desc=f"retrieval {what}", unit=what, disable=not progress) as bar:
        for batch in batches:
            emb = encode(batch)
            if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(batch):
                shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ShapeError(
                    f"{type(model).__name__}.encode_{what} gave {shape} for a batch of {len(batch)}; "
                    "expected [batch, dim]"
                )
            out.append(emb.detach().float().cpu())
            bar.update(len(batch))
    emb = torch.cat(out)
    if not torch.isfinite(emb).all():
        rows = (~torch.isfinite(emb)).any(1).nonzero().flatten().tolist()
        raise VrlabError(f"{type(model).__name__} produced non-finite {what} embeddings at rows {rows[:10]}")
    return emb


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], max_pixels: int | None) -> None:
        self.paths, self.max_pixels = list(paths), max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i], self.max_pixels)


def evaluate_retrieval(
    model: Any,
    loader: Any,
    batch_size: int = 64,
    ks: Sequence[int] = KS,
    limit: int | None = None,
    dtype: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed `loader`'s images (vrlab's decoding) and captions in batches, L2-normalise both, and compute
    `recall_at_k` on their cosine similarity. `limit` keeps the first N images and only their captions.

    Returns one flat dict: the `recall_at_k` keys (`image_to_text@k`, `text_to_image@k`, fractions) and
    `n_images`, `n_texts`, `embed_dim`, `ks`, `limit`. On CUDA, `dtype` auto|bfloat16 runs the towers under bf16 autocast.
    """
    if not hasattr(loader, "captions") or not hasattr(loader, "caption_image"):
        raise VrlabError(
            f"{type(loader).__name__} has no captions; retrieval needs a CaptionLoader benchmark"
        )
    if not isinstance(model, RetrievalModel):
        raise VrlabError(
            f"{type(model).__name__} is not a retrieval model (needs encode_images and encode_texts)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VrlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise VrlabError(f"limit must be a positive integer or None, got {limit!r}")
    ks = _check_ks(ks)
    items = loader.items[:limit] if limit else list(loader.items)
    keep = [j for j, i in enumerate(loader.caption_image) if i < len(items)]
    texts = [loader.captions[j] for j in keep]
    owner = [loader.caption_image[j] for j in keep]
    images = torch.utils.data.DataLoader(
        _Images([it.path for it in items], max_pixels),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
    )
    text_batches = (texts[s : s + batch_size] for s in range(0, len(texts), batch_size))
    with torch.no_grad(), autocast_context(_device(model), dtype):
        image_emb = _embed(images, model.encode_images, "images", model, len(items), progress)
        text_emb = _embed(text_batches, model.encode_texts, "texts", model, len(texts), progress)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ShapeError(
            f"{type(model).__name__}: image embeddings have width {image_emb.shape[1]} but text embeddings "
            f"{text_emb.shape[1]}"
        )
    similarity = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    return {
        **recall_at_k(similarity, owner, ks),
        "n_images": len(items),
        "n_texts": len(texts),
        "embed_dim": int(image_emb.shape[1]),
        "ks": _check_ks(ks),
        "limit": limit,
    }
