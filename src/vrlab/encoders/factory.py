"""Build encoders from cards: one card, a dot-joined composition, or a card dict stored in a checkpoint.

The registry only finds and resolves cards; this module turns them into `VisionEncoder`s (and composites)
and checks each built encoder against the shape its card declares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from vrlab.encoders.base import VisionEncoder
from vrlab.encoders.compose import CompositeEncoder
from vrlab.encoders.resolution import STRATEGIES, ResolutionEncoder
from vrlab.errors import CardError, VrlabError
from vrlab.instantiate import instantiate_card
from vrlab.registry import EncoderCard, Registry


def resolution_spec(card: EncoderCard) -> tuple[str, dict[str, Any]]:
    """The card's resolution strategy and its options: `resolution: anyres`, or a mapping such as
    `resolution: {strategy: anyres, grid_pinpoints: [[336, 672], ...]}` (see `vrlab.encoders.resolution`)."""
    value = card.spec.get("resolution") or "fixed"
    options = dict(value) if isinstance(value, Mapping) else {"strategy": value}
    strategy = str(options.pop("strategy", "fixed"))
    if strategy not in STRATEGIES:
        raise CardError(
            f"encoder card {card.path or card.name}: resolution '{strategy}' is not one of {list(STRATEGIES)}"
        )
    return strategy, options


def build_card(card: EncoderCard, trusted: Iterable[str] = (), **extra: Any) -> VisionEncoder:
    """Instantiate one encoder card (plus `extra` arguments) and attach the card; `trusted` names classes
    beyond the built-in and registered backends that the user's config allows (see `vrlab.instantiate`).
    A `resolution` other than `fixed` wraps the built tower in its strategy."""
    strategy, options = resolution_spec(card)
    if "resolution" in card.spec:
        plain = replace(card, spec={k: v for k, v in card.spec.items() if k != "resolution"})
        if strategy != "fixed":
            base = build_card(plain, trusted, **extra)
            encoder = ResolutionEncoder(base, strategy, **options)
            encoder.card = card
            return encoder
        card_for_build = plain
    else:
        card_for_build = card
    encoder = instantiate_card(card_for_build, "encoder", trusted, **extra)
    encoder.card = card
    # Diffusion encoders learn their shape from a dry forward pass; checking it at build would cost one.
    if getattr(encoder, "lazy_shape", False):
        return encoder
    declared = {k: v for k, v in (("dim", card.dim), ("grid", card.grid)) if v is not None}
    measured = {"dim": encoder.dim if "dim" in declared else None}
    if "grid" in declared:
        measured["grid"] = tuple(encoder.grid)
    wrong = {k: v for k, v in declared.items() if measured.get(k) != v}
    if wrong:
        said = ", ".join(f"{k}={list(v) if k == 'grid' else v}" for k, v in declared.items())
        got = ", ".join(f"{k}={list(encoder.grid) if k == 'grid' else encoder.dim}" for k in declared)
        raise CardError(
            f"encoder card {card.path} declares {said} but '{card.name}' gives {got}; "
            "fix the card's 'dim'/'grid' keys"
        )
    return encoder


def build_encoder(
    registry: Registry,
    spec: str,
    overrides: Mapping[str, Any] | None = None,
    compose: Mapping[str, Any] | None = None,
) -> VisionEncoder:
    """Build the encoder (or composite) named by `spec` from `registry`'s cards.

    `overrides` holds backend arguments: keys that are a member's name or alias map to that member's
    overrides; other keys apply to every member (e.g. `{dinov2-l: {image_size: 336}}`).
    `compose` holds the composite policy: `align` (equal|interpolate), `grid`, `normalize`.
    """
    cards = registry.resolve(spec)
    overrides = dict(overrides or {})
    member_keys = {k for c in cards for k in (c.name.lower(), *(a.lower() for a in c.aliases))}
    shared = {k: v for k, v in overrides.items() if k.lower() not in member_keys}
    encoders = []
    for card in cards:
        own: dict[str, Any] = {}
        for key in (card.name, *card.aliases):
            for ok, ov in overrides.items():
                if ok.lower() == key.lower():
                    own.update(ov)
        encoders.append(build_card(card.with_overrides({**shared, **own}), registry.trusted))
    if len(encoders) == 1:
        return encoders[0]
    ragged = [e.name for e in encoders if isinstance(e, ResolutionEncoder)]
    if ragged:
        raise VrlabError(
            f"'{spec}': resolution strategies other than fixed apply to single encoders, not to composite "
            f"members ({', '.join(ragged)}); their grids must align token for token"
        )
    return CompositeEncoder(encoders, **dict(compose or {}))


def load_encoder(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    compose: Mapping[str, Any] | None = None,
    *,
    registry: Registry | Mapping[str, Any] | None = None,
) -> VisionEncoder:
    """An encoder by registered name, alias, card file or dot-joined composition, in eval mode.

    `registry` is a `Registry`, or the `registry` config section (`encoder_dirs`, `builtin`); by default the
    built-in cards plus `VRLAB_ENCODER_DIRS` and entry points.
    """
    if not isinstance(registry, Registry):
        registry = Registry.from_config(registry)
    return build_encoder(registry, name, overrides, compose).eval()


def _local_sources(card: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """A card whose `source` starts with `./` (a tower saved inside the model folder) made absolute."""
    card = dict(card)
    spec = dict(card.get("spec", {}))
    source = spec.get("source")
    if isinstance(source, str) and source.startswith("./"):
        spec["source"] = str((folder / source).resolve())
    card["spec"] = spec
    if card.get("members"):
        card["members"] = [_local_sources(m, folder) for m in card["members"]]
    return card


def encoder_from_dict(
    card: Mapping[str, Any], policy: Mapping[str, Any] | None = None, folder: str | Path | None = None
) -> VisionEncoder:
    """Rebuild an encoder (or composite) from `EncoderCard.to_dict()` output, without the card files.

    Checkpoints store this, so a saved model rebuilds its exact encoder even where the cards differ; sources
    starting with `./` are relative to the checkpoint `folder`.
    """
    if folder is not None:
        card = _local_sources(card, Path(folder))

    def one(c: Mapping[str, Any]) -> VisionEncoder:
        meta = {k: c[k] for k in ("task", "metric") if k in c}
        return build_card(
            EncoderCard(name=c["name"], spec=dict(c["spec"]), family=c.get("family", "unknown"), meta=meta)
        )

    if card.get("members"):
        spec = dict(card.get("spec", {}))
        policy = dict(
            policy or {"align": spec.get("align", "equal"), "normalize": spec.get("normalize", False)}
        )
        if policy.get("align") == "interpolate":
            policy.setdefault("grid", spec.get("grid"))
        return CompositeEncoder([one(m) for m in card["members"]], **policy)
    return one(card)
