"""Scale-out: the SLURM launcher's sbatch script (composed, no cluster), a real submitit_local sweep, a killed
training job that continues where it stopped, and two-process training (accelerate, CPU gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vrlab.store import EmbeddingStore, is_complete

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
VRLAB = Path(sys.executable).parent / "vrlab"


def env() -> dict[str, str]:
    return dict(os.environ) | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_the_slurm_launcher_writes_the_sbatch_script_its_overrides_ask_for(monkeypatch, tmp_path):
    """The composed launcher goes through the plugin's own `launch` and submitit's own sbatch writer; only
    the submission (sbatch) is stopped."""
    import submitit.slurm.slurm as slurm

    written = {}

    class Submitted(Exception):
        pass

    make_text = slurm.SlurmExecutor._make_submission_file_text

    def capture(self, command, uid):
        written["text"], written["requeues"] = make_text(self, command, uid), self.max_num_timeout
        raise Submitted

    monkeypatch.setattr(slurm.SlurmExecutor, "_make_submission_file_text", capture)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")  # pretend srun exists
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=vision-lab",
        "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.tasks_per_node=8",
        "hydra.launcher.timeout_min=720",
        "hydra.launcher.array_parallelism=2",
        "hydra.launcher.max_num_timeout=5",
        "hydra.launcher.setup=[module load cuda]",
        f"hydra.sweep.dir={tmp_path}",
        "task=extract",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    with pytest.raises(Submitted):
        launcher.launch([["encoder=clip336"], ["encoder=dinov2-l"], ["encoder=sd2.1"]], 0)
    text = written["text"]
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision-lab",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --time=720",
        "#SBATCH --array=0-2%2",
        "#SBATCH --job-name=vrlab-extract",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "module load cuda",
    ):
        assert line in text, line
    assert written["requeues"] == 5


def _common(data_root, tiny_root, out):
    return [
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        f"paths.outputs={out}",
        f"hydra.sweep.dir={out / 'sweep'}",
    ]


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_each_point_as_its_own_job(data_root, tiny_root, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(VRLAB),
            "-m",
            "hydra/launcher=local",
            "task=extract",
            "encoder=tiny/clip,tiny/dinov2",
            "benchmark=synth-folder-test",
            "extract.num_workers=0",
            *_common(data_root, tiny_root, out),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    stores = sorted((out / "stores" / "synth-folder-test").iterdir())
    assert len(stores) == 2 and all(is_complete(s) for s in stores)
    assert {EmbeddingStore(s).manifest["encoder"] for s in stores} == {
        "tiny/clip",
        "tiny/dinov2",
    }
    jobs = list((out / "sweep" / ".submitit").glob("*/*_result.pkl"))
    assert len(jobs) == 2  # two submitit jobs, each in its own process


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, data_root):
    from vrlab.demo.tiny_llm import build_llm, default_corpus, llava_texts

    folder = tmp_path_factory.mktemp("llm") / "llama"
    build_llm(folder, corpus=llava_texts(data_root / "synthetic" / "llava") + default_corpus())
    return folder


def _train_args(data_root, tiny_root, llm_dir, out, *extra):
    return [
        "task=train",
        "stage=1",
        "train.data=synth-captions",
        "encoder=tiny/clip",
        "llm=demo",
        f"llm.source={llm_dir}",
        "train.stage1.per_device_train_batch_size=2",
        "train.stage1.num_train_epochs=60",
        "train.stage1.lr_scheduler_type=constant",
        "train.stage1.save_steps=10",
        "train.stage1.save_total_limit=1",
        "+train.stage1.disable_tqdm=true",
        *_common(data_root, tiny_root, out),
        *extra,
    ]


@pytest.mark.slow
def test_a_killed_training_job_continues_where_it_stopped(data_root, tiny_root, llm_dir, tmp_path):
    """A submitit_local job is killed after its first checkpoint; the same sweep again lands in the same run
    folder, continues from that checkpoint (train.resume=auto) and ends with the uninterrupted run's losses."""
    out = tmp_path / "out"
    sweep = [str(VRLAB), "-m", "hydra/launcher=local", *_train_args(data_root, tiny_root, llm_dir, out)]
    job = subprocess.Popen(
        sweep, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    checkpoints: list[Path] = []
    while not checkpoints and time.monotonic() < deadline and job.poll() is None:
        checkpoints = list((out / "train").glob("stage1/*/trainer/checkpoint-*/trainer_state.json"))
        time.sleep(0.05)
    assert checkpoints, job.communicate(timeout=60)[1].decode()[-3000:]
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and its job process
    job.wait(timeout=60)
    (folder,) = (out / "train" / "stage1").iterdir()
    assert not (folder / "train_result.json").exists()  # killed mid-training
    rerun = subprocess.run(sweep, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "continuing from" in rerun.stdout + rerun.stderr + _logs(out)
    resumed = json.loads((folder / "train_result.json").read_text())
    whole = subprocess.run(
        [
            str(VRLAB),
            *_train_args(data_root, tiny_root, llm_dir, tmp_path / "whole", f"train.out={tmp_path / 'w'}"),
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    uninterrupted = json.loads((tmp_path / "w" / "train_result.json").read_text())
    assert resumed["steps"] == uninterrupted["steps"] == 180
    np.testing.assert_allclose(resumed["losses"], uninterrupted["losses"], rtol=1e-4)


def _logs(out: Path) -> str:
    """vrlab's log files and the submitit jobs' captured output."""
    files = [p for p in out.rglob("*") if p.is_file() and (p.suffix == ".log" or "_log." in p.name)]
    return "".join(p.read_text(errors="replace") for p in files)


@pytest.mark.slow
def test_two_process_training_follows_the_one_process_loss_curve(data_root, tiny_root, llm_dir, tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo) with half the per-device batch: the same global batch,
    the same samples per step, so the same losses (the loss averages over the global batch's label tokens)."""

    def args(out, per_device):
        return [
            *_train_args(data_root, tiny_root, llm_dir, tmp_path / "out", f"train.out={out}"),
            f"train.stage1.per_device_train_batch_size={per_device}",
            "train.stage1.num_train_epochs=4",
            "+train.stage1.save_strategy=no",
        ]

    one = subprocess.run(
        [str(VRLAB), *args(tmp_path / "one", 2)], env=env(), capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-2000:]
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU the processes join over gloo on the CPU
    # (`--cpu` would start a single process)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = subprocess.run(
        [*launch, "-m", "vrlab.cli", *args(tmp_path / "two", 1)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "train_result.json").read_text())
    b = json.loads((tmp_path / "two" / "train_result.json").read_text())
    assert a["steps"] == b["steps"] == 12
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-4)


# --- data at scale: WebDataset tar shards --------------------------------------------------------------
def _write_shards(data_root, folder, per_shard=4):
    """The folder benchmark's images as WebDataset shards (webdataset's own TarWriter), with labels and
    captions, and one metadata-only sample; returns {key: the image's folder item}."""
    import webdataset as wds

    from vrlab.data.benchmarks import load_benchmark

    items = load_benchmark("synth-folder-test", data_root).items
    folder.mkdir(parents=True)
    keys = {}
    for s in range(0, len(items), per_shard):
        with wds.TarWriter(str(folder / f"wds-{s // per_shard:06d}.tar")) as sink:
            for i, item in enumerate(items[s : s + per_shard], start=s):
                key = f"{i:09d}"
                sink.write(
                    {
                        "__key__": key,
                        "png": Path(item.path).read_bytes(),
                        "cls": item.label,
                        "txt": f"image {i}",
                    }
                )
                keys[key] = item
            if s == 0:
                sink.write({"__key__": "meta-only", "json": {"note": "no image"}})
    return keys


def test_webdataset_shards_extract_like_the_unpacked_images(
    compose_cfg, data_root, tiny_root, tmp_path, monkeypatch
):
    from vrlab.cli import run_task

    keys = _write_shards(data_root, tmp_path / "wds")
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "wds-test.yaml").write_text(
        "name: wds-test\ntask: classification\nmetric: accuracy\n"
        f"_target_: vrlab.data.webdataset.WebDatasetLoader\nroot: {tmp_path / 'wds'}\n"
        "shards: 'wds-{000000..000002}.tar'\n"
    )
    common = [
        f"paths.data={data_root}",
        f"registry.encoder_dirs=[{tiny_root / 'cards'}]",
        f"registry.benchmark_dirs=[{cards}]",
        "encoder=tiny/clip",
        "extract.num_workers=2",  # the members are read in DataLoader workers, as images are
        "extract.shard_size=5",
    ]
    wds_out = run_task(compose_cfg("task=extract", "benchmark=wds-test", *common))
    folder_out = run_task(compose_cfg("task=extract", "benchmark=synth-folder-test", *common))
    calls = []
    from vrlab.store import reader

    opened = reader.EmbeddingStore._open
    monkeypatch.setattr(reader.EmbeddingStore, "_open", lambda self, s: calls.append(s) or opened(self, s))
    wds_store, folder_store = EmbeddingStore(wds_out["path"]), EmbeddingStore(folder_out["path"])
    assert calls == []  # opening a store reads its manifest (one entry per shard), no shard
    assert wds_store.ids == sorted(keys) and wds_store.manifest["num_shards"] == 3
    for key, item in keys.items():
        assert np.array_equal(wds_store.tokens(key).numpy(), folder_store.tokens(item.id).numpy())
    from vrlab.data.webdataset import WebDatasetLoader

    loader = WebDatasetLoader(tmp_path / "wds", "wds-{000000..000002}.tar")
    assert [it.label for it in loader.items] == [keys[k].label for k in sorted(keys)]
    assert loader.items[0].meta["caption"] == "image 0" and str(loader.items[0].path).endswith(
        "#000000000.png"
    )


def test_webdataset_faults_are_named(data_root, tmp_path):
    from vrlab.data.images import decode_image
    from vrlab.data.webdataset import WebDatasetLoader
    from vrlab.errors import ImageDecodeError, VrlabError

    _write_shards(data_root, tmp_path / "wds")
    with pytest.raises(VrlabError, match=r"1 of 4 WebDataset shards do not exist, e.g. .*wds-000003.tar"):
        WebDatasetLoader(tmp_path / "wds", "wds-{000000..000003}.tar")
    loader = WebDatasetLoader(tmp_path / "wds", "wds-000002.tar")
    shard = tmp_path / "wds" / "wds-000002.tar"
    shard.write_bytes(shard.read_bytes()[: loader.items[-1].path.offset + 10])  # cut inside the last image
    with pytest.raises(ImageDecodeError, match="wds-000002.tar#000000011.png"):
        decode_image(loader.items[-1].path)


@pytest.fixture
def restored_environ():
    """os.environ as it was, whatever the test (or submitit's export) set: a RANK left behind would make every
    later in-process training of this worker wait for a process group."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


def test_a_multi_task_slurm_job_becomes_torchrun_ranks(monkeypatch, restored_environ):
    from vrlab.runtime import adopt_slurm_ranks, distributed_context

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not adopt_slurm_ranks()  # not in a SLURM job: nothing changes
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "5",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "gpu-node07",
        "SLURM_STEP_NODELIST": "gpu-node07",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert adopt_slurm_ranks()
    assert distributed_context() == (5, 8)
    assert os.environ["LOCAL_RANK"] == "5" and os.environ["MASTER_ADDR"] == "gpu-node07"
    assert not adopt_slurm_ranks()  # RANK is set now: a second call (or torchrun's own) wins


def test_auto_resume_takes_only_a_checkpoint_of_the_same_inputs(tmp_path, caplog):
    from vrlab.mllm.train import STAMP_FILE
    from vrlab.tasks.train import _resume_from

    assert _resume_from("auto", tmp_path, "abc") is None  # nothing to resume
    for step, inputs in ((10, "abc"), (20, "xyz")):
        folder = tmp_path / "trainer" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / STAMP_FILE).write_text(json.dumps({"inputs": inputs}))
    assert _resume_from("auto", tmp_path, "xyz") == str(tmp_path / "trainer" / "checkpoint-20")
    assert (
        _resume_from("auto", tmp_path, "abc") is None and "other inputs" in caplog.text
    )  # the last is not its own
    assert _resume_from(None, tmp_path, "xyz") is None
    assert _resume_from(True, tmp_path, "abc") is True  # as given
