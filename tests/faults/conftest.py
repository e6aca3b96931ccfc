"""Real runs under the deepspeed launcher for the fault tests (wandb off, one rank unless
asked), runs in the background for the kill tests, and small helpers to read what a run left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dtp_ds.cluster.ports import free_port
from tests.conftest import REPO, deepspeed_cmd, leaked_shm, run_train
from tests.conftest import base_args as base  # noqa: F401  (the fault tests' run arguments)

FAST_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


def run(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A run to its end (any exit status)."""
    return run_train(args, nproc, timeout, {**FAST_ENV, **(env or {})}, check=False)


def run_ok(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_train(args, nproc, env={**FAST_ENV, **(env or {})})


class Background:
    """A job under the launcher in its own process group, output to a file."""

    def __init__(self, args: list[str], log: Path, nproc: int = 1, env: dict | None = None):
        self.log, self.port = log, free_port()
        self.out = open(log, "w")
        self.proc = subprocess.Popen(deepspeed_cmd(nproc, self.port) + args, cwd=REPO, stdout=self.out,
                                     stderr=subprocess.STDOUT, env={**os.environ, **FAST_ENV, **(env or {})},
                                     start_new_session=True)

    def finish_ok(self, timeout: float = 300) -> None:
        """Wait for the job to end: exit 0 and no shared-memory segment left (as ``run_ok``)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the job did not end within {timeout:g} s:\n{self.log.read_text()[-4000:]}") from None
        finally:
            self.out.close()
            leaked = leaked_shm(self.port)
        assert rc == 0, f"the job failed (exit {rc}):\n{self.log.read_text()[-4000:]}"
        assert not leaked, f"the job left its shared-memory all-reduce segments in /dev/shm: {leaked}"

    def wait_for(self, predicate, timeout: float = 240, what: str = "") -> None:
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n"
                                     f"{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> float:
        """kill -9 of the whole job (launcher, ranks, dataloader workers); returns the time."""
        t = time.time()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.out.close()
        return t


def records(run_dir: Path) -> list[dict]:
    from dtp_ds.train.metrics import read_metrics

    return read_metrics(str(run_dir / "metrics.jsonl"))


def steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("dtp_ds.train: error:")]


def config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (``tmpfs(size_mb, ro=False) -> Path``); unmounted afterwards.
    Skipped where mounting is not permitted."""
    mounts: list[Path] = []

    def make(size_mb: int, ro: bool = False) -> Path:
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        opts = f"size={size_mb}m" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
        mounts.append(d)
        return d

    yield make
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill ``directory``'s filesystem until ``leave_bytes`` are free."""
    import shutil

    filler = directory / "filler.bin"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as f:
        remaining = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            n = f.write(chunk[:min(len(chunk), remaining)])
            remaining -= n
    return filler
