"""Trustworthy results (reliability cases in docs/reliability.md): nothing stale, nothing executed, nothing
silently wrong. Each test reproduces a case that once went wrong."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from vrlab.errors import VrlabError
from vrlab.scores.correspondence import to_frame


@pytest.mark.parametrize(
    ("size", "expected"), [((500, 281), (0, 184)), ((93, 128), (115, 0)), ((64, 64), (0, 0))]
)
def test_law_keypoint_padding_follows_the_law_code(size, expected):
    # preprocess_kps_pad: pad = int((840 - round(840 * short / long)) / 2), keypoints scaled by 840 / long;
    # on 500x281 the scaled short side is 472.08 -> 472 -> pad 184 (the unrounded formula gave 183)
    w, h = size
    pts = to_frame([[0, 0], [w, h]], size, 840, law=True)
    assert tuple(pts[0].tolist()) == expected
    scale = 840 / max(w, h)
    assert pts[1].tolist() == pytest.approx([w * scale + expected[0], h * scale + expected[1]])


# --- foreign code ------------------------------------------------------------------------------------------
def _write_card(folder: Path, card: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{card['name'].replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def _tiny_clip_card(tiny_root: Path) -> dict:
    return yaml.safe_load((tiny_root / "cards" / "clip.yaml").read_text()) | {"aliases": []}


SMALL = {
    "voc_per_split": 4,
    "folder_per_class": 2,
    "visda_per_class": 1,
    "llava": 2,
    "spair_pairs_per_category": 2,
    "imagenet_c_per_class": 1,
}
EXEC = {"_target_": "builtins.exec", "_args_": ["open('MARKER', 'w').write('ran')"]}


@pytest.mark.parametrize("where", ["top", "nested", "nested-in-list"])
def test_a_card_cannot_run_code_it_names(where, tiny_root, tmp_path, monkeypatch):
    from vrlab.encoders.factory import load_encoder
    from vrlab.errors import CardError

    monkeypatch.chdir(tmp_path)
    card = _tiny_clip_card(tiny_root) | {"name": "evil"}
    if where == "top":
        card |= EXEC
        match = "_target_ 'builtins.exec' is not an allowed encoder class"
    elif where == "nested":
        card["model_class"] = EXEC
        match = "nested '_target_' at 'model_class._target_'"
    else:
        card["mean"] = [0.5, EXEC, 0.5]
        match = r"nested '_target_' at 'mean\[1\]._target_'"
    path = _write_card(tmp_path / "cards", card)
    with pytest.raises(CardError, match=match) as err:
        load_encoder("evil", registry={"encoder_dirs": [str(tmp_path / "cards")]})
    assert str(path) in str(err.value)
    assert not (tmp_path / "MARKER").exists()


def test_a_benchmark_card_cannot_run_code_it_names(data_root, tmp_path, monkeypatch):
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.errors import CardError

    monkeypatch.chdir(tmp_path)
    card = {
        "name": "evil-bench",
        "_target_": "vrlab.data.loaders.ImageFolderLoader",
        "root": "synthetic/folder",
    }
    _write_card(tmp_path / "b", card | {"split": EXEC})
    _write_card(tmp_path / "c", card | EXEC)
    for folder, match in (
        ("b", "nested '_target_' at 'split._target_'"),
        ("c", "not an allowed benchmark class"),
    ):
        with pytest.raises(CardError, match=match):
            load_benchmark("evil-bench", data_root, {"benchmark_dirs": [str(tmp_path / folder)]})
    assert not (tmp_path / "MARKER").exists()


def test_a_checkpoint_spec_cannot_run_code(tiny_root, tmp_path, monkeypatch):
    from vrlab.encoders.factory import encoder_from_dict
    from vrlab.errors import CardError

    monkeypatch.chdir(tmp_path)
    from vrlab.registry import load_card

    spec = dict(load_card(tiny_root / "cards" / "clip.yaml").spec)
    with pytest.raises(CardError, match="stored spec of 'x'.*not an allowed"):
        encoder_from_dict({"name": "x", "spec": spec | EXEC})
    with pytest.raises(CardError, match="nested '_target_' at 'revision._target_'"):
        encoder_from_dict({"name": "x", "spec": spec | {"revision": EXEC}})
    assert not (tmp_path / "MARKER").exists()
    assert encoder_from_dict({"name": "x", "spec": spec}).dim == 64  # the same spec without code builds


def test_a_trusted_backend_class_builds_and_an_untrusted_one_is_refused(tiny_root, tmp_path, monkeypatch):
    from vrlab.encoders.factory import load_encoder
    from vrlab.errors import CardError

    (tmp_path / "mylab_backend.py").write_text(
        "from vrlab.encoders.hf import HFVisionEncoder\n\n\nclass MyEncoder(HFVisionEncoder):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_card(
        tmp_path / "cards",
        _tiny_clip_card(tiny_root) | {"name": "mine", "_target_": "mylab_backend.MyEncoder"},
    )
    _write_card(
        tmp_path / "cards",
        _tiny_clip_card(tiny_root) | {"name": "dict", "_target_": "collections.OrderedDict"},
    )
    reg = {"encoder_dirs": [str(tmp_path / "cards")]}
    with pytest.raises(CardError, match="registry.trusted_targets=\\[mylab_backend.MyEncoder\\]"):
        load_encoder("mine", registry=reg)
    trusted = reg | {"trusted_targets": ["mylab_backend.MyEncoder", "collections.OrderedDict"]}
    assert type(load_encoder("mine", registry=trusted)).__name__ == "MyEncoder"
    with pytest.raises(CardError, match="not a subclass of vrlab.encoders.base.VisionEncoder"):
        load_encoder("dict", registry=trusted)


# --- nothing stale -----------------------------------------------------------------------------------------
@pytest.fixture
def own_clip(tmp_path):
    from vrlab.demo.tiny_encoders import build_tiny

    build_tiny("clip", tmp_path / "models", tmp_path / "cards", seed=0)
    return tmp_path


def _extract(root: Path, data: Path, bench: str = "synth-folder-test"):
    import vrlab

    where = {"registry": {"encoder_dirs": [str(root / "cards")]}, "data_root": str(data)}
    return vrlab.extract_store("tiny/clip", bench, outputs=str(root / "out"), num_workers=0, **where)


def test_replaced_weights_at_the_same_path_give_a_new_store(own_clip, data_root):
    from vrlab.demo.tiny_encoders import build_tiny

    first = _extract(own_clip, data_root)
    assert _extract(own_clip, data_root).path == first.path  # unchanged files: the store is reused
    build_tiny("clip", own_clip / "models", own_clip / "cards", seed=1)  # new weights, same folder and card
    second = _extract(own_clip, data_root)
    assert second.path != first.path
    assert not torch.allclose(first.load(), second.load())


def test_a_changed_image_gives_a_new_store(own_clip, data_root, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    first = _extract(own_clip, data)
    target = first.ids[3]
    path = next((data / "synthetic" / "folder" / "test").glob(f"{target}.*"))
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    second = _extract(own_clip, data)
    assert second.path != first.path
    assert not torch.equal(first.tokens(target), second.tokens(target))
    torch.testing.assert_close(first.tokens(first.ids[0]), second.tokens(first.ids[0]))


def test_another_copy_of_the_data_gives_a_new_store_and_an_identical_copy_reuses_it(
    own_clip, data_root, tmp_path
):
    from vrlab.data.synthetic import make_benchmark

    first = _extract(own_clip, data_root)
    same = tmp_path / "same"
    shutil.copytree(data_root, same)  # copy2 keeps sizes and modification times
    assert _extract(own_clip, same).path == first.path
    other = tmp_path / "other"
    make_benchmark(other / "synthetic", seed=5, sizes=SMALL)
    moved = _extract(own_clip, other)
    assert moved.path != first.path and not torch.allclose(first.load(), moved.load())


def test_correspondence_on_regenerated_pairs_writes_a_new_result(compose_cfg, own_clip, tmp_path):
    from vrlab.cli import run_task
    from vrlab.data.synthetic import make_benchmark

    results = []
    for seed in (0, 7):
        data = tmp_path / f"data{seed}"
        make_benchmark(data / "synthetic", seed=seed, sizes=SMALL)
        cfg = compose_cfg(
            "task=correspondence",
            "encoder=tiny/clip",
            "benchmark=synth-spair",
            f"registry.encoder_dirs=[{own_clip / 'cards'}]",
            f"paths.data={data}",
            "extract.num_workers=0",
        )
        results.append(run_task(cfg))
    assert results[0]["output"] != results[1]["output"]
    assert all(Path(r["output"]).exists() for r in results)
    first = json.loads(Path(results[0]["output"]).read_text())
    assert first["C"] == results[0]["C"]  # the first result was not overwritten


# --- silently wrong numbers --------------------------------------------------------------------------------
def test_a_card_declaring_dim_alone_is_checked(tiny_root, tmp_path):
    from vrlab.encoders.factory import load_encoder
    from vrlab.errors import CardError

    path = _write_card(tmp_path / "cards", _tiny_clip_card(tiny_root) | {"name": "wrong-dim", "dim": 999})
    _write_card(tmp_path / "cards", _tiny_clip_card(tiny_root) | {"name": "wrong-grid", "grid": [5, 5]})
    reg = {"encoder_dirs": [str(tmp_path / "cards")]}
    with pytest.raises(CardError, match="declares dim=999 but 'wrong-dim' gives dim=64") as err:
        load_encoder("wrong-dim", registry=reg)
    assert str(path) in str(err.value)
    with pytest.raises(CardError, match=r"declares grid=\[5, 5\] but 'wrong-grid' gives grid=\[4, 4\]"):
        load_encoder("wrong-grid", registry=reg)


def test_an_ambiguous_dotted_name_says_which_reading_it_took(tmp_path, caplog):
    from vrlab.registry import Registry

    for name in ("amb1", "amb2", "amb1.amb2"):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\n_target_: x.Y\n")
    reg = Registry.from_dirs([tmp_path], builtin=False)
    with caplog.at_level("WARNING", logger="vrlab.registry"):
        cards = reg.resolve("amb1.amb2")
    assert [c.name for c in cards] == ["amb1.amb2"]
    assert "2 readings: 'amb1.amb2' or 'amb1' + 'amb2'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vrlab.registry"):
        reg.resolve("amb1")
    assert not caplog.text


def test_an_adapter_with_nan_weights_stops_the_extraction(registry, data_root, tmp_path):
    from vrlab.adapters import build_mlp
    from vrlab.checkpoint import save_adapter
    from vrlab.data.benchmarks import load_benchmark
    from vrlab.encoders.factory import build_encoder
    from vrlab.extract import extract
    from vrlab.store import is_complete

    adapter = build_mlp("linear", 64, 8)
    with torch.no_grad():
        adapter.weight[2, 5] = float("nan")
    save_adapter(adapter, tmp_path / "a", {"type": "linear", "in_dim": 64, "out_dim": 8})
    from vrlab.adapters import load_token_adapter

    loaded, _ = load_token_adapter(tmp_path / "a", expect_in_dim=64)
    items = load_benchmark("synth-folder-test", data_root).items
    with pytest.raises(
        VrlabError, match="adapter after 'tiny/clip' produced non-finite tokens for batch rows"
    ):
        extract(
            build_encoder(registry, "tiny/clip"), items, tmp_path / "s", {}, num_workers=0, adapter=loaded
        )
    assert not is_complete(tmp_path / "s")


def test_json_results_never_hold_nan(tmp_path):
    from vrlab.runtime import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"A": float("nan"), "C": [1.0, float("inf")], "n": 3})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"A": None, "C": [1.0, None], "n": 3}


def test_probes_refuse_non_finite_features_naming_the_rows():
    from vrlab.probes.linear import LinearProbe, finite_features

    x, y = torch.randn(20, 4), torch.arange(20) % 2
    x[[3, 11], 1] = float("nan")
    with pytest.raises(VrlabError, match=r"training features hold NaN or inf values in 2 rows: \[3, 11\]"):
        LinearProbe(False).fit(x, y)
    probe = LinearProbe(False, weight_decays=[1e-2])
    probe.fit(torch.randn(20, 4), y)
    test = torch.randn(5, 4)
    test[4, 0] = float("inf")
    with pytest.raises(VrlabError, match=r"in 1 rows: \[4\]"):
        probe.evaluate(test, y[:5])
    with pytest.raises(VrlabError, match=r"in 1 rows: \['img-b'\]"):
        finite_features(test[3:], "features", ["img-a", "img-b"])


def test_files_respect_the_umask(tmp_path, monkeypatch):
    import vrlab.runtime
    from vrlab.runtime import atomic_write_bytes

    current = os.umask(0)
    os.umask(current)
    assert current == vrlab.runtime._UMASK
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        monkeypatch.setattr(vrlab.runtime, "_UMASK", umask)
        atomic_write_bytes(tmp_path / f"{umask}.bin", b"x")
        assert (tmp_path / f"{umask}.bin").stat().st_mode & 0o777 == mode


# --- bad input, one clear line -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is not a readable CSV"),
        ("representation,C,A,bench\n", "has no rows"),
        (
            "representation,C,A,bench\nx,1,0.5,3\ny,2,abc,4\n",
            r"column 'A', row 3 \(y\): 'abc' is not a finite number",
        ),
        (
            "representation,C,A,bench\nx,1,0.5,3\ny,inf,0.4,4\n",
            r"column 'C', row 3 \(y\): .*not a finite number",
        ),
    ],
)
def test_a_bad_law_table_names_the_row_and_column(text, match, tmp_path):
    from vrlab.scores.law import read_table

    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(VrlabError, match=match) as err:
        read_table(tmp_path / "t.csv")
    assert str(tmp_path / "t.csv") in str(err.value)


def test_an_adapter_whose_weights_do_not_match_its_config_names_both_widths(tmp_path):
    from vrlab.adapters import build_mlp, load_adapter
    from vrlab.checkpoint import ADAPTER_CONFIG, save_adapter
    from vrlab.errors import ShapeError

    save_adapter(build_mlp("linear", 32, 8), tmp_path / "a", {"type": "linear", "in_dim": 32, "out_dim": 8})
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text()) | {"in_dim": 64}
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(
        ShapeError,
        match=r"in_dim=64, out_dim=8\) builds 'net.weight' of shape \[8, 64\] but its weights hold \[8, 32\]",
    ) as err:
        load_adapter(tmp_path / "a")
    assert str(tmp_path / "a") in str(err.value)


def test_features_validates_its_settings_before_loading_a_model(compose_cfg, tmp_path, monkeypatch):
    from vrlab.cli import run_task

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("vrlab.tasks.features.load_encoder", no_model)
    with pytest.raises(VrlabError, match="task=features needs features.images=<a folder of images>"):
        run_task(compose_cfg("task=features", "encoder=clip224"))
    with pytest.raises(VrlabError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        run_task(compose_cfg("task=features", "encoder=clip224", f"features.images={tmp_path / 'nope'}"))


def test_features_honours_on_bad_image(compose_cfg, tiny_root, photo_files, tmp_path):
    from vrlab.cli import run_task
    from vrlab.errors import ImageDecodeError

    folder = tmp_path / "imgs"
    shutil.copytree(photo_files[0].parent, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    args = [
        "task=features",
        "encoder=tiny/clip",
        f"features.images={folder}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
    ]
    with pytest.raises(ImageDecodeError, match="broken.png"):
        run_task(compose_cfg(*args))
    summary = run_task(compose_cfg(*args, "data.on_bad_image=skip"))
    assert summary["images"] == len(photo_files) and summary["skipped"] == [str(folder / "broken.png")]
    assert summary["tokens_shape"][0] == len(photo_files)


def test_a_decode_error_in_a_worker_is_one_line_naming_the_file(registry, data_root, tmp_path):
    from vrlab.data.loaders import Item
    from vrlab.encoders.factory import build_encoder
    from vrlab.errors import ImageDecodeError
    from vrlab.extract import extract

    (tmp_path / "bad.png").write_bytes(b"\\x89PNG broken")
    items = [Item("bad", tmp_path / "bad.png", 0, {})]
    with pytest.raises(ImageDecodeError) as err:
        extract(build_encoder(registry, "tiny/clip"), items, tmp_path / "s", {}, num_workers=1)
    message = str(err.value)
    assert "bad.png" in message and "\\n" not in message and "Traceback" not in message


def test_a_missing_builtin_card_folder_is_named(monkeypatch, tmp_path):
    import dataclasses

    from vrlab import registry as reg
    from vrlab.errors import UnknownNameError

    gone = tmp_path / "gone"
    monkeypatch.setitem(reg.KINDS, "encoder", dataclasses.replace(reg.KINDS["encoder"], builtin_dir=gone))
    with pytest.raises(UnknownNameError, match=f"built-in encoder card folder {gone} is missing"):
        reg.Registry.from_dirs().get("clip224")


@pytest.mark.parametrize(
    ("spec", "says", "not_says"),
    [
        ({"source": "/no/such/folder"}, "the local path '/no/such/folder'", "download"),
        ({"source": "local-dir:/no/such/dir"}, "the local path '/no/such/dir'", "download"),
    ],
)
def test_build_errors_hint_at_the_hub_only_when_a_hub_is_involved(spec, says, not_says, tiny_root, tmp_path):
    from vrlab.encoders.factory import load_encoder

    card = _tiny_clip_card(tiny_root) | {"name": "broken"} | spec
    _write_card(tmp_path / "cards", card)
    with pytest.raises(VrlabError) as err:
        load_encoder("broken", registry={"encoder_dirs": [str(tmp_path / "cards")]})
    assert says in str(err.value) and not_says not in str(err.value)


def test_an_unknown_loader_class_gets_no_download_hint(data_root, tmp_path):
    from vrlab.data.benchmarks import load_benchmark

    card = {"name": "b", "_target_": "vrlab.data.loaders.NoSuchLoader", "root": "synthetic/folder"}
    _write_card(tmp_path / "b", card)
    with pytest.raises(VrlabError, match="not an allowed benchmark class") as err:
        load_benchmark("b", data_root, {"benchmark_dirs": [str(tmp_path / "b")]})
    assert "download" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("extract.limit=-5", "extract.limit=-5 must be >= 1 (or null for no limit)"),
        ("extract.batch_size=0", "extract.batch_size=0 must be >= 1"),
        ("extract.batch_size=abc", "extract.batch_size='abc' must be an integer >= 1"),
        ("extract.num_workers=-1", "extract.num_workers=-1 must be >= 0"),
        ("alignment.n_images=0", "alignment.n_images=0 must be >= 1"),
        (
            "train.stage1.per_device_train_batch_size=0",
            "train.stage1.per_device_train_batch_size=0 must be >= 1",
        ),
        ("law.trials=1.5", "law.trials=1.5 must be an integer"),
    ],
)
def test_bad_counts_are_refused_by_name_before_a_model_loads(override, message, compose_cfg, monkeypatch):
    import re

    from vrlab.cli import run_task

    monkeypatch.setattr("vrlab.encoders.factory.build_encoder", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(VrlabError, match=re.escape(message)):
        run_task(compose_cfg("task=extract", "encoder=clip224", "benchmark=synth-folder-test", override))


def test_the_api_refuses_bad_counts_too():
    from vrlab.extract import ExtractionRequest

    with pytest.raises(VrlabError, match=r"extract.limit=0 must be >= 1"):
        ExtractionRequest("tiny/clip", "synth-folder-test", limit=0)


def test_an_output_path_that_is_a_file_is_named(own_clip, data_root, tmp_path):
    import vrlab

    (tmp_path / "taken").write_text("x")
    with pytest.raises(VrlabError, match=f"extract.out={tmp_path / 'taken'} is an existing file"):
        vrlab.extract_store(
            "tiny/clip",
            "synth-folder-test",
            registry={"encoder_dirs": [str(own_clip / "cards")]},
            data_root=str(data_root),
            out=str(tmp_path / "taken"),
        )


def test_the_cli_edge_turns_user_errors_into_one_line():
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from vrlab.cli import user_error

    assert user_error(VrlabError("x is wrong")) == "x is wrong"
    assert user_error(PermissionError(13, "Permission denied", "/out/s")) == "/out/s: Permission denied"
    assert (
        user_error(OSError(28, "No space left on device", "/out/shard"))
        == "/out/shard: No space left on device"
    )
    with pytest.raises(MissingMandatoryValue) as err:
        _ = OmegaConf.create({"images": "???"}).images
    assert user_error(err.value).startswith("config: Missing mandatory value: images")
    assert user_error(KeyError("bug")) is None  # a bug keeps its traceback


def test_a_failed_write_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from vrlab.runtime import atomic_write_bytes

    (tmp_path / "file").write_text("x")
    with pytest.raises(VrlabError, match=f"cannot write {tmp_path / 'file' / 'shard'}"):
        atomic_write_bytes(tmp_path / "file" / "shard", b"data")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(VrlabError, match=f"cannot write {tmp_path / 'out.bin'}: No space left on device"):
        atomic_write_bytes(tmp_path / "out.bin", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_fingerprints_ignore_strings_that_are_not_paths(tmp_path, monkeypatch):
    from vrlab.fingerprint import spec_fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "squash").mkdir()  # a folder named like an option value
    (tmp_path / "w.bin").write_bytes(b"12345")
    prints = spec_fingerprint({"prompt": "", "resize": "squash", "source": str(tmp_path), "ckpt": "w.bin"})
    assert sorted(prints) == sorted([str(tmp_path), "w.bin"])


def test_remote_code_is_opt_in_per_card_and_announced(tiny_root, tmp_path, caplog):
    from vrlab.encoders.factory import load_encoder

    _write_card(
        tmp_path / "cards", _tiny_clip_card(tiny_root) | {"name": "remote", "trust_remote_code": True}
    )
    _write_card(tmp_path / "cards", _tiny_clip_card(tiny_root) | {"name": "plain"})
    reg = {"encoder_dirs": [str(tmp_path / "cards")]}
    with caplog.at_level("WARNING", logger="vrlab.instantiate"):
        load_encoder("plain", registry=reg)
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level("WARNING", logger="vrlab.instantiate"):
        load_encoder("remote", registry=reg)
    assert "'remote'" in caplog.text and "trust_remote_code is set in its card" in caplog.text
