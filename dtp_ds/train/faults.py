"""Fault-injection hooks, for tests: environment variables that make a real run meet a real
fault at a chosen moment. Unset (the default), each is a no-op.

* ``DTP_DS_FAULT_NONFINITE="STEPS[@RANKS]"``: add ``+inf`` to the loss of the optimizer
  steps STEPS (1-based, e.g. ``3,4`` or ``3-5``) on RANKS (default: all), before the
  backward pass: the real non-finite path (:mod:`dtp_ds.train.guard`) then runs.
* ``DTP_DS_FAULT_SAVE_HOLD="STEP:PHASE"``: hold the checkpoint save of step STEP, in phase
  ``write`` (every rank, before anything of it is written) or ``commit`` (rank 0, after
  every rank has written its files and before ``step_N.partial`` becomes ``step_N`` and
  ``latest`` names it), until the file ``DTP_DS_FAULT_SAVE_RELEASE`` exists (forever if
  unset: the test kills the job there). A line ``fault hook: holding ...`` is logged.
* ``DTP_DS_FAULT_SAVE_FAIL="STEP:PHASE[@RANK],..."``: make the checkpoint save of step STEP
  fail on RANK (default 0) in PHASE, one of :data:`SAVE_PHASES` (see
  :func:`dtp_ds.train.checkpoint.save`), with an ``OSError`` as a full disk would raise.
"""
from __future__ import annotations

import errno
import logging
import os
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

NONFINITE_ENV = "DTP_DS_FAULT_NONFINITE"
SAVE_HOLD_ENV = "DTP_DS_FAULT_SAVE_HOLD"
SAVE_RELEASE_ENV = "DTP_DS_FAULT_SAVE_RELEASE"
SAVE_FAIL_ENV = "DTP_DS_FAULT_SAVE_FAIL"
PHASES = ("write", "commit")
SAVE_PHASES = ("prepare", "deepspeed", "write", "verify", "commit")  # checkpoint.save's, in order


def _steps(spec: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def nonfinite_injection() -> tuple[set[int], set[int] | None]:
    """(steps, ranks or None for all) from ``DTP_DS_FAULT_NONFINITE``."""
    spec = os.environ.get(NONFINITE_ENV, "").strip()
    if not spec:
        return set(), None
    steps, _, ranks = spec.partition("@")
    try:
        return _steps(steps), (_steps(ranks) if ranks else None)
    except ValueError:
        raise ValueError(f"{NONFINITE_ENV}={spec!r}: expected STEPS[@RANKS], e.g. '3,4' or '3-5@0'") from None


def hold_save(step: int, phase: str, root: str) -> None:
    """Block here if ``DTP_DS_FAULT_SAVE_HOLD`` names this step and phase."""
    spec = os.environ.get(SAVE_HOLD_ENV, "").strip()
    if not spec:
        return
    at, _, when = spec.partition(":")
    if when not in PHASES:
        raise ValueError(f"{SAVE_HOLD_ENV}={spec!r}: expected STEP:PHASE with PHASE in {PHASES}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if int(at) != step or when != phase or (phase == "commit" and rank != 0):
        return
    release = os.environ.get(SAVE_RELEASE_ENV)
    log.warning("fault hook: holding the save of step %d (%s) on rank %d under %s until %s", step, phase, rank,
                root, release or "killed")
    while not (release and os.path.exists(release)):
        time.sleep(0.1)


def _save_failures() -> set[tuple[int, str, int]]:
    """(step, phase, rank) from ``DTP_DS_FAULT_SAVE_FAIL``."""
    spec = os.environ.get(SAVE_FAIL_ENV, "").strip()
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        at, _, rest = part.partition(":")
        phase, _, rank = rest.partition("@")
        if phase not in SAVE_PHASES or not at.isdigit() or not (rank or "0").isdigit():
            raise ValueError(f"{SAVE_FAIL_ENV}={spec!r}: expected STEP:PHASE[@RANK],... with PHASE in {SAVE_PHASES}")
        out.add((int(at), phase, int(rank or 0)))
    return out


def fail_save(step: int, phase: str) -> None:
    """Raise the ``OSError`` of a full disk if ``DTP_DS_FAULT_SAVE_FAIL`` names this step, phase and rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if (step, phase, rank) in _save_failures():
        log.warning("fault hook: failing the save of step %d (%s) on rank %d", step, phase, rank)
        raise OSError(errno.ENOSPC, f"No space left on device (injected fault, save phase {phase})")
