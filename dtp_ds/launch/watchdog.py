"""A peer watchdog: every rank beats a counter in the rendezvous store; a rank whose counter
stops for ``timeout_s`` is named and the others exit, so a dead or hung rank never leaves them
waiting on a collective for its full timeout. A rank that fails with an exception of its own
publishes it, and its peers name it with that message (after a grace of two beats, in which
they may meet the same error themselves).

    start_watchdog(timeout_s=120)           # after torch.distributed is initialised
    try:
        ...                                 # training
    except Exception as e:
        report_failure(e)                   # names a lost peer, or publishes this rank's failure
        raise
    finally:
        stop_watchdog()                     # before destroy_process_group

Works with any store-backed init (the deepspeed launcher, torchrun, srun/mpirun with
``dtp_ds.launch.discovery``). Counters, not clocks: hosts' clocks need not agree. The store
lives in rank 0; when it stops answering, rank 0 is the one named.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_PEER_LOST = 43
DONE = 1 << 40  # added to its counter by a rank that stops cleanly
FAILED = 1 << 42  # added by a rank that stops on an error (the reason is under failed/RANK)
PREFIX = "dtp_ds/watchdog"


def _default_store() -> Any:
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    try:  # a connection of our own beside the process group's
        return store.clone()
    except (AttributeError, RuntimeError, NotImplementedError):
        return store


class PeerWatchdog:
    """Heartbeats through ``store``; calls ``on_lost(message)`` once when a peer stops.

    Two daemon threads: one beats and reads the peers' counters (a store call can block for
    good when rank 0 hangs: TCPStore's ``add`` has no timeout), the other judges from what the
    first one last saw, so a stuck store call is itself a verdict on rank 0.

    Every age is measured on ``clock`` (seconds, monotonic) and :meth:`explain` polls with
    ``sleep``: tests inject a fake clock and, with ``start(threads=False)``, drive
    :meth:`beat_once` and :meth:`judge_once` themselves, one beat at a time."""

    def __init__(self, store: Any, rank: int, world: int, timeout_s: float, interval_s: float | None = None,
                 on_lost: Callable[[str], None] | None = None, prefix: str = PREFIX,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.clock, self.sleep = clock, sleep
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or min(5.0, max(0.5, self.timeout_s / 20))
        self.on_lost = on_lost or self._exit
        self.prefix = prefix
        self.fired = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[int, float]] = {}
        self._failed: dict[int, tuple[str, float]] = {}
        self._info_cache: dict[int, dict[str, Any]] = {}
        self._last_ok = clock()
        self._last_error = ""
        self._beater = threading.Thread(target=self._beat_loop, name="dtp_ds-watchdog-beat", daemon=True)
        self._judge = threading.Thread(target=self._judge_loop, name="dtp_ds-watchdog-judge", daemon=True)

    def _key(self, what: str, rank: int) -> str:
        return f"{self.prefix}/{what}/{rank}"

    def describe(self, rank: int) -> str:
        """``rank R (host H, pid P)`` as published by that rank when it started."""
        info = self._info_cache.get(rank)
        if not info:
            return f"rank {rank}"
        return f"rank {rank} ({info.get('host', '?')}, pid {info.get('pid', '?')})"

    def start(self, threads: bool = True) -> PeerWatchdog:
        """Publish this rank's host and pid, then beat and judge in daemon threads
        (``threads=False``: the caller calls :meth:`beat_once` and :meth:`judge_once`)."""
        now = self.clock()
        self._seen = {r: (-1, now) for r in range(self.world) if r != self.rank}
        self.store.set(self._key("info", self.rank), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        self._last_ok = now
        if threads:
            self._beater.start()
            self._judge.start()
        return self

    def stop(self, failed: str | None = None) -> None:
        """Stop watching (call before the process group goes away). Peers stop watching this
        rank too; with ``failed`` (this rank's error) they name it with that message."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            if failed:
                self.store.set(self._key("failed", self.rank), failed[:500])
            self.store.add(self._key("beat", self.rank), FAILED if failed else DONE)
        except Exception:  # shutting down anyway
            pass

    def _read_info(self, rank: int) -> None:
        if rank not in self._info_cache and self.store.check([self._key("info", rank)]):
            self._info_cache[rank] = json.loads(self.store.get(self._key("info", rank)).decode())

    def _beat(self) -> None:
        """One beat and one read of every peer's counter, O(1) store round trips once every
        peer has started (may block for good if the store hangs: the judge handles that)."""
        self.store.add(self._key("beat", self.rank), 1)
        peers = list(self._seen)
        keys = [self._key("beat", r) for r in peers]
        if keys and self.store.check(keys):
            counts = [int(v) for v in self.store.multi_get(keys)]
        else:
            counts = [self.store.add(k, 0) for k in keys]
        now = self.clock()
        failed = {r: self.store.get(self._key("failed", r)).decode(errors="replace")
                  for r, c in zip(peers, counts) if c >= FAILED}
        with self._lock:
            for r, count in zip(peers, counts):
                if count >= DONE:
                    self._seen.pop(r, None)
                    if r in failed:
                        self._failed[r] = (failed[r], now)
                elif r in self._seen and count != self._seen[r][0]:
                    self._seen[r] = (count, now)
        for r in peers:
            if r not in self._info_cache:
                self._read_info(r)
        self._last_ok = now

    def beat_once(self) -> None:
        """What the beat thread does every ``interval_s``: a beat and a read of the peers'
        counters; a store failure is kept for the verdict."""
        try:
            self._beat()
        except Exception as e:  # any store failure means the same thing
            first = str(e).splitlines()[0] if str(e) else ""
            self._last_error = f"{type(e).__name__}: {first}"

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            self.beat_once()
            self._stop.wait(self.interval_s)

    def stalled(self) -> list[tuple[int, float]]:
        """(rank, seconds since its counter last moved) for every watched peer, slowest first."""
        now = self.clock()
        with self._lock:
            items = list(self._seen.items())
        return sorted(((r, now - t) for r, (_, t) in items), key=lambda x: -x[1])

    def verdict(self, limit_s: float | None = None) -> str | None:
        """The ranks silent for ``limit_s`` (default: the timeout), or None."""
        limit = self.timeout_s if limit_s is None else limit_s
        silent = self.clock() - self._last_ok
        lost = [(r, age) for r, age in self.stalled() if age >= limit]
        # Rank 0's counter can stop up to one beat before its store stops answering: when rank 0
        # is the lost one and the store is silent too, the store is what hangs.
        store_down = silent >= limit or (silent >= min(limit, 2 * self.interval_s) and any(r == 0 for r, _ in lost))
        if self.rank != 0 and store_down:
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            why = self._last_error or "no answer"
            return (f"rank 0 stopped: the rendezvous store it hosts ({addr}) has not answered for {silent:.0f} s "
                    f"({why}): it died or hangs")
        now = self.clock()
        with self._lock:
            failed = [(r, why) for r, (why, t) in self._failed.items() if now - t >= min(limit, 2 * self.interval_s)]
        if failed:
            return ", ".join(f"{self.describe(r)} failed: {why}" for r, why in failed)
        if lost:
            return ", ".join(f"{self.describe(r)} silent for {age:.0f} s" for r, age in lost) + ": it died or hangs"
        return None

    def judge_once(self) -> bool:
        """What the judge thread does every ``interval_s``: on a verdict, call ``on_lost`` (once)
        and return True."""
        msg = self.verdict()
        if msg and not self._stop.is_set() and not self.fired:
            self.fired = True
            self.on_lost(f"{msg} (peer timeout {self.timeout_s:.0f} s)")
            return True
        return False

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.judge_once():
                return

    def explain(self, wait_s: float | None = None) -> str | None:
        """After a collective failed: wait (at most ``wait_s``, default 2.5 beats) until some
        peer has been silent for two beats, print which and return the message; None when every
        peer still beats (the failure was not a lost rank)."""
        if self.fired or self._stop.is_set():
            return None
        deadline = self.clock() + (2.5 * self.interval_s + 0.5 if wait_s is None else wait_s)
        while self.clock() < deadline:
            msg = self.verdict(limit_s=2 * self.interval_s)
            if msg and not self._stop.is_set():
                self._report(msg)
                return msg
            self.sleep(self.interval_s / 2)
        return None

    def _report(self, msg: str) -> None:
        print(f"dtp_ds: error: rank {self.rank}: {msg}. Stopping this rank.", file=sys.stderr, flush=True)

    def _exit(self, msg: str) -> None:
        self._report(msg)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)


_ACTIVE: PeerWatchdog | None = None


def start_watchdog(timeout_s: float, interval_s: float | None = None, store: Any = None,
                   on_lost: Callable[[str], None] | None = None) -> PeerWatchdog | None:
    """Start this rank's watchdog (None for a single rank or ``timeout_s <= 0``); it is also
    kept for ``report_failure`` and ``stop_watchdog``."""
    global _ACTIVE
    import torch.distributed as dist

    world = dist.get_world_size()
    if world < 2 or timeout_s <= 0:
        return None
    _ACTIVE = PeerWatchdog(store or _default_store(), dist.get_rank(), world, timeout_s, interval_s, on_lost).start()
    return _ACTIVE


def _is_comm_error(exc: BaseException) -> bool:
    """An error of a collective or of the store (what a lost peer causes), not this rank's own."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc)
    return any(s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer",
                                   "Broken pipe", "timed out", "Timed out"))


def report_failure(exc: BaseException) -> str | None:
    """In an ``except`` around training. A failed collective: wait briefly for the peer that
    caused it and name it (returns the message). Any other error is this rank's own: publish it,
    so that peers name this rank with it."""
    if _ACTIVE is None:
        return None
    if _is_comm_error(exc):
        msg = _ACTIVE.explain()
        if msg:
            return msg
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    _ACTIVE.stop(failed=f"{type(exc).__name__}: {first}"[:500])
    return None


def stop_watchdog() -> None:
    """Stop the watchdog started by ``start_watchdog`` (a clean stop unless ``report_failure``
    already published an error)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None
