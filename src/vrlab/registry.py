"""Find encoder and benchmark cards, resolve names, aliases and dot-joined compositions, and build from them.

A card is one YAML file: metadata (`name`, `aliases`, `family`, `description`, optional `dim` and `grid` at
the default size) plus a Hydra-instantiable spec (`_target_` and the backend's arguments). Cards come from
the project's `encoders/` folder, folders named in config (`registry.encoder_dirs`) or in the environment
(`VRLAB_ENCODER_DIRS`, os.pathsep-separated), and the entry-point group `vrlab.encoders`, whose objects are
a folder, a list of folders, or a callable returning either. Benchmark cards work the same way (`benchmarks/`,
`registry.benchmark_dirs`, `VRLAB_BENCHMARK_DIRS`, entry-point group `vrlab.benchmarks`).

Names may contain dots (`sd2.1`, timm tags), so `a.b.c` is split on the longest registered names, not on
every dot; a part that matches nothing raises an error listing the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from vrlab.errors import CardError, UnknownNameError, VrlabError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_ENCODER_DIR = PROJECT_ROOT / "encoders"
ENV_ENCODER_DIRS = "VRLAB_ENCODER_DIRS"
ENTRY_POINT_GROUP = "vrlab.encoders"
METADATA_KEYS = ("name", "aliases", "family", "description", "dim", "grid", "task", "metric")


@dataclass(frozen=True)
class CardKind:
    """Where cards of one kind come from, and how errors refer to them."""

    label: str
    builtin_dir: Path
    env: str
    group: str
    config_key: str
    task: str


KINDS = {
    "encoder": CardKind(
        "encoder", BUILTIN_ENCODER_DIR, ENV_ENCODER_DIRS, ENTRY_POINT_GROUP, "encoder_dirs", "encoders"
    ),
    "benchmark": CardKind(
        "benchmark",
        PROJECT_ROOT / "benchmarks",
        "VRLAB_BENCHMARK_DIRS",
        "vrlab.benchmarks",
        "benchmark_dirs",
        "benchmarks",
    ),
}


@dataclass(frozen=True)
class EncoderCard:
    """One registered vision representation: metadata plus the spec that builds it."""

    name: str
    spec: Mapping[str, Any]
    family: str = "unknown"
    aliases: tuple[str, ...] = ()
    description: str = ""
    dim: int | None = None
    grid: tuple[int, int] | None = None
    path: Path | None = None
    members: tuple[EncoderCard, ...] = field(default=())
    meta: Mapping[str, Any] = field(default_factory=dict)  # other metadata (benchmarks: task, metric)

    @property
    def source(self) -> str:
        """Hub id or local path the weights come from."""
        if self.members:
            return " + ".join(m.source for m in self.members)
        return str(self.spec.get("source", ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for manifests and hashes); the file path is left out so moved cards hash the same."""
        out: dict[str, Any] = {
            "name": self.name,
            "family": self.family,
            "spec": _plain(self.spec),
            **_plain(self.meta),
        }
        if self.members:
            out["members"] = [m.to_dict() for m in self.members]
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> EncoderCard:
        """A copy whose spec has `overrides` applied (for example `image_size` or `layer`)."""
        if not overrides:
            return self
        spec = dict(self.spec)
        spec.update(overrides)
        return EncoderCard(
            name=self.name,
            spec=spec,
            family=self.family,
            aliases=self.aliases,
            description=self.description,
            path=self.path,
            meta=self.meta,
            # declared shapes describe the defaults only
            dim=None if overrides else self.dim,
            grid=None if overrides else self.grid,
        )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


Card = EncoderCard  # the same dataclass serves benchmark cards


def load_card(path: Path, kind: str = "encoder") -> EncoderCard:
    """Read and validate one card file; errors name the file and the key at fault."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CardError(f"cannot read {kind} card {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CardError(f"{kind} card {path} must be a YAML mapping, got {type(data).__name__}")
    for key in ("name", "_target_"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise CardError(f"{kind} card {path} needs a string '{key}'")
    aliases = data.get("aliases") or []
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise CardError(f"{kind} card {path}: 'aliases' must be a list of strings")
    grid = data.get("grid")
    if grid is not None:
        if not (isinstance(grid, list | tuple) and len(grid) == 2 and all(isinstance(g, int) for g in grid)):
            raise CardError(f"{kind} card {path}: 'grid' must be two integers [h, w], got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    dim = data.get("dim")
    if dim is not None and not isinstance(dim, int):
        raise CardError(f"{kind} card {path}: 'dim' must be an integer, got {dim!r}")
    spec = {k: v for k, v in data.items() if k not in METADATA_KEYS}
    return EncoderCard(
        name=data["name"].strip(),
        spec=spec,
        family=str(data.get("family", "unknown")),
        aliases=tuple(aliases),
        description=str(data.get("description", "")).strip(),
        dim=dim,
        grid=grid,
        path=path,
        meta={k: data[k] for k in ("task", "metric") if k in data},
    )


def _entry_point_dirs(group: str = ENTRY_POINT_GROUP) -> list[Path]:
    dirs: list[Path] = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
            obj = obj() if callable(obj) else obj
        except Exception as exc:
            raise CardError(f"entry point '{ep.name}' in group {group} failed to load: {exc}") from exc
        dirs.extend([Path(obj)] if isinstance(obj, str | Path) else [Path(p) for p in obj])
    return dirs


def card_dirs(extra: Iterable[str | Path] = (), builtin: bool = True, kind: str = "encoder") -> list[Path]:
    """All folders cards are read from, in order: built-in, config, environment, entry points."""
    spec = KINDS[kind]
    dirs: list[Path] = [spec.builtin_dir] if builtin else []
    dirs += [Path(d) for d in extra]
    env = os.environ.get(spec.env, "")
    dirs += [Path(d) for d in env.split(os.pathsep) if d]
    dirs += _entry_point_dirs(spec.group)
    return dirs


class Registry:
    """Cards by name and alias (case-insensitive), with dot-joined composition."""

    def __init__(self, cards: Iterable[EncoderCard], kind: str = "encoder") -> None:
        self.kind = KINDS[kind]
        self.cards: dict[str, EncoderCard] = {}
        self._index: dict[str, str] = {}
        for card in cards:
            self.add(card)

    @classmethod
    def from_dirs(
        cls, extra_dirs: Iterable[str | Path] = (), builtin: bool = True, kind: str = "encoder"
    ) -> Registry:
        """Load every `*.yaml` card below the configured folders."""
        cards = []
        for folder in card_dirs(extra_dirs, builtin=builtin, kind=kind):
            if not folder.is_dir():
                if folder != KINDS[kind].builtin_dir:
                    raise CardError(
                        f"{kind} card folder {folder} does not exist (from config or {KINDS[kind].env})"
                    )
                continue
            cards += [
                load_card(p, kind) for p in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml"))
            ]
        return cls(cards, kind=kind)

    @classmethod
    def from_config(cls, registry_cfg: Mapping[str, Any] | None, kind: str = "encoder") -> Registry:
        """From the `registry` section of the Hydra config."""
        cfg = registry_cfg or {}
        return cls.from_dirs(
            cfg.get(KINDS[kind].config_key) or (), builtin=cfg.get("builtin", True), kind=kind
        )

    def add(self, card: EncoderCard) -> None:
        for key in (card.name, *card.aliases):
            low = key.lower()
            if low in self._index:
                other = self.cards[self._index[low]]
                if other.path is not None and other.path == card.path:
                    continue
                raise CardError(
                    f"{self.kind.label} name or alias '{key}' is defined twice: in {card.path} and in {other.path}; "
                    "rename one of them"
                )
            self._index[low] = card.name
        self.cards[card.name] = card

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._index

    def __len__(self) -> int:
        return len(self.cards)

    def get(self, name: str) -> EncoderCard:
        """One card by exact name or alias (case-insensitive)."""
        key = name.strip().lower()
        if key not in self._index:
            raise UnknownNameError(self._unknown_message(name, name))
        return self.cards[self._index[key]]

    def list(self, pattern: str = "*") -> list[EncoderCard]:
        """Cards whose name, alias or family matches a glob (case-insensitive), sorted by family and name."""
        pat = pattern.lower()
        hits = [
            c
            for c in self.cards.values()
            if any(fnmatch.fnmatch(k.lower(), pat) for k in (c.name, *c.aliases, c.family))
        ]
        return sorted(hits, key=lambda c: (c.family, c.name))

    def resolve(self, spec: str) -> list[EncoderCard]:
        """Split a dot-joined name into registered cards, longest registered name first."""
        spec = spec.strip()
        if not spec:
            raise UnknownNameError(f"empty {self.kind.label} name; pass {self.kind.label}=<name>")
        if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
            card = load_card(Path(spec), self.kind.label)
            self.add(card)
            return [card]
        parts = spec.split(".")
        if any(p == "" for p in parts):
            raise UnknownNameError(f"{self.kind.label} name '{spec}' has an empty part between dots")
        split = self._split(tuple(p.lower() for p in parts))
        if split is None:
            bad = self._first_unresolvable(parts)
            raise UnknownNameError(self._unknown_message(bad, spec))
        out, i = [], 0
        for j in split:
            out.append(self.cards[self._index[".".join(parts[i:j]).lower()]])
            i = j
        return out

    def _split(self, parts: tuple[str, ...]) -> list[int] | None:
        @cache
        def from_pos(i: int) -> tuple[int, ...] | None:
            if i == len(parts):
                return ()
            for j in range(len(parts), i, -1):  # longest match first, backtrack if the rest fails
                if ".".join(parts[i:j]) in self._index:
                    rest = from_pos(j)
                    if rest is not None:
                        return (j, *rest)
            return None

        result = from_pos(0)
        return None if result is None else list(result)

    def _first_unresolvable(self, parts: Sequence[str]) -> str:
        """The first segment (from the left, greedily) that no registered name covers."""
        i = 0
        while i < len(parts):
            for j in range(len(parts), i, -1):
                if ".".join(parts[i:j]).lower() in self._index:
                    i = j
                    break
            else:
                return parts[i]
        return ".".join(parts)

    def _unknown_message(self, bad: str, spec: str) -> str:
        keys = [k for c in self.cards.values() for k in (c.name, *c.aliases)]
        close = difflib.get_close_matches(bad, keys, n=5, cutoff=0.4)
        close += [k for k in keys if bad.lower() in k.lower() and k not in close][: 5 - len(close)]
        where = f" in '{spec}'" if bad != spec else ""
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        return (
            f"unknown {self.kind.label} '{bad}'{where}{hint} (see `vrlab task={self.kind.task}`; "
            f"add a card to {self.kind.builtin_dir.name}/, registry.{self.kind.config_key} or {self.kind.env})"
        )

    def build(
        self, spec: str, overrides: Mapping[str, Any] | None = None, compose: Mapping[str, Any] | None = None
    ) -> Any:
        """Build the encoder (or composite) named by `spec`.

        `overrides` holds backend arguments: keys that are a member's name or alias map to that member's
        overrides; other keys apply to every member (e.g. `{dinov2-l: {image_size: 336}}`).
        `compose` holds the composite policy: `align` (equal|interpolate), `grid`, `normalize`.
        """
        cards = self.resolve(spec)
        overrides = dict(overrides or {})
        member_keys = {k for c in cards for k in (c.name.lower(), *(a.lower() for a in c.aliases))}
        shared = {k: v for k, v in overrides.items() if k.lower() not in member_keys}
        encoders = []
        for card in cards:
            own = {}
            for key in (card.name, *card.aliases):
                for ok, ov in overrides.items():
                    if ok.lower() == key.lower():
                        own.update(ov)
            encoders.append(build_card(card.with_overrides({**shared, **own})))
        if len(encoders) == 1:
            return encoders[0]
        from vrlab.encoders.compose import CompositeEncoder

        return CompositeEncoder(encoders, **dict(compose or {}))


def build_card(card: EncoderCard, **extra: Any) -> Any:
    """Instantiate one card's spec (plus `extra` arguments) with Hydra and attach the card."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        encoder = instantiate({**card.spec, **extra}, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, VrlabError):
            raise type(cause)(f"'{card.name}' ({card.path}): {cause}") from cause
        raise VrlabError(
            f"cannot build '{card.name}' from card {card.path}: {cause}. "
            "For a hub id without network access, download the weights first or point 'source' at a local folder"
        ) from exc
    encoder.card = card
    # Diffusion encoders learn their shape from a dry forward pass; checking it at build would cost one.
    declared = card.dim is not None and card.grid is not None and not getattr(encoder, "lazy_shape", False)
    if declared and (encoder.dim, tuple(encoder.grid)) != (card.dim, card.grid):
        raise CardError(
            f"encoder card {card.path} declares dim={card.dim}, grid={list(card.grid)} but '{card.name}' "
            f"gives dim={encoder.dim}, grid={list(encoder.grid)}; fix the card's 'dim'/'grid' keys"
        )
    return encoder


def encoder_from_dict(card: Mapping[str, Any], policy: Mapping[str, Any] | None = None) -> Any:
    """Rebuild an encoder (or composite) from `EncoderCard.to_dict()` output, without the card files.

    Checkpoints store this, so a saved model rebuilds its exact encoder even where the cards differ.
    """

    def one(c: Mapping[str, Any]) -> Any:
        meta = {k: c[k] for k in ("task", "metric") if k in c}
        return build_card(
            EncoderCard(name=c["name"], spec=dict(c["spec"]), family=c.get("family", "unknown"), meta=meta)
        )

    if card.get("members"):
        from vrlab.encoders.compose import CompositeEncoder

        spec = dict(card.get("spec", {}))
        policy = dict(
            policy or {"align": spec.get("align", "equal"), "normalize": spec.get("normalize", False)}
        )
        if policy.get("align") == "interpolate":
            policy.setdefault("grid", spec.get("grid"))
        return CompositeEncoder([one(m) for m in card["members"]], **policy)
    return one(card)
