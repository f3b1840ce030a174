"""Shared fixtures: tiny models of every family (built once per session, saved, loaded back through the
registry), real photos decoded from files, and Hydra configs composed from the project's conf/."""

import os

# Before anything imports huggingface_hub: offline, or every hub call retries for 20-50 s.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)
# `make test` runs two pytest workers on the two cores: one thread each, inherited by the vrlab commands the
# end-to-end tests start, so the workers do not fight over the cores.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if _THREADS == 1:
    for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_k] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vrlab.demo.tiny_encoders import BUILDERS, build_tiny  # noqa: E402
from vrlab.registry import Registry  # noqa: E402

torch.set_num_threads(_THREADS)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every tiny family saved with its library's own save call, plus its card."""
    root = tmp_path_factory.mktemp("tiny")
    for family in BUILDERS:
        build_tiny(family, root / "models", root / "cards", seed=0)
    return root


@pytest.fixture(scope="session")
def registry(tiny_root: Path) -> Registry:
    """The project's cards plus the tiny ones."""
    return Registry.from_dirs([tiny_root / "cards"])


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photos of different sizes and aspect ratios, written as JPEG and PNG files."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    folder = tmp_path_factory.mktemp("photos")
    arrays = {
        "china.jpg": load_sample_image("china.jpg"),
        "astronaut.png": data.astronaut(),
        "chelsea.jpg": data.chelsea(),
        "coffee.png": data.coffee()[::3, ::3],
    }
    paths = []
    for name, arr in arrays.items():
        path = folder / name
        Image.fromarray(np.asarray(arr)).save(path)
        paths.append(path)
    return paths


SMALL_BENCHMARK = {
    "voc_per_split": 12,
    "folder_per_class": 2,
    "visda_per_class": 2,
    "llava": 6,
    "spair_pairs_per_category": 2,
    "imagenet_c_per_class": 1,
    "captions": 16,
}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated benchmark at `<data_root>/synthetic`, in every real layout."""
    from vrlab.data.synthetic import make_benchmark

    root = tmp_path_factory.mktemp("data")
    make_benchmark(root / "synthetic", seed=0, sizes=SMALL_BENCHMARK)
    return root


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """Compose the real Hydra config with overrides; outputs go to tmp_path."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[f"paths.outputs={tmp_path / 'outputs'}", *overrides])

    return _compose


@pytest.fixture
def torchrun() -> list[str]:
    """The command that runs `vrlab.cli` as two torchrun ranks on this machine (gloo on the CPU)."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vrlab.cli",
    ]


@pytest.fixture
def logit_gap(photo_files):
    """The largest logit difference between a vrlab model and a Hugging Face Llava on the same two photos and
    prompts (both given vrlab's spliced batch), after checking both give logits of one shape."""
    from vrlab.mllm.data import generation_batch

    def gap(ours, hf) -> float:
        images = [decode_photo(p) for p in photo_files[:2]]
        batch = generation_batch(ours, images, ["What is in the image?", "Describe it."])
        with torch.no_grad():
            a = ours(**batch).logits
            b = hf(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
        assert a.shape == b.shape
        return (a - b).abs().max().item()

    return gap


def task_args(data_root, cards, llm_dir, small_batches: bool = False) -> list[str]:
    """Overrides the MLLM task tests share: the generated data, the tiny cards, tiny CLIP and the tiny Llama
    (with `small_batches`, both stages' batches of 4 and no bf16)."""
    args = [
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{cards}]",
        "encoder=tiny/clip",
        "llm=demo",
        f"llm.source={llm_dir}",
    ]
    if small_batches:
        args += [
            "train.stage1.per_device_train_batch_size=4",
            "train.stage2.per_device_train_batch_size=4",
            "train.stage1.bf16=false",
        ]
    return args


def decode_photo(path: Path) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(Image.open(path).convert("RGB"))


CHROMIUM_ARGS = [  # headless on a closed network: no background connections, no first-run work
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def check_report_in_browser(page_file: Path, screenshot: Path) -> dict:
    """Open a report from file:// in Debian's headless Chromium (driven by Playwright) and check it the way a
    reader would: no console error, no request beyond the file, every figure drawn at a size, a column header
    that sorts its table, a point whose hover shows its label; a full-page screenshot is saved."""
    from playwright.sync_api import sync_playwright

    chromium = Path(os.environ.get("VRLAB_CHROMIUM", "/usr/bin/chromium"))
    assert chromium.exists(), f"{chromium} missing: `make test` installs Debian's chromium (see the Makefile)"
    seen: dict = {"console": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1320, "height": 900})
        page.on("console", lambda m: seen["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: seen["console"].append(("error", str(e))))
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.goto(page_file.resolve().as_uri())
        size = "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])"
        seen["figures"] = page.eval_on_selector_all("figure svg", size)
        seen["images"] = page.eval_on_selector_all("figure img", size)  # the attention maps
        # sorting: the first all-numeric column of any sortable table, ascending after one click
        where = page.evaluate(
            """() => { const tables = [...document.querySelectorAll('table.sortable')];
                       for (const [t, table] of tables.entries()) {
                         const rows = [...table.tBodies[0].rows];
                         const n = table.querySelectorAll('th').length;
                         for (let c = 0; c < n; c++) {
                           if (rows.length > 1 && rows.every(r => r.cells[c].classList.contains('num'))) return [t, c];
                         } }
                       return null; }"""
        )
        assert where is not None, "no sortable table with a numeric column"
        t, col = where
        column = f"""() => [...document.querySelectorAll('table.sortable')[{t}].tBodies[0].rows]
                     .map(r => r.cells[{col}].dataset.v).filter(v => v !== '').map(Number)"""
        header = page.locator("table.sortable").nth(t).locator("th").nth(col)
        header.click()
        seen["sorted"] = page.evaluate(column)
        header.click()  # a second click sorts the other way
        seen["sorted_desc"] = page.evaluate(column)
        # the filter box: one encoder's name leaves its rows, and hides the others' in that table
        name = page.evaluate(
            """() => { const t = document.querySelector('table.filterable');
                       return t ? t.tBodies[0].rows[0].cells[Number(t.dataset.nameCol)].textContent : null; }"""
        )
        if name:
            page.fill("#filter", name)
            seen["filtered"] = page.evaluate(
                """() => { const t = document.querySelector('table.filterable'); const c = Number(t.dataset.nameCol);
                           return [...t.tBodies[0].rows].filter(r => r.style.display !== 'none')
                                  .map(r => r.cells[c].textContent); }"""
            )
            seen["filter_name"] = name
            page.fill("#filter", "")
        tips = page.evaluate("() => JSON.parse(document.getElementById('tips').textContent)")
        if tips:
            first = sorted(tips)[0]
            page.hover(f"#{first}")
            seen["tip"] = page.inner_text("#tip"), page.is_visible("#tip"), tips[first]
        page.mouse.move(0, 0)  # the tooltip off the figures for the screenshot
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen
