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
"""
from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

NONFINITE_ENV = "DTP_DS_FAULT_NONFINITE"
SAVE_HOLD_ENV = "DTP_DS_FAULT_SAVE_HOLD"
SAVE_RELEASE_ENV = "DTP_DS_FAULT_SAVE_RELEASE"
PHASES = ("write", "commit")


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
