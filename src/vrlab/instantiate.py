"""The one place a card's spec becomes an object: Hydra `instantiate` on the card's `_target_` and arguments.

Encoder backends and benchmark loaders are both built here, so the rules for what a card may build live in
one function; errors name the card file.
"""

from __future__ import annotations

from typing import Any

from vrlab.errors import VrlabError
from vrlab.registry import Card


def instantiate_card(card: Card, **extra: Any) -> Any:
    """Instantiate `card.spec` (plus `extra` arguments); vrlab errors raised inside keep their type."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate({**card.spec, **extra}, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, VrlabError):
            raise type(cause)(f"'{card.name}' ({card.path}): {cause}") from cause
        raise VrlabError(
            f"cannot build '{card.name}' from card {card.path}: {cause}. "
            "For a hub id without network access, download the weights first or point 'source' at a local folder"
        ) from exc
