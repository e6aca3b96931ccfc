"""Checkpoints: DeepSpeed's engine state plus everything else a resume needs.

A checkpoint ``RUN/checkpoints/step_00000100/`` holds the engine's files (weights,
optimizer, LR scheduler, loss scale) with dtp_ds's training state (step, epoch, data
position, samples seen, model config) in its client state, and one RNG file per rank.

Saving is a two-phase commit, so that a job killed at any moment (``kill -9``, preemption,
a full disk) never leaves a half-written checkpoint that looks complete:

1. every rank writes into ``step_N.partial/``; the ranks then agree (one small collective)
   that all of them succeeded;
2. rank 0 renames ``step_N.partial`` to ``step_N`` and rewrites ``latest`` atomically
   (write, fsync, rename). ``latest`` is the commit point: ``--resume latest``, the export
   tool and the pruning of old checkpoints only ever see committed checkpoints.

A save that fails on any rank (disk full, quota, I/O error) removes its ``.partial``
directory, leaves ``latest`` and the previous checkpoints untouched and raises
:class:`CheckpointError` on every rank. Leftovers of a killed save are removed when the run
resumes.

Loading verifies every file of the checkpoint with ``torch.load(weights_only=True)``
(DeepSpeed's own classes allowlisted, tensors memory-mapped, so it is cheap) before
DeepSpeed's loader, which unpickles with ``weights_only=False``, reads it.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtp_ds.train import faults

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d+)$")
PARTIAL = ".partial"  # suffix of a checkpoint directory being written
SUPERSEDED = ".superseded"  # suffix of an old directory of the same step, moved aside at commit


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the checkpoint and what
    is still intact."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (applied or skipped)
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of this epoch already trained (the data position)
    samples_seen: int = 0  # over all ranks
    bad_samples: int = 0  # samples skipped or lost (undecodable, incomplete, in broken shards), over all ranks
    bad_by_kind: dict[str, int] = field(default_factory=dict)  # dtp_ds.data.shards.BAD_KINDS -> count
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (dtp_ds.train.guard)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """``text`` at ``path``, all or nothing: a temporary file, fsynced, renamed over it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of the committed checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root)
             if (m := TAG_RE.match(name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


def latest_tag(root: str) -> str | None:
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def gather_errors(error: str | None) -> dict[int, str]:
    """Every rank's error by rank (``error`` None: none on this rank), on every rank
    (collective), so that all ranks take the same branch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {0: error} if error else {}
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return {r: e for r, e in enumerate(gathered) if e}


def _all_errors(error: str | None) -> list[str]:
    """Every rank's error, named by rank when there are several ranks (collective)."""
    errors = gather_errors(error)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(errors.values())
    return [f"rank {r}: {e}" for r, e in errors.items()]


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _write_rng(root: str, work: str) -> None:
    """Phase 1a on this rank: its RNG state into ``root/work``."""
    torch.save(_rng_state(), os.path.join(root, work, f"rng_rank{_rank():04d}.pt"))


def _write_engine(engine, root: str, work: str, state: TrainState, client: dict[str, Any]) -> None:
    """Phase 1b on this rank: the engine's files into ``root/work`` (collective)."""
    engine.save_checkpoint(root, tag=work, client_state={"train_state": dataclasses.asdict(state), **client},
                           save_latest=False)


def _commit(root: str, work: str, tag: str, keep: int) -> None:
    """Phase 2 on rank 0: ``work`` becomes ``tag``, ``latest`` names it, old ones go."""
    final, aside = os.path.join(root, tag), os.path.join(root, tag + SUPERSEDED)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier trajectory (--resume DIR)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(os.path.join(root, work), final)
    _fsync_dir(root)
    write_atomic(os.path.join(root, "latest"), tag)
    shutil.rmtree(aside, ignore_errors=True)
    for _, old in list_checkpoints(root)[:-keep]:
        if old != tag:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def save(engine, run_dir: str, state: TrainState, client: dict[str, Any], keep: int) -> str:
    """Save on every rank (collective) and commit; returns the tag. Raises
    :class:`CheckpointError` on every rank when any rank failed, ``latest`` untouched."""
    root = checkpoint_root(run_dir)
    tag = _tag(state.step)
    work = tag + PARTIAL
    rank = _rank()
    multi = dist.is_initialized() and dist.get_world_size() > 1
    t0 = time.time()
    faults.hold_save(state.step, "write", root)
    error = None
    if rank == 0:
        try:
            shutil.rmtree(os.path.join(root, work), ignore_errors=True)
            os.makedirs(os.path.join(root, work))
        except OSError as e:
            error = _describe(e)
    errors = _all_errors(error)  # also the barrier before the other ranks write into it
    if not errors:
        try:
            _write_rng(root, work)
        except Exception as e:  # disk full: torch.save raises OSError or RuntimeError
            error = _describe(e)
        # agreed before DeepSpeed's save, whose collectives a rank that failed here would miss
        errors = _all_errors(error)
    if not errors:
        try:
            _write_engine(engine, root, work, state, client)
        except Exception as e:  # disk full, quota, I/O error: nothing is committed
            error = _describe(e)
            if multi:
                dist.barrier()  # the one DeepSpeed's save ends with, which this rank did not reach
        errors = _all_errors(error)
    if not errors:
        faults.hold_save(state.step, "commit", root)
        if rank == 0:
            try:
                _commit(root, work, tag, keep)
            except OSError as e:
                error = _describe(e)
        errors = _all_errors(error)
    if errors:
        if rank == 0:
            shutil.rmtree(os.path.join(root, work), ignore_errors=True)
        previous = latest_tag(root) if os.path.isdir(root) else None
        raise CheckpointError(f"saving checkpoint {tag} to {root} failed ({'; '.join(errors)}); "
                              f"nothing was committed: the newest complete checkpoint is still "
                              f"{previous or 'none'} ('latest'). Free space or fix the output directory, "
                              f"then --resume latest")
    log.debug("checkpoint %s written in %.1fs", tag, time.time() - t0)
    return tag


def committed_dir(root: str, tag: str) -> str:
    """The directory ``latest``'s ``tag`` names: ``tag`` itself, or, when a save of the same
    step was killed between moving the old one aside and renaming the new one into place,
    the old one (``tag.superseded``, complete; the new ``.partial`` may not be)."""
    if not os.path.isdir(os.path.join(root, tag)) and os.path.isdir(os.path.join(root, tag + SUPERSEDED)):
        return tag + SUPERSEDED
    return tag


def discard_incomplete(root: str) -> list[str]:
    """Remove what killed saves left under ``root`` (``*.partial``, ``*.superseded``,
    temporary ``latest`` files); returns their names. A ``.superseded`` directory that
    ``latest`` still stands for (see :func:`committed_dir`) is renamed back instead. Rank 0,
    after every rank has loaded its checkpoint, before training resumes."""
    if not os.path.isdir(root):
        return []
    gone = []
    tag = latest_tag(root)
    if tag and committed_dir(root, tag) != tag:
        os.rename(os.path.join(root, tag + SUPERSEDED), os.path.join(root, tag))
        _fsync_dir(root)
        log.warning("restored %s from %s (a save of the same step was interrupted)", tag, tag + SUPERSEDED)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith((PARTIAL, SUPERSEDED)) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(name)
        elif name.startswith("latest.tmp."):
            os.unlink(path)
            gone.append(name)
    if gone:
        log.warning("removed what an interrupted checkpoint save left behind in %s: %s", root, ", ".join(gone))
    return gone


def resolve_resume(resume: str, run_dir: str) -> tuple[str, str] | None:
    """(checkpoint root, tag) for ``--resume latest`` or ``--resume DIR``; None when
    ``latest`` finds nothing yet (a fresh start, as open_clip's trainer does)."""
    if resume == "latest":
        root = checkpoint_root(run_dir)
        tag = latest_tag(root)
        return (root, committed_dir(root, tag)) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isfile(os.path.join(path, "latest")):
        tag = latest_tag(path)
        return (path, committed_dir(path, tag)) if tag else None
    if path.endswith((PARTIAL, SUPERSEDED)):
        raise FileNotFoundError(f"--resume {resume}: an incomplete checkpoint (its save never finished); "
                                f"use --resume latest or a step_N directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return os.path.dirname(path), os.path.basename(path)


# DeepSpeed's own classes inside its checkpoint files (loss scalers, the ZeRO stage enum,
# ZeRO-1/2 fragment addresses): allowed by the weights-only check, nothing else is.
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_weights_only(ckpt_dir: str) -> None:
    """Refuse a checkpoint directory any of whose ``*.pt`` files holds more than tensors,
    containers, primitives and DeepSpeed's own checkpoint classes: what the safe
    ``torch.load(weights_only=True)`` accepts. Tensors are memory-mapped, not read."""
    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.pt")))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint files (*.pt) in it")
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for file in files:
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{file} is not a plain weights file and will not be unpickled "
                                      f"({_describe(e)[:300]}): it was not written by dtp_ds/DeepSpeed, or was "
                                      f"tampered with") from None


def load(engine, root: str, tag: str) -> tuple[TrainState, dict[str, Any]]:
    """Load engine state (weights, optimizer, scheduler, loss scale) and this rank's RNG."""
    ckpt_dir = os.path.join(root, tag)
    verify_weights_only(ckpt_dir)
    # DeepSpeed's loader unpickles with weights_only=False (its files hold a few of its own
    # classes): it only sees files that passed the weights-only check above.
    path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} could not be loaded")
    rng_path = os.path.join(ckpt_dir, f"rng_rank{_rank():04d}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?): continuing with fresh RNG", _rank(), tag)
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in client["train_state"].items() if k in known}), client
