"""Card discovery and validation, names and aliases, dot-joined resolution and did-you-mean errors."""

import sys
import textwrap
from pathlib import Path

import pytest

from vrlab.encoders.factory import build_encoder
from vrlab.errors import CardError, UnknownNameError
from vrlab.registry import BUILTIN_ENCODER_DIR, ENV_ENCODER_DIRS, Registry, load_card

REQUIRED = {
    "openai/clip-vit-large-patch14": ("clip224", 1024, (16, 16)),
    "openai/clip-vit-large-patch14-336": ("clip336", 1024, (24, 24)),
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K": ("openclip-l", 1024, (16, 16)),
    "google/siglip-base-patch16-224": ("siglip-b", 768, (14, 14)),
    "google/siglip-so400m-patch14-384": ("siglip-so400m", 1152, (27, 27)),
    "facebook/dinov2-small": ("dinov2-s", 384, (16, 16)),
    "facebook/dinov2-base": ("dinov2-b", 768, (16, 16)),
    "facebook/dinov2-large": ("dinov2-l", 1024, (16, 16)),
    "timm/eva02_large_patch14_224.mim_m38m": ("eva02-l", 1024, (16, 16)),
    "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k": ("eva02-clip-l", 1024, (16, 16)),
    "runwayml/stable-diffusion-v1-5": ("sd1.5", 1280, (24, 24)),
    "stabilityai/stable-diffusion-2-1": ("sd2.1", 1280, (24, 24)),
    "lambdalabs/sd-image-variations-diffusers": ("sdim", 1280, (24, 24)),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", 1280, (24, 24)),
    "facebook/DiT-XL-2-512": ("dit", 4608, (24, 24)),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("sd3", 6144, (24, 24)),
}


@pytest.fixture(scope="module")
def builtin() -> Registry:
    return Registry.from_dirs()


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_builtin_cards_cover_the_papers_representations(builtin, name):
    alias, dim, grid = REQUIRED[name]
    card = builtin.get(alias)
    assert card.name == name
    assert (card.dim, card.grid) == (dim, grid)
    assert card.spec["_target_"].startswith("vrlab.encoders.")
    assert card.path.parent.parent == BUILTIN_ENCODER_DIR


# cards that read elsewhere than LLaVA's penultimate block, each as its model family does
OWN_LAYER = {
    "OpenGVLab/InternVL3-1B-hf": -1,  # InternVL's vision_feature_layer
    "Qwen/Qwen2.5-VL-7B-Instruct": -1,  # the patch merger: its only tokens
    "timm/convnext_large.dinov3_lvd1689m": -1,  # CNN stages: the last one
    "timm/fastvit_mci4.apple_mclip2_dfndr2b": -2,  # stages: the last attention stage
}


def test_vits_default_to_layer_minus_two_and_diffusion_to_law_defaults(builtin):
    for card in builtin.list():
        if card.spec["_target_"].endswith("DiffusionEncoder"):
            assert (card.spec["t"], card.spec["block"], card.spec["prompt"]) == (1, 0, "")
        else:
            assert card.spec["layer"] == OWN_LAYER.get(card.name, -2), card.name


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("clip224.dinov2-l", ["openai/clip-vit-large-patch14", "facebook/dinov2-large"]),
        (
            "openai/clip-vit-large-patch14-336.facebook/dinov2-large",
            ["openai/clip-vit-large-patch14-336", "facebook/dinov2-large"],
        ),
        ("clip224.sd2.1", ["openai/clip-vit-large-patch14", "stabilityai/stable-diffusion-2-1"]),
        (
            "sd1.5.sd2.1.dit",
            ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1", "facebook/DiT-XL-2-512"],
        ),
        (
            "timm/eva02_large_patch14_224.mim_m38m.CLIP336",
            ["timm/eva02_large_patch14_224.mim_m38m", "openai/clip-vit-large-patch14-336"],
        ),
        ("sd2.1", ["stabilityai/stable-diffusion-2-1"]),
    ],
)
def test_dot_joined_names_split_on_registered_names(builtin, spec, expected):
    assert [c.name for c in builtin.resolve(spec)] == expected


def test_longest_match_wins_and_backtracks(tmp_path):
    cards = tmp_path / "cards"
    for name in ("a", "a.b", "b.c", "c"):
        write(cards, f"{name}.yaml", f"name: {name}\n_target_: x.Y\n")
    reg = Registry.from_dirs([cards], builtin=False)
    assert [c.name for c in reg.resolve("a.b")] == ["a.b"]  # the whole registered name, not a + b
    assert [c.name for c in reg.resolve("a.b.c")] == ["a.b", "c"]
    write(cards, "d.yaml", "name: b.c.d\n_target_: x.Y\n")
    reg = Registry.from_dirs([cards], builtin=False)
    # 'a.b' first would strand 'c.d'; backtracking finds a + b.c.d
    assert [c.name for c in reg.resolve("a.b.c.d")] == ["a", "b.c.d"]


def test_unknown_part_suggests_close_names(builtin):
    with pytest.raises(UnknownNameError) as err:
        builtin.resolve("clip224.dinov2-xl")
    msg = str(err.value)
    assert "unknown encoder 'dinov2-xl' in 'clip224.dinov2-xl'" in msg
    assert "dinov2-l" in msg
    with pytest.raises(UnknownNameError, match="did you mean: .*clip336"):
        builtin.resolve("clip33")
    with pytest.raises(UnknownNameError, match="empty part"):
        builtin.resolve("clip224..dinov2-l")


def test_lookup_is_case_insensitive(builtin):
    assert builtin.get("CLIP224").name == "openai/clip-vit-large-patch14"
    assert builtin.get("Facebook/DINOv2-Large").name == "facebook/dinov2-large"


def test_list_filters_by_glob_over_names_aliases_and_families(builtin):
    names = {c.name for c in builtin.list("dinov2*")}
    assert {"facebook/dinov2-small", "facebook/dinov2-base", "facebook/dinov2-large"} <= names
    assert all("dinov2" in c.family for c in builtin.list("dinov2"))
    assert {c.name for c in builtin.list("*clip*")} >= {
        "openai/clip-vit-large-patch14",
        "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("name: x\n", "needs a string '_target_'"),
        ("_target_: a.B\n", "needs a string 'name'"),
        ("name: x\n_target_: a.B\naliases: 3\n", "'aliases' must be a list"),
        ("name: x\n_target_: a.B\ngrid: [16]\n", "'grid' must be two integers"),
        ("name: x\n_target_: a.B\ndim: big\n", "'dim' must be an integer"),
        ("name: x\n_target_: a.B\n  bad: [indent\n", "cannot read encoder card"),
    ],
)
def test_malformed_cards_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(CardError, match=message) as err:
        load_card(path)
    assert str(path) in str(err.value)


def test_duplicate_names_across_files_name_both(tmp_path):
    first = write(tmp_path, "one.yaml", "name: mine\naliases: [clip224]\n_target_: a.B\n")
    with pytest.raises(CardError) as err:
        Registry.from_dirs([tmp_path])
    assert str(first) in str(err.value) and "clip-vit-large-patch14.yaml" in str(err.value)


def test_declared_shape_is_checked_at_build(registry, tiny_root, tmp_path):
    card = (tiny_root / "cards" / "clip.yaml").read_text().replace("tiny/clip", "tiny/clip-wrong")
    card = card.replace("aliases:\n- tiny-clip", "aliases: []") + "dim: 999\ngrid: [4, 4]\n"
    path = write(tmp_path, "wrong.yaml", card)
    reg = Registry.from_dirs([tmp_path], builtin=False)
    with pytest.raises(CardError, match=r"declares dim=999.*gives dim=64") as err:
        build_encoder(reg, "tiny/clip-wrong")
    assert str(path) in str(err.value)


def test_cards_from_environment_variable(tmp_path, monkeypatch):
    write(tmp_path / "env_cards", "e.yaml", "name: env/encoder\naliases: [envy]\n_target_: a.B\n")
    monkeypatch.setenv(ENV_ENCODER_DIRS, str(tmp_path / "env_cards"))
    assert Registry.from_dirs().get("envy").name == "env/encoder"


def test_missing_extra_folder_is_an_error(tmp_path):
    with pytest.raises(CardError, match="does not exist"):
        Registry.from_dirs([tmp_path / "nope"])


def test_cards_from_an_installed_packages_entry_point(tmp_path, monkeypatch):
    """A real distribution on sys.path whose `vrlab.encoders` entry point returns its card folder."""
    site = tmp_path / "site"
    write(site / "mycards_pkg" / "cards", "m.yaml", "name: plugin/encoder\naliases: [plug]\n_target_: a.B\n")
    write(
        site / "mycards_pkg",
        "__init__.py",
        "from pathlib import Path\ndef card_dir():\n    return Path(__file__).parent / 'cards'\n",
    )
    dist = site / "mycards_pkg-0.1.dist-info"
    write(dist, "METADATA", "Metadata-Version: 2.1\nName: mycards-pkg\nVersion: 0.1\n")
    write(dist, "entry_points.txt", "[vrlab.encoders]\nmine = mycards_pkg:card_dir\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "mycards_pkg", raising=False)
    assert Registry.from_dirs().get("plug").name == "plugin/encoder"


def test_a_card_file_path_works_as_an_encoder_name(tiny_root):
    reg = Registry.from_dirs(builtin=False)
    cards = reg.resolve(str(tiny_root / "cards" / "dinov2.yaml"))
    assert [c.name for c in cards] == ["tiny/dinov2"]
