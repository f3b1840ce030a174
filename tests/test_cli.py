"""The Hydra app: tasks composed from the real conf/, config-only extension, errors, and the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vrlab.cli import run_task
from vrlab.data.images import decode_image
from vrlab.encoders.factory import build_encoder
from vrlab.errors import UnknownNameError, VrlabError
from vrlab.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def test_encoders_task_filters_by_glob(compose_cfg, tiny_root):
    rows = run_task(
        compose_cfg(
            "task=encoders", "encoders.filter=*dinov2*", f"registry.encoder_dirs=[{tiny_root / 'cards'}]"
        )
    )
    names = {r["name"] for r in rows}
    assert {"facebook/dinov2-large", "tiny/dinov2", "tiny/dinov2-reg"} <= names
    assert not any("clip" in n for n in names)
    large = next(r for r in rows if r["name"] == "facebook/dinov2-large")
    assert (large["dim"], large["grid"], large["family"]) == (1024, [16, 16], "dinov2")


def test_encoders_task_build_measures_what_it_can(compose_cfg, tiny_root):
    rows = run_task(
        compose_cfg(
            "task=encoders",
            "encoders.filter=tiny/sd3",
            "encoders.build=true",
            f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        )
    )
    assert (
        rows == [rows[0]]
        and rows[0]["dim"] == 64
        and rows[0]["grid"] == [2, 2]
        and rows[0]["note"] == "measured"
    )


def test_features_task_on_a_composite(compose_cfg, tiny_root, photo_files):
    folder = photo_files[0].parent
    summary = run_task(
        compose_cfg(
            "task=features",
            "encoder=tiny-clip.tiny-dinov2",
            "features.save_tokens=true",
            f"features.images={folder}",
            f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        )
    )
    assert summary["tokens_shape"] == [len(photo_files), 16, 128] and summary["grid"] == [4, 4]
    assert [m["channels"] for m in summary["members"]] == [[0, 64], [64, 128]]
    out_dir = Path(summary["output_dir"])
    saved = load_file(str(out_dir / "tokens.safetensors"))
    registry = Registry.from_dirs([tiny_root / "cards"])
    direct = build_encoder(registry, "tiny/clip.tiny/dinov2").encode_images(
        [decode_image(p) for p in sorted(photo_files)]
    )
    torch.testing.assert_close(saved["tokens"], direct.tokens)
    written = json.loads((out_dir / "summary.json").read_text())
    assert written["digest"] == summary["digest"]
    assert abs(written["members"][1]["mean"] - direct.tokens[..., 64:].mean().item()) < 1e-5
    # Same config -> same run folder and the same digest (determinism across runs).
    again = run_task(
        compose_cfg(
            "task=features",
            "encoder=tiny-clip.tiny-dinov2",
            f"features.images={folder}",
            f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        )
    )
    assert again["output_dir"] == summary["output_dir"] and again["digest"] == summary["digest"]


def test_new_family_by_config_only(compose_cfg, tmp_path, photo_files):
    """A timm family with no card in encoders/ (DeiT), added by writing one YAML into a folder named in config."""
    import timm
    from timm.models import save_for_hf

    assert not Registry.from_dirs().list("*deit*")
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=0, **kw)
    save_for_hf(model, tmp_path / "weights", model_args=kw)
    card = {
        "name": "my-lab/deit-tiny-distilled",
        "aliases": ["deit-t"],
        "family": "deit",
        "_target_": "vrlab.encoders.timm_backend.TimmEncoder",
        "source": f"local-dir:{tmp_path / 'weights'}",
        "layer": -1,
        "resize": "squash",
    }
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "deit.yaml").write_text(yaml.safe_dump(card))
    summary = run_task(
        compose_cfg(
            "task=features",
            "encoder=deit-t",
            f"features.images={photo_files[0].parent}",
            f"registry.encoder_dirs=[{tmp_path / 'cards'}]",
        )
    )
    # DeiT-distilled has two prefix tokens (CLS + distillation); only the 4x4 patch tokens remain, and they are
    # the last block's output (layer -1, before the final norm).
    assert summary["tokens_shape"] == [len(photo_files), 16, 48] and summary["grid"] == [4, 4]
    encoder = build_encoder(Registry.from_dirs([tmp_path / "cards"]), "deit-t")
    pixels = encoder.transform(decode_image(photo_files[0])).unsqueeze(0)
    captured = {}
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: captured.update(x=o))
    with torch.no_grad():
        model.eval().forward_features(pixels)
        tokens = encoder(pixels).tokens
    hook.remove()
    assert model.num_prefix_tokens == 2
    torch.testing.assert_close(tokens, captured["x"][:, 2:])


def test_unknown_task_and_encoder_errors(compose_cfg):
    with pytest.raises(VrlabError, match="unknown task 'extrct'; choose one of"):
        run_task(compose_cfg("task=extrct"))
    with pytest.raises(UnknownNameError, match="did you mean"):
        run_task(compose_cfg("task=features", "encoder=clip-224", "features.images=."))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_console_script_reports_errors_in_one_line(tmp_path):
    vrlab = Path(sys.executable).parent / "vrlab"
    proc = subprocess.run(
        [str(vrlab), "task=features", "encoder=dinov2-xxl", "features.images=.", f"paths.outputs={tmp_path}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2
    assert "unknown encoder 'dinov2-xxl'" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_make_demo_end_to_end(tmp_path):
    """`make demo` on a fresh folder: tiny models of every family, then features for each and two composites."""
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(ROOT),
            "demo",
            f"DEMO_ROOT={tmp_path / 'demo'}",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        capture_output=True,
        text=True,
        env=_env() | {"VRLAB_OUTPUTS": str(tmp_path / "out")},
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = sorted((tmp_path / "out" / "features").glob("*/summary.json"))
    encoders = {json.loads(p.read_text())["encoder"] for p in summaries}
    assert len(encoders) == 13 and "tiny/clip.tiny/sd" in encoders
    for path in summaries:
        s = json.loads(path.read_text())
        assert (
            s["images"] == 8
            and s["tokens_shape"][0] == 8
            and s["tokens_shape"][1] == s["grid"][0] * s["grid"][1]
        )
