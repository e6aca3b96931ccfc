"""Shared fixtures: a small synthetic dataset, and real runs under the deepspeed launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dtp_ds.cluster.ports import free_port

REPO = Path(__file__).resolve().parents[1]
TINY_DS_CONFIG = str(REPO / "ds_configs" / "tiny.json")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """2,400 captioned 64 px images in 12 shards, plus a 48-class zero-shot split."""
    from dtp_ds.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, num_train=2400, samples_per_shard=200, val_per_class=2, image_size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_cls(tmp_path_factory) -> Path:
    """The class-labelled split alone: 2,400 64 px images of the 56 "colour on background"
    classes in 12 cls shards, and 448 validation images as class folders (classify/val) and a
    cls shard (classify/val_shards)."""
    from dtp_ds.data.synthetic import write_classify_split

    out = tmp_path_factory.mktemp("synth_cls")
    write_classify_split(out, num_train=2400, samples_per_shard=200, val_per_class=8, image_size=64, seed=0)
    return out


def train_data(synth: Path) -> str:
    return f"{synth}/train/{{00000..00011}}.tar"


def deepspeed_cmd(nproc: int, port: int | None = None) -> list[str]:
    # a fresh port per run: a killed job leaves its port behind for a while
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc),
            "--master_port", str(port or free_port()), "--module", "dtp_ds.train"]


def leaked_shm(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce segments of a run on ``port`` still in /dev/shm (see
    dtp_ds.cluster.process_group): removed, and returned so a test can fail on them."""
    found = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for path in found:
        path.unlink(missing_ok=True)
    return found


def run_train(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --module dtp_ds.train ARGS``, one intra-op thread per rank."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    port = free_port()
    try:
        proc = subprocess.run(deepspeed_cmd(nproc, port) + args, cwd=REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        leaked = leaked_shm(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if check and leaked:
        raise AssertionError(f"the run left its shared-memory all-reduce segments in /dev/shm: {leaked}")
    return proc


@dataclass
class RunResult:
    """One run of a ``run_many`` launch: its directory, each rank's exit status and stderr."""
    dir: Path
    rc: list[int]
    stderr: list[str]
    seconds: float


def run_many(runs: dict[str, list[str]], out: Path, nproc: int = 2, env: dict | None = None,
             run_env: dict[str, dict] | None = None, timeout: int = 900,
             calls: list[list[str]] | None = None) -> dict[str, RunResult]:
    """Several ``dtp_ds.train`` runs (name -> argv) one after another in one launch of ``nproc``
    ranks (tests/dist/train_runs.py): the launcher, imports and process group once. ``run_env``:
    environment variables set around one run. ``calls``: ``["module:function", *args]`` each, run
    on every rank before the runs (a test's own multi-rank script in the same launch). Each run's
    directory is ``--logs``/``--name`` of its argv."""
    out.mkdir(parents=True, exist_ok=True)
    spec = [{"name": f"call {i}", "call": call[0], "args": call[1:]} for i, call in enumerate(calls or [])]
    spec += [{"name": name, "argv": argv, "env": (run_env or {}).get(name, {})} for name, argv in runs.items()]
    (out / "runs.json").write_text(json.dumps(spec))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                **(env or {})}
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port", str(port),
           str(REPO / "tests" / "dist" / "train_runs.py"), str(out / "runs.json"), str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:
        leaked = leaked_shm(port)
    if proc.returncode != 0:
        raise AssertionError(f"the runs' launch failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    assert not leaked, f"the launch left its shared-memory all-reduce segments in /dev/shm: {leaked}"
    results = json.loads((out / "results.json").read_text())

    def run_dir(argv: list[str]) -> Path:
        return Path(argv[argv.index("--logs") + 1]) / argv[argv.index("--name") + 1]

    return {name: RunResult(run_dir(argv), **results[name]) for name, argv in runs.items()}


def base_args(synth: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return ["--deepspeed_config", TINY_DS_CONFIG, "--model", "ViT-Tiny-8", "--train-data", train_data(synth),
            "--logs", str(logs), "--name", name, "--batch-size", "16", "--workers", "1", "--warmup", "2",
            "--log-every-n-steps", "1", "--eval-frequency", "0", "--seed", "0", *extra]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]
