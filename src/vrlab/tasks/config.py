"""Reading the config sections several tasks share: the registry, benchmarks and extraction requests."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vrlab.checkpoint import read_adapter_config
from vrlab.data.benchmarks import load_benchmark
from vrlab.data.images import DEFAULT_MAX_PIXELS
from vrlab.data.loaders import Loader
from vrlab.errors import VrlabError
from vrlab.extract import ExtractionRequest
from vrlab.published import ImportOptions, ensure_vrlab
from vrlab.registry import Registry
from vrlab.runtime import to_plain

log = logging.getLogger(__name__)


def registry_cfg(cfg: Any) -> dict[str, Any]:
    """The `registry` section as plain data."""
    return to_plain(cfg.registry)


def benchmark_from_cfg(
    cfg: Any, name: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Loader:
    """Benchmark `name` (default `cfg.benchmark`) under `paths.data`, with `benchmark_args` for the main one."""
    args = to_plain(cfg.benchmark_args) if name is None and overrides is None else overrides
    return load_benchmark(name or cfg.benchmark, cfg.paths.data, registry_cfg(cfg), args)


def extraction_request(cfg: Any, encoder: str, benchmark: str, **changes: Any) -> ExtractionRequest:
    """The extraction the config asks for, with `changes` (limit, adapter, encoder_args...) on top."""
    request = ExtractionRequest(
        encoder=encoder,
        benchmark=benchmark,
        encoder_args=to_plain(cfg.encoder_args),
        compose=to_plain(cfg.compose),
        benchmark_args=to_plain(cfg.benchmark_args),
        registry=registry_cfg(cfg),
        data_root=str(cfg.paths.data),
        outputs=str(cfg.paths.outputs),
        out=cfg.extract.out,
        batch_size=cfg.extract.batch_size,
        shard_size=cfg.extract.shard_size,
        num_workers=cfg.extract.num_workers,
        store_dtype=cfg.extract.store_dtype,
        on_bad_image=cfg.data.on_bad_image,
        max_pixels=cfg.data.get("max_pixels", DEFAULT_MAX_PIXELS),
        layers=to_plain(cfg.extract.get("layers")),
        device=str(cfg.device),
        dtype=str(cfg.dtype),
        seed=cfg.seed,
    )
    if changes.get("adapter"):
        changes["adapter"] = adapter_checkpoint(cfg, changes["adapter"])
        changes["encoder_args"] = with_adapter_settings(
            cfg,
            changes["adapter"],
            encoder,
            to_plain(changes.get("encoder_args", request.encoder_args)) or {},
        )
    return dataclasses.replace(request, **{k: to_plain(v) for k, v in changes.items()})


def with_adapter_settings(
    cfg: Any, adapter: str, encoder: str, encoder_args: Mapping[str, Any]
) -> dict[str, Any]:
    """`encoder_args` under the tower settings an imported projector was trained with (its config's
    `encoder_args`, per member: LLaVA's select layer, the Law paper's diffusion t/block/size); the user's own
    arguments win, with a warning where they differ."""
    trained = read_adapter_config(adapter).get("encoder_args") or {}
    if not trained:
        return dict(encoder_args)
    members = {c.name for c in Registry.from_config(registry_cfg(cfg)).resolve(encoder)}
    trained = {m: s for m, s in trained.items() if m in members}
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in encoder_args.items()}
    for member, settings in trained.items():
        given = merged.get(member, {})
        clash = {k: (given[k], v) for k, v in settings.items() if k in given and given[k] != v}
        if clash:
            log.warning(
                "adapter %s was trained on %s with %s; encoder_args override it: %s",
                adapter,
                member,
                settings,
                clash,
            )
        merged[member] = {**settings, **given}
    return merged


def import_options(cfg: Any) -> ImportOptions:
    """The `import` section (what a published checkpoint does not say), with the registry and compose policy."""
    return ImportOptions.from_config(
        to_plain(cfg.get("import")), registry=registry_cfg(cfg), compose=to_plain(cfg.get("compose") or {})
    )


def model_checkpoint(cfg: Any, task: str, path: Any = None) -> Path:
    """`checkpoint=` (or `path`) as a vrlab model folder: vrlab's own as it is, a published one imported once
    under `<paths.outputs>/imports/` (LLaVA, TG-LLaVA, Hugging Face Llava; see `vrlab.published`)."""
    path = path or cfg.checkpoint
    if not path:
        raise VrlabError(
            f"task={task} needs checkpoint=<a model: a vrlab stage-2 folder, or a LLaVA, TG-LLaVA or "
            "Hugging Face Llava checkpoint>"
        )
    return ensure_vrlab(path, "model", Path(cfg.paths.outputs) / "imports", import_options(cfg))


def adapter_checkpoint(cfg: Any, path: Any) -> str:
    """An adapter argument as a vrlab adapter folder (a LLaVA `mm_projector.bin` or stage-1 folder is imported;
    a model folder gives its projector)."""
    return str(ensure_vrlab(path, "adapter", Path(cfg.paths.outputs) / "imports", import_options(cfg)))
