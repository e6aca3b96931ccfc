"""The peer watchdog with two real gloo ranks: a rank that hangs (SIGSTOP, which no collective
notices before its own timeout) or dies (SIGKILL) is named by the survivor, which stops within
the watchdog's timeout."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dtp_ds.cluster.ports import free_port
from dtp_ds.launch.watchdog import EXIT_PEER_LOST, PeerWatchdog
from tests.conftest import REPO

TIMEOUT_S = 3.0
WORKER = f"""
import importlib.util, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
# the module alone: ``import dtp_ds`` would also load open_clip and the models (seconds per rank)
spec = importlib.util.spec_from_file_location("watchdog", {str(REPO / "dtp_ds" / "launch" / "watchdog.py")!r})
wd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wd)
start_watchdog, report_failure = wd.start_watchdog, wd.report_failure
dist.init_process_group("gloo", timeout=timedelta(seconds=300))  # far beyond the watchdog's
start_watchdog(timeout_s={TIMEOUT_S}, interval_s=0.5)
print("ready", flush=True)
t = torch.ones(4)
try:
    while True:
        dist.all_reduce(t)
        time.sleep(0.05)
except Exception as e:
    report_failure(e)
    raise
"""


@pytest.mark.parametrize("victim,sig", [(1, signal.SIGSTOP), (0, signal.SIGSTOP), (1, signal.SIGKILL)],
                         ids=["rank1-hangs", "rank0-store-host-hangs", "rank1-dies"])
def test_survivor_names_the_lost_rank_and_stops(tmp_path, victim, sig):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        t0 = time.monotonic()
        procs[victim].send_signal(sig)
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=TIMEOUT_S + 20)
        elapsed = time.monotonic() - t0
        out = survivor.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert rc != 0 and elapsed < TIMEOUT_S + 10, (rc, elapsed, out[-2000:])
    line = next((ln for ln in out.splitlines() if ln.startswith("dtp_ds: error:")), None)
    assert line is not None, out[-3000:]
    assert line.startswith(f"dtp_ds: error: rank {1 - victim}: rank {victim} ")
    if sig == signal.SIGSTOP:  # only the watchdog can end a hang before the collective timeout
        assert rc == EXIT_PEER_LOST
    if victim == 1:
        assert f"pid {procs[1].pid}" in line
    else:
        assert "rendezvous store" in line


class FakeStore:
    """The TCPStore calls the watchdog makes, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def add(self, key: str, n: int) -> int:
        v = int(self.data.get(key, b"0")) + n
        self.data[key] = str(v).encode()
        return v

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[k] for k in keys]

    def get(self, key: str) -> bytes:
        return self.data[key]

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()


def _dogs(world: int, timeout_s: float) -> tuple[list[PeerWatchdog], list[str]]:
    """``world`` started watchdogs on one fake store, beating every 0.1 s, and the list their
    verdicts land in."""
    store, lost = FakeStore(), []
    dogs = [PeerWatchdog(store, r, world, timeout_s=timeout_s, interval_s=0.1, on_lost=lost.append)
            for r in range(world)]
    for d in dogs:
        d.start()
    return dogs, lost


def _wait_for_verdict(lost: list[str], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)


def test_watchdog_logic_with_a_fake_store():
    """Three ranks on one store: rank 2 stops cleanly (not reported), rank 1 goes silent (named)."""
    dogs, lost = _dogs(3, timeout_s=1.0)
    time.sleep(0.5)
    dogs[2].stop()
    time.sleep(0.3)
    assert not lost and all(d.verdict() is None for d in dogs)
    dogs[1]._stop.set()  # silent without saying goodbye: as if killed
    _wait_for_verdict(lost)
    dogs[0].stop()
    assert len(lost) == 1 and lost[0].startswith("rank 1 (") and f"pid {os.getpid()}" in lost[0], lost
    assert "rank 2" not in lost[0]


def test_watchdog_names_a_peer_that_failed_with_its_error():
    dogs, lost = _dogs(2, timeout_s=30.0)
    time.sleep(0.3)
    dogs[1].stop(failed="DataError: shard 00003.tar is truncated")
    _wait_for_verdict(lost)
    dogs[0].stop()
    assert len(lost) == 1 and lost[0].startswith("rank 1 (") and "failed: DataError: shard 00003.tar" in lost[0]
