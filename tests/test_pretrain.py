"""Encoder pre-training: every kind trains and saves a tower that an ordinary card loads back; a CLIP-style
encoder beats its random init on a linear probe of colour; the task writes a card the registry finds."""

from pathlib import Path

import numpy as np
import pytest
import torch

from vrlab.data.images import decode_image
from vrlab.data.scenes import COLOURS, render_scene
from vrlab.encoders.factory import build_card, load_encoder
from vrlab.errors import VrlabError
from vrlab.pretrain import PretrainSettings, pretrain
from vrlab.probes.linear import fit_and_evaluate
from vrlab.registry import load_card

COLOUR_NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Textured scenes of one colour each (photo style: the background does not give the colour away)."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)

    def split(name, n):
        paths, labels, captions = [], [], []
        for i in range(n):
            c = i % len(COLOUR_NAMES)
            scene = render_scene(rng, (64, 64), n_objects=(1, 2), style="photo", colours=(COLOUR_NAMES[c],))
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            scene.image.save(path)
            paths.append(path)
            labels.append(c)
            captions.append(scene.description)
        return paths, labels, captions

    return split("train", 192), split("test", 96)


def colour_probe(card_file, scenes):
    encoder = build_card(load_card(Path(card_file))).eval()
    (train, train_y, _), (test, test_y, _) = scenes

    def feats(paths):
        return encoder.encode_images([decode_image(p) for p in paths]).tokens.mean(1)

    result = fit_and_evaluate(
        feats(train), train_y, {"test": (feats(test), test_y)}, len(COLOUR_NAMES), False, seed=0
    )
    return result["test"]["test"]["accuracy"]


def test_a_clip_style_encoder_beats_its_random_init_on_colour(scenes, tmp_path):
    (paths, _labels, captions), _ = scenes
    random = pretrain(paths, tmp_path / "random", PretrainSettings("random", 0), progress=False)
    clip = pretrain(
        paths, tmp_path / "clip", PretrainSettings("clip", 150), captions=captions, progress=False
    )
    assert clip["last_loss"] < 0.6 * clip["first_loss"]
    before, after = colour_probe(random["card"], scenes), colour_probe(clip["card"], scenes)
    print(f"colour probe: random init {before:.1f}%, clip 150 steps {after:.1f}%")
    assert after > before + 10
    # same seed, same init: the random rung is the clip rung's starting point, reproducibly
    again = pretrain(paths, tmp_path / "again", PretrainSettings("random", 0), progress=False)
    a = build_card(load_card(Path(random["card"]))).model.state_dict()
    b = build_card(load_card(Path(again["card"]))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["ssl", "denoise", "supervised"])
def test_every_kind_trains_and_loads_through_its_card(scenes, tmp_path, kind):
    (paths, labels, _), _ = scenes
    record = pretrain(
        paths, tmp_path / kind, PretrainSettings(kind, 40, batch_size=16), labels=labels, progress=False
    )
    assert len(record["losses"]) == 40 and record["last_loss"] < record["first_loss"]
    encoder = build_card(load_card(Path(record["card"])))
    feats = encoder.encode_images([decode_image(paths[0])])
    assert feats.tokens.shape == (1, 64, 64)  # 8 x 8 patches of the 64 px input, 64 wide


def test_bad_settings_are_named(scenes, tmp_path):
    (paths, _labels, _), _ = scenes
    with pytest.raises(VrlabError, match="kind='mae' is not one of"):
        pretrain(paths, tmp_path, PretrainSettings("mae", 10))
    with pytest.raises(VrlabError, match="kind=random is the untrained init"):
        pretrain(paths, tmp_path, PretrainSettings("random", 5))
    with pytest.raises(VrlabError, match="needs one caption per image"):
        pretrain(paths, tmp_path, PretrainSettings("clip", 5))


def test_the_task_registers_a_card(compose_cfg, data_root, tmp_path):
    from vrlab.cli import run_task

    out = run_task(
        compose_cfg(
            "task=pretrain_encoder",
            "pretrain.kind=clip",
            "pretrain.steps=5",
            "pretrain.data=synth-retrieval",
            "pretrain.image_size=32",
            f"pretrain.cards={tmp_path / 'cards'}",
            f"paths.data={data_root}",
        )
    )
    encoder = load_encoder("pretrained/clip-5", registry={"encoder_dirs": [str(tmp_path / "cards")]})
    assert encoder.grid == (4, 4) and out["registered"].endswith("pretrained_clip-5.yaml")
    with pytest.raises(VrlabError, match="needs captions"):
        run_task(
            compose_cfg(
                "task=pretrain_encoder",
                "pretrain.kind=clip",
                "pretrain.steps=5",
                "pretrain.data=synth-folder-train",
                f"paths.data={data_root}",
            )
        )


def test_contrastive_kinds_need_two_images_a_batch(scenes, tmp_path):
    (paths, _, captions), _ = scenes
    with pytest.raises(VrlabError, match="batch_size must be >= 2"):
        pretrain(paths, tmp_path, PretrainSettings("clip", 5, batch_size=1), captions=captions)
    with pytest.raises(VrlabError, match="needs at least 2"):
        pretrain(paths[:1], tmp_path, PretrainSettings("ssl", 5))
