"""Shared fixtures: a small synthetic dataset, and real runs under the deepspeed launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
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


def base_args(synth: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return ["--deepspeed_config", TINY_DS_CONFIG, "--model", "ViT-Tiny-8", "--train-data", train_data(synth),
            "--logs", str(logs), "--name", name, "--batch-size", "16", "--workers", "1", "--warmup", "2",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--seed", "0", *extra]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]
