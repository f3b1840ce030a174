"""C score (visual correspondence): PCK@α on SPair-71k-layout pairs from an encoder's dense features.

Two named protocols, both presets of `CorrespondenceSettings` (the Law paper's C score):
- `law`: the authors' code as written. Every model gets a squashed input scaled to [-1, 1]; keypoints live in
  an 840 x 840 letterbox frame; the native token grid; window soft-argmax (window 5, temperature 0.02, with
  cells outside the window zeroed, not removed, so they keep a little weight); prediction at
  `coord * 840/n + (840/n)//2`; threshold α · max side of the target bbox in that frame; PCK per pair,
  averaged over pairs (= categories weighted by their pair counts). DiT maps are transposed, as the code does.
- `standard`: features from the same letterboxed frame as the keypoints, each encoder's own normalisation,
  optional bilinear upsampling, argmax or (window) soft-argmax, optional adaptive flip of the source.
Matching is vectorised per pair: one matrix product for all keypoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from vrlab.data.loaders import Pair
from vrlab.encoders.base import letterbox_geometry
from vrlab.encoders.resolution import Layout
from vrlab.errors import VrlabError

log = logging.getLogger(__name__)
MATCHING = ("window_soft_argmax", "soft_argmax", "argmax")


@dataclass(frozen=True)
class CorrespondenceSettings:
    """Every setting that changes a C number; written into each result."""

    protocol: str = "standard"
    input_resize: str = "letterbox"  # how the encoder's input is made: letterbox | squash
    input_normalize: str | None = None  # None: the encoder's own; 'diffusion' = [-1, 1] for every model (law)
    frame: int | None = None  # keypoint frame size; law: 840, standard: the encoder's input size
    matching: str = "argmax"
    window: int = 5
    temperature: float = 0.02
    half_cell_floor: bool = False  # law: (frame/n)//2 as the cell-centre offset
    upsample: int | None = None  # bilinear upsampling of both maps to this grid side before matching
    flip: bool = False  # adaptive horizontal flip of the source (standard only)
    transpose_features: bool = False  # law's DiT quirk (set automatically for the dit family under law)
    alphas: tuple[float, ...] = (0.1, 0.05, 0.01)
    threshold: str = "bbox"  # bbox: α · max side of the target bbox; image: α · frame size
    pairs: str = "all pairs of the split"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROTOCOLS = {
    "law": CorrespondenceSettings(
        protocol="law",
        input_resize="squash",
        input_normalize="diffusion",
        frame=840,
        matching="window_soft_argmax",
        window=5,
        temperature=0.02,
        half_cell_floor=True,
    ),
    "standard": CorrespondenceSettings(
        protocol="standard", input_resize="letterbox", input_normalize=None, frame=None, matching="argmax"
    ),
}


def protocol_settings(name: str, **overrides: Any) -> CorrespondenceSettings:
    """A protocol preset with overrides (for example `upsample=64` or `matching='window_soft_argmax'`)."""
    if name not in PROTOCOLS:
        raise VrlabError(f"unknown correspondence protocol '{name}'; choose one of {sorted(PROTOCOLS)}")
    settings = replace(
        PROTOCOLS[name], **{k: (tuple(v) if k == "alphas" else v) for k, v in overrides.items()}
    )
    if settings.matching not in MATCHING:
        raise VrlabError(f"matching='{settings.matching}' is not one of {MATCHING}")
    if settings.protocol == "law" and settings.flip:
        raise VrlabError("the law protocol has no flip test (ADAPT_FLIP: false); use protocol=standard")
    return settings


def to_frame(points: Sequence[Sequence[float]], size: tuple[int, int], frame: int, law: bool) -> torch.Tensor:
    """Keypoints (x, y) of an image of `size` (w, h) in a `frame` x `frame` letterbox (centred padding)."""
    w, h = size
    pts = torch.tensor(points, dtype=torch.float64).reshape(-1, 2)
    if law:  # the Law code's preprocess_kps_pad: offset int((frame - round(frame * short / long)) / 2)
        scale = frame / max(w, h)
        offset = int((frame - round(frame * min(w, h) / max(w, h))) / 2)
        pts = pts * scale
        pts[:, 1 if h < w else 0] += offset
        return pts
    scale, _, _, top, left = letterbox_geometry(h, w, (frame, frame))
    return pts * scale + torch.tensor([left, top], dtype=torch.float64)


def match(
    source: torch.Tensor,
    target: torch.Tensor,
    points: torch.Tensor,
    frame: float | tuple[float, float],
    settings: CorrespondenceSettings,
    target_frame: float | tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted target positions (target frame pixels, [K, 2]) of source `points` ([K, 2] frame pixels).

    `source` and `target` are L2-normalised maps `[h, w, D]` (their grids may differ when each image has its
    own layout); a frame is a side or an (h, w) pixel area, the target's the source's unless given. Returns
    predictions and each point's best similarity (used by the flip test).
    """
    fh, fw = (frame, frame) if not isinstance(frame, tuple) else frame
    target_frame = target_frame if target_frame is not None else (fh, fw)
    th_frame, tw_frame = target_frame if isinstance(target_frame, tuple) else (target_frame,) * 2
    sh, sw, d = source.shape
    h, w, _ = target.shape
    cx = (points[:, 0] * sw / fw).floor().long().clamp(0, sw - 1)
    cy = (points[:, 1] * sh / fh).floor().long().clamp(0, sh - 1)
    sim = source.reshape(-1, d)[cy * sw + cx] @ target.reshape(-1, d).T  # [K, h*w]
    best_sim, best = sim.max(dim=1)
    by, bx = (best // w).double(), (best % w).double()
    if settings.matching == "argmax":
        coord_x, coord_y = bx, by
    else:
        s = sim.reshape(-1, h, w).double()
        if settings.matching == "window_soft_argmax":
            yy = torch.arange(h, dtype=torch.float64).view(1, h, 1)
            xx = torch.arange(w, dtype=torch.float64).view(1, 1, w)
            inside = ((yy - by.view(-1, 1, 1)).abs() <= settings.window) & (
                (xx - bx.view(-1, 1, 1)).abs() <= settings.window
            )
            s = s * inside  # zeroed, not removed: outside cells keep exp(-max/β) weight, as the law code does
        s = s - s.flatten(1).max(dim=1).values.view(-1, 1, 1)
        weights = torch.softmax(s.flatten(1) / settings.temperature, dim=1).view(-1, h, w)
        ex = (weights.sum(dim=1) * torch.linspace(-1, 1, w, dtype=torch.float64)).sum(dim=1)
        ey = (weights.sum(dim=2) * torch.linspace(-1, 1, h, dtype=torch.float64)).sum(dim=1)
        coord_x, coord_y = (ex + 1) / 2 * (w - 1), (ey + 1) / 2 * (h - 1)
    cell_w, cell_h = tw_frame / w, th_frame / h
    half_w, half_h = (cell_w // 2, cell_h // 2) if settings.half_cell_floor else (cell_w / 2, cell_h / 2)
    return torch.stack([coord_x * cell_w + half_w, coord_y * cell_h + half_h], dim=1), best_sim


def prepare_map(tokens: torch.Tensor, grid: Sequence[int], settings: CorrespondenceSettings) -> torch.Tensor:
    """Tokens `[N, D]` -> an L2-normalised `[h, w, D]` map (transposed or upsampled per settings)."""
    fmap = tokens.float().reshape(grid[0], grid[1], -1)
    if settings.transpose_features:
        fmap = fmap.transpose(0, 1).reshape(
            grid[0], grid[1], -1
        )  # the law code's permute-then-view of DiT maps
    if settings.upsample:
        fmap = F.interpolate(
            fmap.permute(2, 0, 1)[None],
            size=(settings.upsample, settings.upsample),
            mode="bilinear",
            align_corners=False,
        )[0].permute(1, 2, 0)
    return F.normalize(fmap, dim=-1)


def layout_points(points: Sequence[Sequence[float]], layout: Layout) -> torch.Tensor:
    """Image pixels (x, y) -> the frame of the layout's last view (its own geometry, see `Layout`)."""
    pts = torch.tensor(points, dtype=torch.float64).reshape(-1, 2)
    return pts * torch.tensor(layout.scale, dtype=torch.float64) + torch.tensor(
        layout.offset, dtype=torch.float64
    )


def pck(
    pairs: Sequence[Pair],
    features: Callable[[str, bool], torch.Tensor],
    grid: Sequence[int],
    frame: int,
    settings: CorrespondenceSettings,
    layouts: Callable[[str], Layout] | None = None,
) -> dict[str, Any]:
    """PCK per point, per pair (image), per category and overall, at every α.

    `features(item_id, flipped)` returns tokens `[h*w, D]` of an image (flipped horizontally if asked). With
    `layouts` (item id -> `Layout`: the anyres and native strategies), each image has its own grid and frame,
    the last view's, and keypoints are placed through its own geometry; `grid` and `frame` are then unused.
    """
    law = settings.protocol == "law"

    def place(item: str, pts: Sequence[Sequence[float]], size: tuple[int, int]) -> tuple[Any, Any, Any]:
        if layouts is None:
            return to_frame(pts, size, frame, law), tuple(grid), (frame, frame)
        lay = layouts(item)
        return layout_points(pts, lay), lay.views[-1], tuple(lay.frame)

    per_pair, per_point = [], []
    for pair in pairs:
        points, src_grid, src_frame = place(pair.source, pair.source_kps, pair.source_size)
        gt, tgt_grid, tgt_frame = place(pair.target, pair.target_kps, pair.target_size)
        src = prepare_map(features(pair.source, False), src_grid, settings)
        tgt = prepare_map(features(pair.target, False), tgt_grid, settings)
        pred, score = match(src, tgt, points, src_frame, settings, tgt_frame)
        flipped = False
        if settings.flip:
            if layouts is None:
                _, _, new_w, _, left = letterbox_geometry(
                    pair.source_size[1], pair.source_size[0], (frame, frame)
                )
                mirrored = points.clone()
                mirrored[:, 0] = 2 * left + new_w - points[:, 0]
            else:  # the mirrored image has the same size, so the same layout
                kps = torch.tensor(pair.source_kps, dtype=torch.float64).reshape(-1, 2)
                kps[:, 0] = pair.source_size[0] - kps[:, 0]
                mirrored = layout_points(kps.tolist(), layouts(pair.source))
            src_f = prepare_map(features(pair.source, True), src_grid, settings)
            pred_f, score_f = match(src_f, tgt, mirrored, src_frame, settings, tgt_frame)
            if score_f.mean() > score.mean():
                pred, flipped = pred_f, True
        corners, _, _ = place(pair.target, [pair.target_bbox[:2], pair.target_bbox[2:]], pair.target_size)
        x0, y0, x1, y1 = corners.flatten().tolist()
        base = max(x1 - x0, y1 - y0) if settings.threshold == "bbox" else max(tgt_frame)
        dist = (pred - gt).norm(dim=1)
        row = {"pair": pair.id, "category": pair.category, "n_points": len(gt), "flipped": flipped}
        for a in settings.alphas:
            ok = dist < a * base
            row[f"pck@{a}"] = ok.double().mean().item() * 100
            per_point += [
                {
                    "pair": pair.id,
                    "category": pair.category,
                    "k": k,
                    "alpha": a,
                    "correct": bool(c),
                    "distance": float(dd),
                }
                for k, (c, dd) in enumerate(zip(ok.tolist(), dist.tolist(), strict=True))
            ]
        per_pair.append(row)
    if not per_pair:
        raise VrlabError("no correspondence pairs to evaluate")
    summary: dict[str, Any] = {}
    for a in settings.alphas:
        key = f"pck@{a}"
        cats = sorted({r["category"] for r in per_pair})
        by_cat = {c: _mean([r[key] for r in per_pair if r["category"] == c]) for c in cats}
        points = [p for p in per_point if p["alpha"] == a]
        summary[key] = {
            "per_image": _mean([r[key] for r in per_pair]),  # = categories weighted by their pair counts
            "per_category_mean": _mean(list(by_cat.values())),
            "per_point": 100 * sum(p["correct"] for p in points) / len(points),
            "per_category": by_cat,
        }
    return {"summary": summary, "per_pair": per_pair, "per_point": per_point}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def settings_for(protocol: str, families: Sequence[str] = (), **overrides: Any) -> CorrespondenceSettings:
    """A protocol's settings for an encoder of these member families (law: DiT maps transposed, as its code)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if protocol == "law" and "transpose_features" not in overrides and "dit" in families:
        overrides["transpose_features"] = True
    return protocol_settings(protocol, **overrides)


def extraction_options(
    settings: CorrespondenceSettings,
    encoder_args: Mapping[str, Any] | None = None,
    compose: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder overrides and composite policy a protocol extracts with.

    The protocol decides the input resize (and, for `law`, the normalisation); composite members are
    L2-normalised so the joint cosine is the mean of the members' cosines.
    """
    args = dict(encoder_args or {}) | {"resize": settings.input_resize}
    if settings.input_normalize:
        args["normalize"] = settings.input_normalize
    return args, dict(compose or {}) | {"normalize": True}


def correspondence(
    store: Any,
    pairs: Sequence[Pair],
    settings: CorrespondenceSettings | str = "standard",
    flipped: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """PCK of the tokens in `store` (an EmbeddingStore) on `pairs`; `flipped(item_id)` gives the tokens of the
    horizontally flipped image when the flip test is on. Returns `C` (PCK@0.1 per image) and every summary."""
    if isinstance(settings, str):
        settings = protocol_settings(settings)
    if settings.flip and flipped is None:
        raise VrlabError("the flip test needs the encoder: pass flipped=<item id -> flipped tokens>")
    transform = store.settings.get("encoder", {}).get("transform", {})
    resizes = {t.get("resize") for t in transform.get("members", [transform])} - {None}
    if resizes - {settings.input_resize}:
        raise VrlabError(
            f"store {store.path} holds {sorted(resizes)} inputs but protocol '{settings.protocol}' keypoints "
            f"assume {settings.input_resize}; extract it with vrlab.correspondence_store(...)"
        )
    grid = tuple(store.manifest["grid"])
    frame = settings.frame or max(store.manifest["image_size"])
    ragged = getattr(store, "ragged", False)
    if ragged and settings.protocol == "law":
        raise VrlabError(
            f"store {store.path} was extracted with resolution={store.manifest.get('resolution')}; the law "
            "protocol is defined for one fixed grid per encoder only (the paper never defined C otherwise): "
            "use correspondence=standard, or extract with resolution=fixed"
        )

    def features(item_id: str, flip: bool) -> torch.Tensor:
        tokens = flipped(item_id) if flip else store.tokens(item_id)
        if ragged:  # the last view, whose frame keypoints are placed in (anyres: the unpadded tiles)
            rows, cols = store.layout(item_id).views[-1]
            if not rows or not cols:
                raise VrlabError(
                    f"image '{item_id}' of store {store.path} keeps no tile cells after unpadding (an aspect "
                    f"ratio of {store.layout(item_id).size}): anyres cannot place its keypoints"
                )
            tokens = tokens[-rows * cols :]
        return tokens

    result = pck(pairs, features, grid, frame, settings, store.layout if ragged else None)
    return {
        "C": result["summary"]["pck@0.1"]["per_image"] if 0.1 in settings.alphas else None,
        "settings": settings.to_dict(),
        "grid": list(grid),
        "frame": frame,
        "resolution": store.manifest.get("resolution", "fixed"),
        "n_pairs": len(pairs),
        **result,
    }
