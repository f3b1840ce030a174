"""The one place a card's spec becomes an object, and the rule for what a card may build.

A card is data. Its top-level `_target_` may only name a class of the right kind: a built-in encoder backend
or benchmark loader, a class registered by an installed package through the entry-point groups
`vrlab.backends` / `vrlab.loaders` (name = anything, value = `package.module:Class`), or a class the user
trusts explicitly in config (`registry.trusted_targets=[my_pkg.MyEncoder]`). The name is checked before
anything is imported; a trusted class must still subclass `VisionEncoder` / `Loader`. A `_target_` nested
inside a card's arguments is never instantiated: it is refused with the file and key path. The same rule
covers the encoder spec stored inside a checkpoint (there only built-in and registered classes count).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from vrlab.errors import CardError, VrlabError
from vrlab.registry import Card

BUILTIN_TARGETS = {
    "encoder": {
        "vrlab.encoders.hf.HFVisionEncoder",
        "vrlab.encoders.timm_backend.TimmEncoder",
        "vrlab.encoders.openclip.OpenCLIPEncoder",
        "vrlab.encoders.diffusion.DiffusionEncoder",
    },
    "benchmark": {
        f"vrlab.data.loaders.{name}"
        for name in (
            "SPairLoader",
            "VOCLoader",
            "COCOLoader",
            "ImageFolderLoader",
            "VisDALoader",
            "ImageNetCLoader",
            "LlavaJsonLoader",
            "ImageListLoader",
        )
    }
    | {
        "vrlab.eval.docs.LmmsTaskLoader",
        "vrlab.data.captions.CaptionLoader",
        "vrlab.data.webdataset.WebDatasetLoader",
        "vrlab.data.lmvr_sets.DeepFashionLoader",
        "vrlab.data.lmvr_sets.ImageNetLoader",
    },
}
ENTRY_POINT_GROUPS = {"encoder": "vrlab.backends", "benchmark": "vrlab.loaders"}
BASE_CLASSES = {"encoder": "vrlab.encoders.base.VisionEncoder", "benchmark": "vrlab.data.loaders.Loader"}


def allowed_targets(kind: str, trusted: Iterable[str] = ()) -> set[str]:
    """Class paths a card of `kind` may name: built-in, registered by entry point, or trusted in config."""
    registered = {ep.value.replace(":", ".") for ep in entry_points(group=ENTRY_POINT_GROUPS[kind])}
    return BUILTIN_TARGETS[kind] | registered | set(trusted)


def _nested_targets(value: Any, path: str) -> list[str]:
    found = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "_target_" and path:
                found.append(here)
            found += _nested_targets(item, here)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += _nested_targets(item, f"{path}[{i}]")
    return found


def check_card(card: Card, kind: str, trusted: Iterable[str] = ()) -> str:
    """The card's `_target_` if the card may build it; otherwise `CardError` naming the file and key."""
    where = card.path or f"the stored spec of '{card.name}'"
    target = str(card.spec.get("_target_", ""))
    nested = _nested_targets({k: v for k, v in card.spec.items() if k != "_target_"}, "")
    if nested:
        raise CardError(
            f"{kind} card {where}: a nested '_target_' at '{nested[0]}' is not allowed; a card's arguments are "
            "data, and only its top-level _target_ (an encoder backend or benchmark loader) is built"
        )
    if target not in allowed_targets(kind, trusted):
        raise CardError(
            f"{kind} card {where}: _target_ '{target}' is not an allowed {kind} class; use one of "
            f"{sorted(BUILTIN_TARGETS[kind])}, register yours under the '{ENTRY_POINT_GROUPS[kind]}' entry points, "
            f"or trust it explicitly with registry.trusted_targets=[{target}]"
        )
    if target not in BUILTIN_TARGETS[kind]:
        from hydra.utils import get_class

        cls, base = get_class(target), get_class(BASE_CLASSES[kind])
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise CardError(
                f"{kind} card {where}: _target_ '{target}' is not a subclass of {BASE_CLASSES[kind]}"
            )
    return target


def instantiate_card(card: Card, kind: str = "encoder", trusted: Iterable[str] = (), **extra: Any) -> Any:
    """Instantiate `card.spec` (plus `extra` arguments) once `check_card` allows it; vrlab errors raised inside
    keep their type and gain the card's name."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    check_card(card, kind, trusted)
    if card.spec.get("trust_remote_code"):
        import logging

        logging.getLogger(__name__).warning(
            "'%s' (%s) runs the model repository's own code: trust_remote_code is set in its card",
            card.name,
            card.path,
        )
    try:
        return instantiate({**card.spec, **extra}, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, VrlabError):
            raise type(cause)(f"'{card.name}' ({card.path}): {cause}") from cause
        raise VrlabError(f"cannot build '{card.name}' from card {card.path}: {_reason(cause, card)}") from exc


def _reason(cause: BaseException, card: Card) -> str:
    """The cause, with a hint that fits it: a local path that does not exist, or a hub id without network."""
    from pathlib import Path

    source = str(card.spec.get("source", "")).removeprefix("local-dir:")
    looks_local = source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()
    if source and looks_local and not Path(source).expanduser().exists():
        return f"the local path '{source}' (the card's 'source') does not exist"
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    hub_words = ("offline", "huggingface", "hub", "connect", "repo id", "repository", "Repo id")
    if source and not looks_local and any(w in str(cause) for w in hub_words):
        return (
            f"{text}. '{source}' is a hub id: without network access, download the weights first or point "
            "'source' at a local folder"
        )
    return text
