"""The package works from a wheel: built, installed non-editable into a fresh virtual environment, and run
from another folder, it still finds its Hydra config and built-in cards (they ship inside the wheel)."""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(tmp_path, tiny_root, data_root):
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(dist)], check=True, timeout=300)
    wheel = next(dist.glob("vrlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    n_cards = len(list((ROOT / "encoders").rglob("*.yaml")))
    assert {
        "vrlab/py.typed",
        "vrlab/_builtin/conf/config.yaml",
        "vrlab/_builtin/conf/correspondence/law.yaml",
    } <= names
    assert len([n for n in names if n.startswith("vrlab/_builtin/encoders/")]) == n_cards
    assert "vrlab/_builtin/benchmarks/synthetic/synth-folder-test.yaml" in names

    # A fresh environment with the wheel alone; the dependencies come from this one's site-packages, added
    # by a .pth line (whose own .pth files, including the editable install's, are not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(pip, check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VRLAB_ENCODER_DIRS")}
    env |= {"VRLAB_OUTPUTS": str(tmp_path / "out"), "COLUMNS": "250"}
    where = subprocess.run(
        [str(python), "-c", "import vrlab.resources as r; print(r.builtin_dir('conf'))"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        check=True,
    ).stdout.strip()
    assert where.startswith(site) and where.endswith("_builtin/conf")

    listing = subprocess.run(
        [str(venv / "bin" / "vrlab"), "task=encoders"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=300,
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert f"({n_cards} of {n_cards})" in listing.stdout, listing.stdout[:500]

    run = subprocess.run(
        [
            str(venv / "bin" / "vrlab"),
            "task=extract",
            "encoder=tiny/clip",
            "benchmark=synth-folder-test",
            f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
            f"paths.data={data_root}",
            "extract.num_workers=0",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    manifests = list((tmp_path / "out" / "stores" / "synth-folder-test").glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["complete"]
