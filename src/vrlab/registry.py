"""Find encoder and benchmark cards and resolve names, aliases and dot-joined compositions; it builds nothing.

A card is one YAML file: metadata (`name`, `aliases`, `family`, `description`, optional `dim` and `grid` at
the default size) plus a Hydra-instantiable spec (`_target_` and the backend's arguments). Cards come from
the project's `encoders/` folder, folders named in config (`registry.encoder_dirs`) or in the environment
(`VRLAB_ENCODER_DIRS`, os.pathsep-separated), and the entry-point group `vrlab.encoders`, whose objects are
a folder, a list of folders, or a callable returning either. Benchmark cards work the same way (`benchmarks/`,
`registry.benchmark_dirs`, `VRLAB_BENCHMARK_DIRS`, entry-point group `vrlab.benchmarks`).

Names may contain dots (`sd2.1`, timm tags), so `a.b.c` is split on the longest registered names, not on
every dot; a part that matches nothing raises an error listing the closest names. Building an encoder from a
card is `vrlab.encoders.factory`; building a benchmark loader is `vrlab.data.benchmarks`.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from vrlab.errors import CardError, UnknownNameError
from vrlab.resources import builtin_dir
from vrlab.runtime import to_plain

log = logging.getLogger(__name__)
BUILTIN_ENCODER_DIR = builtin_dir("encoders")
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
        builtin_dir("benchmarks"),
        "VRLAB_BENCHMARK_DIRS",
        "vrlab.benchmarks",
        "benchmark_dirs",
        "benchmarks",
    ),
}

LMMS_TASKS = "lmms"  # the folder of lmms-eval tasks inside a benchmark card folder


@dataclass(frozen=True)
class Card:
    """One card file: metadata plus the spec (`_target_` and its arguments) that builds the object."""

    name: str
    spec: Mapping[str, Any]
    family: str = "unknown"
    aliases: tuple[str, ...] = ()
    description: str = ""
    path: Path | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # other metadata (benchmarks: task, metric)

    @property
    def source(self) -> str:
        """Hub id or local path the weights or data come from."""
        return str(self.spec.get("source", ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for manifests and hashes); the file path is left out so moved cards hash the same."""
        return {"name": self.name, "family": self.family, "spec": to_plain(self.spec), **to_plain(self.meta)}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Card:
        """A copy whose spec has `overrides` applied (for example `image_size`, `layer` or `split`)."""
        if not overrides:
            return self
        return replace(self, spec={**self.spec, **overrides})


@dataclass(frozen=True)
class EncoderCard(Card):
    """A vision representation: a card plus its declared shape and, for composites, its member cards."""

    dim: int | None = None
    grid: tuple[int, int] | None = None
    members: tuple[EncoderCard, ...] = ()

    @property
    def source(self) -> str:
        if self.members:
            return " + ".join(m.source for m in self.members)
        return super().source

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.members:
            out["members"] = [m.to_dict() for m in self.members]
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> EncoderCard:
        if not overrides:
            return self
        # declared shapes describe the defaults only
        return replace(self, spec={**self.spec, **overrides}, dim=None, grid=None)


@dataclass(frozen=True)
class BenchmarkCard(Card):
    """A benchmark: a loader spec (`_target_`, `root`, split...) plus its task kind and metric."""

    @property
    def task(self) -> str:
        return str(self.meta.get("task", "?"))

    @property
    def metric(self) -> str:
        return str(self.meta.get("metric", "?"))


CARD_CLASSES: dict[str, type[Card]] = {"encoder": EncoderCard, "benchmark": BenchmarkCard}


def load_card(path: Path, kind: str = "encoder") -> Card:
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
    common: dict[str, Any] = dict(
        name=data["name"].strip(),
        spec=spec,
        family=str(data.get("family", "unknown")),
        aliases=tuple(aliases),
        description=str(data.get("description", "")).strip(),
        path=path,
        meta={k: data[k] for k in ("task", "metric") if k in data},
    )
    if kind == "encoder":
        return EncoderCard(**common, dim=dim, grid=grid)
    return CARD_CLASSES[kind](**common)


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

    def __init__(self, cards: Iterable[Card], kind: str = "encoder", trusted: Iterable[str] = ()) -> None:
        self.kind = KINDS[kind]
        # class paths the user trusts beyond the built-in and registered ones (see vrlab.instantiate)
        self.trusted: tuple[str, ...] = tuple(trusted)
        self.missing_builtin: Path | None = None  # set when the built-in card folder is not there
        self.cards: dict[str, Card] = {}
        self._index: dict[str, str] = {}
        for card in cards:
            self.add(card)

    @classmethod
    def from_dirs(
        cls,
        extra_dirs: Iterable[str | Path] = (),
        builtin: bool = True,
        kind: str = "encoder",
        trusted: Iterable[str] = (),
    ) -> Registry:
        """Load every `*.yaml` card below the configured folders."""
        cards, missing_builtin = [], None
        for folder in card_dirs(extra_dirs, builtin=builtin, kind=kind):
            if not folder.is_dir():
                if folder != KINDS[kind].builtin_dir:
                    raise CardError(
                        f"{kind} card folder {folder} does not exist (from config or {KINDS[kind].env})"
                    )
                missing_builtin = folder
                log.warning("the built-in %s card folder %s is missing; reinstall vrlab", kind, folder)
                continue
            # `<benchmarks>/lmms/` holds lmms-eval task folders (their own YAML), not cards
            files = sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml"))
            cards += [load_card(p, kind) for p in files if p.relative_to(folder).parts[0] != LMMS_TASKS]
        registry = cls(cards, kind=kind, trusted=trusted)
        registry.missing_builtin = missing_builtin
        return registry

    @classmethod
    def from_config(cls, registry_cfg: Mapping[str, Any] | None, kind: str = "encoder") -> Registry:
        """From the `registry` section of the Hydra config."""
        cfg = registry_cfg or {}
        return cls.from_dirs(
            cfg.get(KINDS[kind].config_key) or (),
            builtin=cfg.get("builtin", True),
            kind=kind,
            trusted=cfg.get("trusted_targets") or (),
        )

    def add(self, card: Card) -> None:
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

    def get(self, name: str) -> Card:
        """One card by exact name or alias (case-insensitive)."""
        key = name.strip().lower()
        if key not in self._index:
            raise UnknownNameError(self._unknown_message(name, name))
        return self.cards[self._index[key]]

    def list(self, pattern: str = "*") -> list[Card]:
        """Cards whose name, alias or family matches a glob (case-insensitive), sorted by family and name."""
        pat = pattern.lower()
        hits = [
            c
            for c in self.cards.values()
            if any(fnmatch.fnmatch(k.lower(), pat) for k in (c.name, *c.aliases, c.family))
        ]
        return sorted(hits, key=lambda c: (c.family, c.name))

    def resolve(self, spec: str) -> list[Card]:
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
        readings = self._all_splits(tuple(p.lower() for p in parts))
        if len(readings) > 1:
            described = " or ".join(
                " + ".join(f"'{self._card_at(parts, r, k).name}'" for k in range(len(r))) for r in readings
            )
            log.warning(
                "%s name '%s' has %d readings: %s; taking the first (longest registered names first). "
                "Use a card's alias or its file path to pick another",
                self.kind.label,
                spec,
                len(readings),
                described,
            )
        return [self._card_at(parts, split, k) for k in range(len(split))]

    def _card_at(self, parts: Sequence[str], split: Sequence[int], k: int) -> Card:
        start = split[k - 1] if k else 0
        return self.cards[self._index[".".join(parts[start : split[k]]).lower()]]

    def _all_splits(self, parts: tuple[str, ...], limit: int = 8) -> list[list[int]]:
        """Every way (up to `limit`) to read the dotted parts as registered names, longest names first."""
        out: list[list[int]] = []

        def walk(i: int, acc: list[int]) -> None:
            if len(out) >= limit:
                return
            if i == len(parts):
                out.append(list(acc))
                return
            for j in range(len(parts), i, -1):
                if ".".join(parts[i:j]) in self._index:
                    walk(j, [*acc, j])

        walk(0, [])
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
        if self.missing_builtin is not None:
            return (
                f"unknown {self.kind.label} '{bad}'{where}: the built-in {self.kind.label} card folder "
                f"{self.missing_builtin} is missing (a broken install? reinstall vrlab){hint}"
            )
        return (
            f"unknown {self.kind.label} '{bad}'{where}{hint} (see `vrlab task={self.kind.task}`; "
            f"add a card to {self.kind.builtin_dir.name}/, registry.{self.kind.config_key} or {self.kind.env})"
        )
