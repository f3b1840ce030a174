"""What every task needs: device choice, seeding, config hashes, run folders and atomic file writes.

Run folders derive from a hash of the settings that change the numbers, not from the clock, so a rerun (or a
requeued cluster job) finds its own earlier work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vrlab.errors import VrlabError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when available; an unavailable explicit device is an error, not a silent fallback."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VrlabError(
            f"device={device} was asked for but CUDA is not available; use device=auto or device=cpu"
        )
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_plain(value: Any) -> Any:
    """OmegaConf nodes, paths and tuples as plain JSON-able data."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(settings: Any, length: int = 12) -> str:
    """A stable short hash of JSON-able settings (key order does not matter)."""
    blob = json.dumps(to_plain(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def slug(name: str, max_len: int = 60) -> str:
    """A file-system-safe version of an encoder or benchmark name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_")[:max_len] or "run"


def run_dir(root: str | Path, task: str, name: str, settings: Any) -> Path:
    """`<root>/<task>/<slug(name)>-<hash(settings)>`, created."""
    path = Path(root) / task / f"{slug(name)}-{config_hash(settings)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# mkstemp creates files 0600; results on a shared cluster should be as readable as any file the user writes.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see a partial file.

    The file gets the permissions of an ordinary new file (0666 less the umask). A failure (disk full, no
    permission, a folder in the way) raises `VrlabError` naming the path and leaves no partial file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise VrlabError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise VrlabError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_none(value: Any) -> Any:
    """Plain data with every NaN or infinite float replaced by None, so the JSON written is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys, written atomically; NaN and infinities become null (JSON has neither)."""
    text = json.dumps(finite_or_none(to_plain(obj)), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change numbers, for manifests and result files."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vrlab", "torch", "transformers", "diffusers", "timm", "open_clip_torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def training_arguments(out_dir: str | Path, args: Mapping[str, Any], **defaults: Any) -> Any:
    """`transformers.TrainingArguments` with vrlab's defaults under `args`: checkpoints in `<out_dir>/trainer`,
    the batch's own columns kept, no reporting, the CPU when there is no GPU, data loaded in the process."""
    import torch
    from transformers import TrainingArguments

    base = {
        "output_dir": str(Path(out_dir) / "trainer"),
        "remove_unused_columns": False,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        **defaults,
    }
    return TrainingArguments(**{**base, **dict(args)})


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process, with torch.distributed's process group up for the block when the
    world has several ranks (NCCL on GPUs, gloo otherwise), and torn down after it."""
    import torch

    rank, world = distributed_context()
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield rank, world
    finally:
        if started:
            torch.distributed.destroy_process_group()


def rank_device(device: Any) -> Any:
    """A CUDA device made this process's own under torchrun / accelerate (`cuda:<LOCAL_RANK>`)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and distributed_context()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def adopt_slurm_ranks() -> bool:
    """In a submitit SLURM job with several tasks (`hydra.launcher.tasks_per_node` > 1), export the variables
    torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, through
    submitit's own helper, so extraction, training, eval and LMVR features split the job's GPUs as under
    torchrun. Does nothing elsewhere or when a launcher already set them."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True
