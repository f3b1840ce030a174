"""Composite encoders: several towers run on the same image, their tokens concatenated along channels.

Each member keeps its own transform (resolution and normalisation), so the composite's transform returns a
tuple with one tensor per member. Grids are aligned by an explicit policy: `equal` requires identical grids,
as the law paper and LLaVA's dot syntax do; `interpolate` resamples every member bilinearly to `grid` (the
first member's grid by default). `normalize=True` L2-normalises each member's tokens before concatenation,
the convention of the C score, so the joint cosine is the mean of the members' cosines up to a factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vrlab.encoders.base import Features, VisionEncoder, as_size
from vrlab.errors import ShapeError, VrlabError
from vrlab.registry import EncoderCard

ALIGN_POLICIES = ("equal", "interpolate")


class CompositeTransform(nn.Module):
    """One transform per member; returns a tuple of their outputs."""

    def __init__(self, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(transforms)

    @property
    def size(self) -> tuple[int, int]:
        return self.members[0].size

    def settings(self) -> dict[str, Any]:
        return {"members": [t.settings() for t in self.members]}

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t(image) for t in self.members)


class CompositeEncoder(VisionEncoder):
    """Concatenate the tokens of several encoders on channels."""

    def __init__(
        self,
        members: Sequence[VisionEncoder],
        align: str = "equal",
        grid: int | Sequence[int] | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise VrlabError("a composite encoder needs at least two members")
        if align not in ALIGN_POLICIES:
            raise VrlabError(f"compose.align='{align}' is not one of {ALIGN_POLICIES}")
        self.members = nn.ModuleList(members)
        self.align, self.normalize = align, bool(normalize)
        self.transform = CompositeTransform([m.transform for m in members])
        grids = [tuple(m.grid) for m in members]
        if align == "equal":
            if grid is not None:
                raise VrlabError("compose.grid is only used with compose.align=interpolate")
            if len(set(grids)) > 1:
                described = ", ".join(
                    f"'{m.name}' {g[0]}x{g[1]}" for m, g in zip(members, grids, strict=True)
                )
                raise ShapeError(
                    f"composite '{'.'.join(m.name for m in members)}' needs equal token grids with compose.align=equal, "
                    f"but got {described}; set compose.align=interpolate, or give the members image sizes "
                    "that yield the same grid (e.g. encoder_args.<member>.image_size=...)"
                )
        self.target_grid = as_size(grid) if grid is not None else grids[0]
        self.card = EncoderCard(
            name=".".join(m.name for m in members),
            family="composite",
            spec={"align": align, "grid": list(self.target_grid), "normalize": self.normalize},
            members=tuple(m.card for m in members if m.card is not None),
        )

    def _shape(self) -> tuple[int, tuple[int, int]]:
        return sum(m.dim for m in self.members), self.target_grid

    def example_input(self, batch: int = 1, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        return tuple(m.example_input(batch, device) for m in self.members)

    def backend_settings(self) -> dict[str, Any]:
        return {
            "backend": "composite",
            "align": self.align,
            "grid": list(self.target_grid),
            "normalize": self.normalize,
            "members": [m.backend_settings() for m in self.members],
        }

    def forward(self, pixels: Sequence[torch.Tensor]) -> Features:
        if len(pixels) != len(self.members):
            raise ShapeError(
                f"composite '{self.name}' got {len(pixels)} inputs for {len(self.members)} members"
            )
        tokens, pooled = [], []
        for member, x in zip(self.members, pixels, strict=True):
            out = member(x)
            t = out.tokens
            if tuple(out.grid) != self.target_grid:
                fmap = F.interpolate(
                    out.to_grid().float(), size=self.target_grid, mode="bilinear", align_corners=False
                )
                t = fmap.flatten(2).transpose(1, 2).to(out.tokens.dtype)
            if self.normalize:
                t = F.normalize(t, dim=-1)
            tokens.append(t)
            pooled.append(out.pooled)
        joined_pooled = torch.cat(pooled, dim=-1) if all(p is not None for p in pooled) else None
        return Features(tokens=torch.cat(tokens, dim=-1), grid=self.target_grid, pooled=joined_pooled)
