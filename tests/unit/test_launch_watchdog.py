"""The peer watchdog. With two real gloo ranks: a rank that hangs (SIGSTOP, which no collective
notices before its own timeout) or dies (SIGKILL) is named by the survivor, which stops long
before the collective's timeout. With a fake store and a fake clock, beat by beat: when exactly a
silent peer, a failed peer or a hung store is named, and that a peer which stopped cleanly is not."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dtp_ds.cluster.ports import free_port
from dtp_ds.launch.watchdog import EXIT_PEER_LOST, PeerWatchdog
from tests.conftest import REPO

TIMEOUT_S = 5.0
COLLECTIVE_TIMEOUT_S = 300
WORKER = f"""
import importlib.util, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
# the module alone: ``import dtp_ds`` would also load open_clip and the models (seconds per rank)
spec = importlib.util.spec_from_file_location("watchdog", {str(REPO / "dtp_ds" / "launch" / "watchdog.py")!r})
wd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wd)
start_watchdog, report_failure = wd.start_watchdog, wd.report_failure
dist.init_process_group("gloo", timeout=timedelta(seconds={COLLECTIVE_TIMEOUT_S}))  # far beyond the watchdog's
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
    """What decides is the survivor's exit code and message, not how long it took: the wait is
    generous (a loaded machine may be slow) yet well short of the collective's own timeout, the
    only other way a hang could end."""
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
        procs[victim].send_signal(sig)
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=COLLECTIVE_TIMEOUT_S / 2)
        out = survivor.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert rc != 0, (rc, out[-2000:])
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


class FakeClock:
    """A monotonic clock that moves only when told; ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Ranks:
    """``world`` watchdogs on one fake store and one fake clock, beating every second, driven by
    hand (no threads); the verdicts land in ``lost``."""

    def __init__(self, world: int, timeout_s: float, store: FakeStore | None = None) -> None:
        self.store, self.clock, self.lost = store or FakeStore(), FakeClock(), []
        self.dogs = [PeerWatchdog(self.store, r, world, timeout_s=timeout_s, interval_s=1.0, on_lost=self.lost.append,
                                  clock=self.clock, sleep=self.clock.sleep).start(threads=False)
                     for r in range(world)]

    def tick(self, beating: list[int], judging: list[int] | None = None) -> None:
        """One second: the ranks in ``beating`` beat (and read their peers' counters), then the
        ranks in ``judging`` (default: the same) judge."""
        self.clock.sleep(1.0)
        for r in beating:
            self.dogs[r].beat_once()
        for r in beating if judging is None else judging:
            self.dogs[r].judge_once()


def test_watchdog_names_a_silent_peer_at_its_timeout_and_not_before():
    """Three ranks: rank 2 stops cleanly (never reported, however long), rank 1 goes silent
    (named by rank 0 once its counter has not moved for the 10 s timeout, not a beat earlier)."""
    ranks = Ranks(3, timeout_s=10.0)
    for _ in range(3):
        ranks.tick([0, 1, 2])
    ranks.dogs[2].stop()
    for _ in range(20):
        ranks.tick([0, 1])
    assert ranks.lost == [] and all(d.verdict() is None for d in ranks.dogs[:2])
    ranks.tick([0])  # from now on rank 1 is silent without saying goodbye (as if killed); rank 0
    for _ in range(9):  # has just read its last beat
        ranks.tick([0])
    assert ranks.lost == [] and ranks.dogs[0].stalled() == [(1, 9.0)]
    ranks.tick([0])
    assert len(ranks.lost) == 1, ranks.lost
    assert ranks.lost[0] == (f"rank 1 ({socket.gethostname()}, pid {os.getpid()}) silent for 10 s: it died or hangs "
                             f"(peer timeout 10 s)")
    for _ in range(5):
        ranks.tick([0])
    assert len(ranks.lost) == 1  # named once


def test_watchdog_names_a_peer_that_failed_with_its_error_after_two_beats():
    ranks = Ranks(2, timeout_s=30.0)
    for _ in range(2):
        ranks.tick([0, 1])
    ranks.dogs[1].stop(failed="DataError: shard 00003.tar is truncated")
    ranks.tick([0])  # rank 0 reads the failure
    ranks.tick([0])
    assert ranks.lost == []  # a grace of two beats, to meet the same error itself
    ranks.tick([0])
    assert len(ranks.lost) == 1 and ranks.lost[0].startswith("rank 1 (")
    assert "failed: DataError: shard 00003.tar is truncated" in ranks.lost[0]  # long before the 30 s timeout


class DownStore(FakeStore):
    """A store whose host went away: every call fails."""

    down = False

    def add(self, key: str, n: int) -> int:
        if self.down:
            raise ConnectionResetError("Connection reset by peer")
        return super().add(key, n)


def test_watchdog_names_rank_0_when_its_store_stops_answering():
    ranks = Ranks(2, timeout_s=10.0, store=DownStore())
    for _ in range(2):
        ranks.tick([0, 1])
    ranks.store.down = True  # rank 0 (the store's host) is gone; rank 1's beats fail
    for _ in range(9):
        ranks.tick([1])
    assert ranks.lost == []
    ranks.tick([1])
    assert len(ranks.lost) == 1 and ranks.lost[0].startswith("rank 0 stopped: the rendezvous store it hosts")
    assert "not answered for 10 s (ConnectionResetError: Connection reset by peer)" in ranks.lost[0]


def test_explain_waits_two_beats_for_the_peer_that_broke_a_collective(capsys):
    ranks = Ranks(2, timeout_s=60.0)
    for _ in range(2):
        ranks.tick([0, 1])
    start = ranks.clock()
    msg = ranks.dogs[0].explain()  # a collective failed: rank 1 died, nobody beats any more
    assert msg is not None and msg.startswith("rank 1 (") and "silent for 2 s" in msg
    assert ranks.clock() - start == 2.0  # polled every half beat until rank 1 was two beats silent
    assert f"dtp_ds: error: rank 0: {msg}" in capsys.readouterr().err
    # a failure that was not a lost peer: every peer keeps beating, explain gives up at its deadline
    ranks = Ranks(2, timeout_s=60.0)
    dog = ranks.dogs[0]
    dog.sleep = lambda s: (ranks.clock.sleep(s), ranks.dogs[0].beat_once(), ranks.dogs[1].beat_once())
    start = ranks.clock()
    assert dog.explain(wait_s=5.0) is None and 5.0 <= ranks.clock() - start < 5.0 + dog.interval_s
