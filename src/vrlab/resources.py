"""Where the built-in Hydra config and cards live: inside an installed wheel, or at the repository root.

The repository keeps `conf/`, `encoders/` and `benchmarks/` at its top level; the wheel maps them into the
package as `vrlab/_builtin/<name>` (see `pyproject.toml`). A source checkout or an editable install finds
them at the repository root, so both layouts work without copying anything.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUILTIN = ("conf", "encoders", "benchmarks")
_PACKAGE_DIR = Path(str(files("vrlab")))


def builtin_dir(name: str) -> Path:
    """The folder of built-in `conf`, `encoders` or `benchmarks` (it may be missing; callers say so)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in folder '{name}'; one of {BUILTIN}")
    packaged = _PACKAGE_DIR / "_builtin" / name
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parents[1] / name  # src/vrlab -> repository root
