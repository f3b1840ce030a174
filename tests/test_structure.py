"""The package's shape: one-way imports (no cycle, not even through function-level imports), the tasks layer
at the top, every experiment config composes and names only cards that exist, and modules stay small."""

import ast
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vrlab.cli import TASKS
from vrlab.registry import Registry

SRC = Path(__file__).resolve().parents[1] / "src" / "vrlab"
ROOT = SRC.parents[1]
CONF_DIR = ROOT / "conf"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """vrlab module -> the vrlab modules it imports anywhere in its body (top level or inside functions)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    edges.add(t)
        # `from vrlab.x import y` counts as importing vrlab.x.y when y is a module, else vrlab.x
        graph[name] = {e for e in edges if not any(o.startswith(e + ".") for o in edges) or e in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "vrlab.registry" in graph and "vrlab.encoders.factory" in graph["vrlab.tasks.catalog"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_library_modules_never_import_the_tasks_layer():
    offenders = {
        m: sorted(e for e in edges if e.startswith("vrlab.tasks"))
        for m, edges in import_graph().items()
        if not m.startswith("vrlab.tasks") and m != "vrlab.cli"
    }
    assert not {m: e for m, e in offenders.items() if e}


def test_layers_point_one_way():
    graph = import_graph()
    # cards build nothing; encoders know nothing of stores, scores or the MLLM; extraction does not reach
    # into the MLLM; scores and perf do not orchestrate extraction or probes
    forbidden = {
        "vrlab.registry": ("vrlab.encoders", "vrlab.data", "vrlab.extract"),
        "vrlab.encoders": ("vrlab.store", "vrlab.scores", "vrlab.mllm", "vrlab.extract", "vrlab.probes"),
        "vrlab.extract": ("vrlab.mllm", "vrlab.scores", "vrlab.probes"),
        "vrlab.scores": ("vrlab.extract", "vrlab.mllm", "vrlab.probes"),
        "vrlab.perf": ("vrlab.probes", "vrlab.scores"),
        "vrlab.mllm.data": ("vrlab.mllm.model",),
        # LLM2CLIP and retrieval stand beside the MLLM: neither reaches into it, the probes or the scores
        "vrlab.llm2clip": ("vrlab.mllm", "vrlab.probes", "vrlab.scores", "vrlab.extract"),
        "vrlab.retrieval": ("vrlab.mllm", "vrlab.probes", "vrlab.scores", "vrlab.extract"),
        # importing writes checkpoint folders; it never builds the MLLM or runs anything on a model
        "vrlab.published": (
            "vrlab.mllm.model",
            "vrlab.probes",
            "vrlab.scores",
            "vrlab.extract",
            "vrlab.eval",
        ),
    }
    bad = [
        (m, e)
        for m, edges in graph.items()
        for prefix, banned in forbidden.items()
        if m == prefix or m.startswith(prefix + ".")
        for e in edges
        if e.startswith(banned)
    ]
    assert not bad


def test_every_task_lives_in_the_tasks_layer():
    import importlib

    for name, target in TASKS.items():
        module, _, func = target.partition(":")
        assert module.startswith("vrlab.tasks."), name
        assert callable(getattr(importlib.import_module(module), func)), name


def test_no_module_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert max(sizes.values()) <= 420, {k: v for k, v in sizes.items() if v > 420}


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _names(cfg) -> tuple[set[str], set[str]]:
    """Every encoder and benchmark card a composed config names."""
    c = OmegaConf.to_container(cfg, resolve=True)
    encoders = {c["encoder"]} if c.get("encoder") else set()
    encoders |= {r["encoder"] for r in c["alignment"]["references"]}
    encoders |= set(c["demo"]["law_encoders"])
    named = (c.get("benchmark"), c["train"]["data"], c["probe"]["train"], c["llm2clip_text"]["benchmark"])
    benchmarks = {b for b in (*named, c["llm2clip"]["benchmark"], c["llm2clip"]["eval_benchmark"]) if b}
    benchmarks |= set(c["probe"]["test"]) | set(c["alignment"]["benchmarks"])
    for entry in c["lmvr_table"]["data"].values():  # the LMVR tables' cards
        benchmarks |= {entry["train"], *entry["test"]}
    benchmarks = {b for b in benchmarks if not b.startswith("lmms:")}  # lmms-eval tasks, not cards
    return encoders, benchmarks


def _swept(experiment: str) -> list[str]:
    """The encoders an experiment's own sweep (hydra.sweeper.params.encoder) runs under -m."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    sweep = (cfg.hydra.sweeper.get("params") or {}).get("encoder")
    return sweep.split(",") if sweep else []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_names_real_cards(experiment, tiny_root):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    encoders, benchmarks = _names(cfg)
    encoders |= set(_swept(experiment))
    enc = Registry.from_dirs([tiny_root / "cards"])
    bench = Registry.from_dirs(kind="benchmark")
    for name in encoders:
        enc.resolve(name)
    for name in benchmarks:
        bench.get(name)
    assert benchmarks, experiment


def test_law_ac_sweeps_the_published_15_settings_under_either_a_protocol():
    swept = _swept("law_ac")
    make = (ROOT / "Makefile").read_text()
    first = re.search(r"^LAW_ENCODERS \?= (.+)$", make, re.M).group(1).split(",")
    assert len(swept) == len(set(swept)) == 15 and swept == [*first, "siglip-l-256", "siglip2-l-256"]
    registry = Registry.from_config(None)
    assert [registry.resolve(n)[0].name for n in swept[-2:]] == [
        "google/siglip-large-patch16-256",
        "google/siglip2-large-patch16-256",
    ]
    for protocol in ("reference_cosine", "caption_likelihood"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=law_ac", f"alignment.protocol={protocol}"])
        assert cfg.alignment.protocol == protocol and cfg.alignment.captions == "llava-558k"
        assert cfg.alignment.n_pairs == 100


def test_the_checker_catches_a_card_that_does_not_exist():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=lmvr_robustness", "probe.train=imagenet-trian"])
    _, benchmarks = _names(cfg)
    with pytest.raises(KeyError, match="did you mean: imagenet-train"):
        for name in benchmarks:
            Registry.from_dirs(kind="benchmark").get(name)


@pytest.mark.parametrize(
    "group",
    ["correspondence=law", "correspondence=standard", "adapter=qformer", "llm=demo", "llm=qwen2.5-14b"],
)
def test_config_groups_swap_a_choice_as_a_whole(group):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[group])
    key, _, value = group.partition("=")
    if key == "correspondence":
        assert cfg.correspondence.protocol == value
    elif value == "qwen2.5-14b":  # the backbone study is this one override
        assert (cfg.llm.source, cfg.llm.template) == ("Qwen/Qwen2.5-14B-Instruct", "chat_template")
    else:
        assert cfg[key]


def test_makefile_encoder_lists_resolve(tiny_root):
    make = (ROOT / "Makefile").read_text()
    enc = Registry.from_dirs([tiny_root / "cards"])
    for var in ("LAW_ENCODERS", "DEMO_ENCODERS", "LAW_DEMO_ENCODERS", "PERF_ENCODERS"):
        names = re.search(rf"^{var} \?= (.+)$", make, re.M).group(1).split(",")
        for name in names:
            if name != "random/vit-s16":  # built by the demo for make perf, not a test fixture
                enc.resolve(name)


@pytest.mark.parametrize(("launcher", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_group_composes(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
