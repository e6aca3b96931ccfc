"""The real launchers on loopback: sshd on 127.0.0.1 + pdsh (started by tools/ci_setup_ssh,
skipped with its reason where that cannot run), and helpers that run and clean up jobs.

Jobs are killed by process id only: their own process group, and the processes whose command
line carries the test's unique temporary directory (ranks started through sshd are not in our
process group). DeepSpeed's runner is never sent SIGINT/SIGTERM here: under pdsh its handler
runs ``pkill -f 'python -u -m deepspeed.launcher.launch'`` on every host, i.e. on this machine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SETUP = REPO / "tools" / "ci_setup_ssh"


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: real multi-node launches over ssh on loopback (slow)")


@pytest.fixture(scope="session")
def loopback() -> None:
    """sshd on 127.0.0.1, pdsh, key login for this user to localhost and 127.0.0.1."""
    p = subprocess.run([sys.executable, str(SETUP)], capture_output=True, text=True, timeout=900)
    if p.returncode == 3:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        pytest.skip(f"e2e prerequisites unavailable: {lines[-1] if lines else 'tools/ci_setup_ssh exit 3'}")
    assert p.returncode == 0, f"tools/ci_setup_ssh failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}"


def job_env(**extra: str) -> dict[str, str]:
    """This environment for a job: one intra-op thread per rank, gloo on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "DS_ENV_FILE"))}
    # the venv's bin off PATH (programs are called by absolute path): its pip ninja differs from the
    # one that built DeepSpeed's CPU comm op, and a different ninja rebuilds it (shared, under a lock)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", **extra}


def write_ds_env(path: Path) -> Path:
    """A DeepSpeed env file (DS_ENV_FILE) carrying the same to every node."""
    path.write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\nPYTHONUNBUFFERED=1\n")
    return path


def pids_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a unique temporary path)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def is_rank_process(pid: int) -> bool:
    """A training rank: ``-m dtp_ds.train`` started by DeepSpeed's per-node launcher (its
    dataloader workers carry the same command line and environment, but another parent)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
    return "dtp_ds.train" in _cmdline(pid) and "deepspeed.launcher.launch" in _cmdline(ppid)


class Job:
    """A command in its own session, output to a log file; ``stop()`` kills what it started."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], marker: str) -> None:
        self.log, self.marker, self.t0 = log, marker, time.monotonic()
        self._f = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._f, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job still running after {timeout:.0f} s:\n{self.output()[-4000:]}") from None

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"job exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGKILL our process group and every process carrying the marker (the ranks)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids_with(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        if not self._f.closed:
            self._f.close()
