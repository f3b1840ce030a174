"""Adapters between a vision encoder and an LLM, and the stage-1 checkpoint format.

- `linear` (LLaVA v0, LMVR) and `mlp2x_gelu` (LLaVA-1.5: Linear, GELU, Linear; LLaVA's `mlp<N>x_gelu` too);
- `qformer` (BLIP-2): learnable queries through transformers' `Blip2QFormerModel` cross-attending to the
  vision tokens, then a linear map to the LLM width;
- `tg` (TG-LLaVA): learnable latents, one per vision token, through a small Q-Former that cross-attends to
  the instruction's text embedding; a zero-initialised linear output is added to the vision tokens before the
  `mlp2x_gelu` projector, so at initialisation the model is exactly the same model without it. With
  `detail=true`, the high-resolution branch encodes four tiles of the 2x upsampled image with the same encoder
  and resamples them into `detail_latents` extra tokens (a Q-Former stands in for the paper's Perceiver).

The checkpoint format (a folder with `adapter_config.json` and `adapter.safetensors`) is `vrlab.checkpoint`;
`extract.adapter=<folder>` loads one to store projected tokens for the A score. This module sits below both
extraction and the MLLM, so neither imports the other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vrlab.checkpoint import read_adapter
from vrlab.errors import ShapeError, VrlabError

ADAPTERS = ("linear", "mlp2x_gelu", "qformer", "tg")


def build_mlp(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, or LLaVA's `mlp<N>x_gelu`: Linear, then N-1 times (GELU, Linear); `mlp2x_gelu` is LLaVA-1.5's."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if depth and int(depth.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(depth.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise VrlabError(
        f"unknown projection type '{kind}'; choose linear or mlp<N>x_gelu (mlp2x_gelu is LLaVA-1.5's)"
    )


def _qformer(hidden: int, layers: int, heads: int, encoder_hidden: int, cross_every: int = 1) -> nn.Module:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        cross_attention_frequency=cross_every,
        encoder_hidden_size=encoder_hidden,
    )
    return Blip2QFormerModel(cfg)


def cross_attend(qformer: nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Learnable `queries` [1, Q, H] through a Q-Former attending to every `context` token [B, N, D]."""
    mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
    return qformer(
        query_embeds=queries.expand(context.shape[0], -1, -1),
        encoder_hidden_states=context,
        encoder_attention_mask=mask,
    ).last_hidden_state


class QFormerAdapter(nn.Module):
    """BLIP-2: `num_queries` learnable queries cross-attend to the vision tokens; Linear to the LLM width."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden: int = 768,
        layers: int = 12,
        heads: int = 12,
        cross_every: int = 2,
    ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, num_queries, hidden) * 0.02)
        self.qformer = _qformer(hidden, layers, heads, in_dim, cross_every)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(cross_attend(self.qformer, self.query, tokens))


class TGAdapter(nn.Module):
    """TG-LLaVA: text-guided latents added (through a zero-initialised linear) to the vision tokens."""

    needs_text = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_tokens: int,
        text_dim: int,
        hidden: int | None = None,
        layers: int = 2,
        heads: int = 4,
        detail: bool = False,
        detail_latents: int = 64,
    ) -> None:
        super().__init__()
        hidden = hidden or in_dim
        self.latents = nn.Parameter(torch.randn(1, num_tokens, hidden) * 0.02)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.qformer = _qformer(hidden, layers, heads, hidden, cross_every=2)
        self.zero = nn.Linear(hidden, in_dim)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.projector = build_mlp("mlp2x_gelu", in_dim, out_dim)
        self.detail = detail
        if detail:
            self.tile_pos = nn.Parameter(torch.zeros(1, 4 * num_tokens, in_dim))
            self.detail_query = nn.Parameter(torch.randn(1, detail_latents, hidden) * 0.02)
            self.resampler = _qformer(hidden, layers, heads, in_dim, cross_every=1)
            self.detail_proj = build_mlp("mlp2x_gelu", hidden, out_dim)

    def guidance(self, text: torch.Tensor) -> torch.Tensor:
        """M = zero(Q-Former(latents | text)); `text` is the pooled text embedding [B, text_dim]."""
        return self.zero(cross_attend(self.qformer, self.latents, self.text_proj(text).unsqueeze(1)))

    def forward(
        self, tokens: torch.Tensor, text: torch.Tensor | None = None, tiles: torch.Tensor | None = None
    ) -> torch.Tensor:
        if text is not None:
            guide = self.guidance(text)
            if guide.shape[1] != tokens.shape[1]:
                raise ShapeError(
                    f"tg adapter has {guide.shape[1]} latents but the encoder gives {tokens.shape[1]} tokens"
                )
            tokens = tokens + guide
        out = self.projector(tokens)
        if self.detail:
            if tiles is None:
                raise VrlabError("tg adapter with detail=true needs the tile tokens of the 2x image")
            det = cross_attend(self.resampler, self.detail_query, tiles + self.tile_pos[:, : tiles.shape[1]])
            out = torch.cat([out, self.detail_proj(det)], dim=1)
        return out


class MLPAdapter(nn.Module):
    """`linear` / `mlp2x_gelu` with the adapter call signature.

    With `newline` (the anyres strategy), a learned vector of the LLM's width (LLaVA-NeXT's `image_newline`,
    initialised as transformers does) follows each row of an image's last view: `pack` lays them out.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, newline: bool = False) -> None:
        super().__init__()
        self.net = build_mlp(kind, in_dim, out_dim)
        self.image_newline = nn.Parameter(torch.randn(out_dim) / out_dim**0.5) if newline else None

    def forward(self, tokens: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(tokens)

    def pack(self, tokens: torch.Tensor, layout: Any) -> torch.Tensor:
        """One image's projected tokens `[n', out_dim]` from its tokens `[n, in_dim]` and `Layout`: the views
        in order, a newline after each row of the last view when the adapter has one."""
        out = self.net(tokens)
        if self.image_newline is None:
            return out
        rows, cols = layout.views[-1]
        head, grid = (
            out[: len(out) - rows * cols],
            out[len(out) - rows * cols :].reshape(rows, cols, out.shape[-1]),
        )
        newline = self.image_newline.to(out.dtype).expand(rows, 1, -1)
        return torch.cat([head, torch.cat([grid, newline], dim=1).reshape(rows * (cols + 1), -1)])


def is_token_wise(kind: Any) -> bool:
    """Whether an adapter type maps each token on its own (`linear`, `mlp<N>x_gelu`): the types that take a
    token count per image (the anyres and native strategies)."""
    return kind == "linear" or bool(re.fullmatch(r"mlp\d+x_gelu", str(kind)))


def build_adapter(config: Mapping[str, Any]) -> nn.Module:
    """An adapter from its config: `type`, `in_dim`, `out_dim` and the type's options."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    in_dim, out_dim = int(cfg.pop("in_dim")), int(cfg.pop("out_dim"))
    options = {
        k: v
        for k, v in cfg.items()
        if k not in ("encoder", "llm", "num_tokens_in", "template", "stage", "encoder_args", "tuned_encoder")
    }
    if is_token_wise(kind):
        return MLPAdapter(kind, in_dim, out_dim, newline=bool(options.get("newline")))
    if kind == "qformer":
        return QFormerAdapter(in_dim, out_dim, **options)
    if kind == "tg":
        return TGAdapter(in_dim, out_dim, **options)
    raise VrlabError(f"unknown adapter type '{kind}'; choose one of {ADAPTERS}")


def load_adapter(
    folder: str | Path, expect_in_dim: int | None = None, encoder: str = ""
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a stage-1 checkpoint; a mismatch with the encoder's width is an error naming both."""
    config, state = read_adapter(folder)
    if expect_in_dim is not None and int(config["in_dim"]) != int(expect_in_dim):
        raise ShapeError(
            f"adapter {folder} expects input width {config['in_dim']} (trained on '{config.get('encoder', '?')}') "
            f"but encoder '{encoder}' gives {expect_in_dim}"
        )
    module = build_adapter(config)
    expected = module.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise ShapeError(
                f"adapter {folder}: its config (in_dim={config['in_dim']}, out_dim={config['out_dim']}) builds "
                f"'{key}' of shape {list(expected[key].shape)} but its weights hold {list(tensor.shape)}; "
                "the config and the weights come from different adapters"
            )
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # missing or unexpected keys
        raise ShapeError(
            f"adapter {folder}: the weights do not fit its config: {str(exc).splitlines()[0]}"
        ) from exc
    return module.eval(), config


def load_token_adapter(
    folder: str | Path, expect_in_dim: int | None = None, encoder: str = ""
) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint as a tokens -> projected tokens module (text-guided adapters run without guidance)."""
    module, config = load_adapter(folder, expect_in_dim, encoder)
    if config["type"] == "qformer":
        return module, config
    return _TokensOnly(module), config


class _TokensOnly(nn.Module):
    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.adapter(tokens)
