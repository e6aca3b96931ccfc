"""Checkpoints: DeepSpeed's engine state plus everything else a resume needs.

A checkpoint ``RUN/checkpoints/step_00000100/`` holds the engine's files (weights,
optimizer, LR scheduler, loss scale) with dtp_ds's training state (step, epoch, data
position, samples seen, model config) in its client state, and one RNG file per rank.

Saving is a commit in phases, so that a job killed at any moment (``kill -9``, preemption,
a full disk) never leaves a half-written checkpoint that looks complete, and a failure on one
rank ends the save on every rank with the same error (naming the rank and the phase):
``prepare`` (rank 0 makes ``step_N.partial/``), ``deepspeed`` (DeepSpeed's save, with its
files kept in memory so that nothing in it can fail half-way through its collectives),
``write`` and ``verify`` (each rank writes its files and RNG state, and reads them back), and
``commit`` (rank 0 renames ``step_N.partial`` to ``step_N`` and rewrites ``latest``
atomically). Each phase ends with an agreement of dtp_ds's own that every rank reaches whether
its part failed or not. ``latest`` is the commit point: ``--resume latest``, the export tool
and the pruning only ever see committed checkpoints. A failed save removes its ``.partial``
directory and leaves ``latest`` and the previous checkpoints as they were. Leftovers of a
killed save are removed when the run resumes.

Pruning keeps the ``keep`` newest *commits* (the ``commits`` index, oldest first), not the
highest steps: at a resume from an older checkpoint, the ones committed after it (the abandoned
continuation) stay on disk but are pruned first (:func:`abandon_newer`).

Loading verifies the checkpoint's files with ``torch.load(weights_only=True)`` (DeepSpeed's
own classes allowlisted, tensors memory-mapped), each file on one rank, before DeepSpeed's
loader, which unpickles with ``weights_only=False``, reads them. A checkpoint whose ZeRO-1/2
optimizer state is partitioned over another number of ranks is converted once to DeepSpeed's
universal checkpoint (:func:`plan_resume`); a rank with no saved RNG state gets a stream of its
own.
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
UNIVERSAL = ".universal"  # suffix of a checkpoint's DeepSpeed universal copy (resume at another world size)
COMMITS = "commits"  # the committed tags in commit order, oldest first, one a line


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the checkpoint and what
    is still intact."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (applied or skipped)
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # loader batches of this epoch already trained (the data position)
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


def commit_order(root: str) -> list[str]:
    """The committed checkpoints under ``root``, oldest commit first: those the ``commits`` index
    does not name (written before it existed, or left by a save killed while pruning) first, by
    step, then the index's. Pruning keeps the last ones: step numbers alone would keep an
    abandoned continuation's higher steps over the newer checkpoints of a resume from before them."""
    present = [t for _, t in list_checkpoints(root)]
    path = os.path.join(root, COMMITS)
    indexed: list[str] = []
    if os.path.isfile(path):
        with open(path) as f:
            indexed = list(dict.fromkeys(line.strip() for line in f if line.strip() in present))
    return [t for t in present if t not in indexed] + indexed


def abandon_newer(root: str, tag: str) -> list[str]:
    """At a resume from ``tag`` (rank 0): the checkpoints committed after it belong to the
    continuation being abandoned. They stay on disk (to be copied away if wanted) but move to the
    front of the commit order, so that pruning removes them before any checkpoint of the resumed
    run. Returns them, newest last."""
    tag = tag.removesuffix(SUPERSEDED)
    order = commit_order(root)
    if tag not in order or order[-1] == tag:
        return []
    i = order.index(tag)
    newer = order[i + 1:]
    write_atomic(os.path.join(root, COMMITS), "".join(f"{t}\n" for t in newer + order[:i + 1]))
    log.warning("resuming from %s, older than %s committed after it in %s: they belong to the continuation "
                "being abandoned and are pruned first (before this run's own checkpoints) as this run commits",
                tag, ", ".join(newer), root)
    return newer


def gather_errors(error: str | None) -> dict[int, str]:
    """Every rank's error by rank (``error`` None: none on this rank), on every rank
    (collective), so that all ranks take the same branch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {0: error} if error else {}
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    return {r: e for r, e in enumerate(gathered) if e}


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _SaveFailed(Exception):
    def __init__(self, phase: str, errors: dict[int, str]):
        super().__init__(phase)
        self.phase, self.errors = phase, errors


def _attempt(step: int, phase: str, fn) -> str | None:
    """Run this rank's part of a save phase; its error (None: none), never raised, so that the
    rank goes on to the phase's agreement like every other."""
    try:
        if phase == "commit":
            faults.fail_save(step, phase)
        fn()
        if phase not in ("deepspeed", "commit"):
            faults.fail_save(step, phase)
    except Exception as e:  # disk full, quota, I/O error: torch.save raises OSError or RuntimeError
        return _describe(e)
    return None


def _agree(phase: str, error: str | None) -> None:
    """End of a save phase, on every rank whether its part failed or not (one collective of
    dtp_ds's own, outside DeepSpeed's): raises :class:`_SaveFailed` on every rank alike."""
    errors = gather_errors(error)
    if errors:
        raise _SaveFailed(phase, errors)


class _DeferredWrites:
    """The engine's checkpoint engine while DeepSpeed saves: it keeps what DeepSpeed hands it to
    write (state dicts of references, no copies) instead of writing it. DeepSpeed's save then
    holds no I/O that can fail, and its collectives, in whatever order DeepSpeed runs them, run
    to their end on every rank; the files are written afterwards in a phase of dtp_ds's own."""

    def __init__(self, real, step: int):
        self.real, self.step = real, step
        self.dirs: list[str] = []
        self.files: list[tuple[str, Any]] = []
        self.commit_info = None
        self.error: str | None = None

    def __getattr__(self, name: str):  # is_decoupled, is_data_parallel_writer, ...: the real engine's
        return getattr(self.real, name)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.dirs.append(path)

    def save(self, state_dict, path: str) -> None:
        self.files.append((path, state_dict))
        if self.error is None:
            self.error = _attempt(self.step, "deepspeed", lambda: faults.fail_save(self.step, "deepspeed"))

    def commit(self, info) -> bool:
        self.commit_info = info
        return True

    def write(self, rng_path: str) -> list[str]:
        """The kept files and this rank's RNG state, to disk; their paths."""
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        written = []
        for path, state_dict in self.files:
            self.real.save(state_dict, path)
            written.append(path)
        torch.save(_rng_state(), rng_path)
        if self.commit_info is not None:
            self.real.commit(self.commit_info)
        return [*written, rng_path]


def _prepare(root: str, work: str) -> None:
    """Phase ``prepare`` on rank 0: an empty ``work`` directory, and DeepSpeed's recovery
    scripts in ``root`` (DeepSpeed copies them there inside its save, where a failure could not
    be agreed on; copied over files of the same size, they need no new space)."""
    shutil.rmtree(os.path.join(root, work), ignore_errors=True)
    os.makedirs(os.path.join(root, work))
    import deepspeed

    scripts = os.path.join(os.path.dirname(deepspeed.__file__), "utils")
    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        if os.path.isfile(os.path.join(scripts, name)) and not os.path.exists(os.path.join(root, name)):
            shutil.copyfile(os.path.join(scripts, name), os.path.join(root, name))


def _run_deepspeed(engine, deferred: _DeferredWrites, root: str, work: str, state: TrainState,
                   client: dict[str, Any]) -> None:
    """Phase ``deepspeed`` on this rank: DeepSpeed's save (collective), its files kept in ``deferred``."""
    real, engine.checkpoint_engine = engine.checkpoint_engine, deferred
    try:
        engine.save_checkpoint(root, tag=work, client_state={"train_state": dataclasses.asdict(state), **client},
                               save_latest=False)
    finally:
        engine.checkpoint_engine = real


def _commit(root: str, work: str, tag: str, keep: int) -> None:
    """Phase ``commit`` on rank 0: ``work`` becomes ``tag``, ``latest`` names it, the commit
    order records it, and all but the ``keep`` newest commits go."""
    final, aside = os.path.join(root, tag), os.path.join(root, tag + SUPERSEDED)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier trajectory (--resume DIR)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(os.path.join(root, work), final)
    _fsync_dir(root)
    write_atomic(os.path.join(root, "latest"), tag)
    shutil.rmtree(aside, ignore_errors=True)
    order = [t for t in commit_order(root) if t != tag] + [tag]
    gone = order[:-keep] if keep > 0 else []
    write_atomic(os.path.join(root, COMMITS), "".join(f"{t}\n" for t in order if t not in gone))
    for old in gone:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        shutil.rmtree(os.path.join(root, old + UNIVERSAL), ignore_errors=True)


def save(engine, run_dir: str, state: TrainState, client: dict[str, Any], keep: int) -> str:
    """Save on every rank (collective) and commit; returns the tag. Raises
    :class:`CheckpointError` on every rank when any rank failed, ``latest`` untouched.

    Phases, each ended by an agreement every rank reaches whether its part failed or not:
    ``prepare`` (rank 0 makes ``step_N.partial``), ``deepspeed`` (DeepSpeed's save, its files
    kept in memory), ``write`` (each rank writes its files and RNG state), ``verify`` (each rank
    reads back what it wrote), ``commit`` (rank 0)."""
    root = checkpoint_root(run_dir)
    tag = _tag(state.step)
    work = tag + PARTIAL
    rank = _rank()
    t0 = time.time()
    faults.hold_save(state.step, "write", root)
    step = state.step
    try:
        _agree("prepare", _attempt(step, "prepare", lambda: _prepare(root, work) if rank == 0 else None))
        deferred = _DeferredWrites(engine.checkpoint_engine, step)
        error = _attempt(step, "deepspeed", lambda: _run_deepspeed(engine, deferred, root, work, state, client))
        _agree("deepspeed", error or deferred.error)
        written: list[str] = []
        rng_path = os.path.join(root, work, f"rng_rank{rank:04d}.pt")
        _agree("write", _attempt(step, "write", lambda: written.extend(deferred.write(rng_path))))
        deferred.files.clear()  # references to live tensors: not kept past the save
        _agree("verify", _attempt(step, "verify", lambda: _verify_files(written)))
        faults.hold_save(step, "commit", root)
        _agree("commit", _attempt(step, "commit", lambda: _commit(root, work, tag, keep) if rank == 0 else None))
    except _SaveFailed as e:
        if rank == 0:
            shutil.rmtree(os.path.join(root, work), ignore_errors=True)
        previous = latest_tag(root) if os.path.isdir(root) else None
        detail = "; ".join(f"rank {r}: {m}" for r, m in e.errors.items())
        raise CheckpointError(f"saving checkpoint {tag} to {root} failed in phase '{e.phase}' ({detail}); "
                              f"nothing was committed: the newest complete checkpoint is still "
                              f"{previous or 'none'} ('latest'). Free space or fix the output directory, "
                              f"then --resume latest") from None
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


def _checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every ``*.pt`` file of a checkpoint directory (a universal copy's under ``zero/`` too)."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "*.pt")) + glob.glob(os.path.join(ckpt_dir, "zero", "**", "*.pt"),
                                                                      recursive=True))


def _verify_files(files: list[str]) -> None:
    """Refuse any of ``files`` that holds more than tensors, containers, primitives and
    DeepSpeed's own checkpoint classes: what the safe ``torch.load(weights_only=True)``
    accepts. Tensors are memory-mapped, not read."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for file in files:
            try:
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{file} is not a plain weights file and will not be unpickled "
                                      f"({_describe(e)[:300]}): it was not written by dtp_ds/DeepSpeed, or was "
                                      f"tampered with") from None


def verify_weights_only(ckpt_dir: str) -> None:
    """:func:`_verify_files` of every file of ``ckpt_dir``, on this process alone."""
    files = _checkpoint_files(ckpt_dir)
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint files (*.pt) in it")
    _verify_files(files)


def verify_checkpoint(*ckpt_dirs: str) -> list[str]:
    """Verify the files of ``ckpt_dirs`` (as :func:`verify_weights_only`), each file on one rank
    only (collective): rank r takes every W-th file from the r-th, so each file is opened once
    whatever the world size, and the ranks agree. Returns the files this rank verified; raises
    :class:`CheckpointError` on every rank when any file fails."""
    files = sorted(f for d in ckpt_dirs for f in _checkpoint_files(d))
    if not files:
        raise FileNotFoundError(f"{', '.join(ckpt_dirs)}: no checkpoint files (*.pt) in it")
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = files[_rank()::world]
    error = None
    try:
        _verify_files(mine)
    except CheckpointError as e:
        error = str(e)
    errors = gather_errors(error)
    if errors:
        raise CheckpointError("; ".join(errors.values()))
    return mine


def _seed_fresh_stream(seed: int, rank: int, step: int) -> None:
    """A stream of this rank's own for a rank the checkpoint holds no RNG state for, derived
    from (seed, rank, step): distinct across ranks and across resumes at different steps."""
    derived = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # every device's generator too


def load(engine, root: str, tag: str, *, seed: int = 0,
         engine_tag: str | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Load engine state (weights, optimizer, scheduler, loss scale) and this rank's RNG.
    ``engine_tag``: what DeepSpeed reads instead of ``tag`` (its universal copy, see
    :func:`plan_resume`); ``seed``: the run's ``--seed``, for a rank without a saved RNG state."""
    ckpt_dir = os.path.join(root, tag)
    engine_tag = engine_tag or tag
    rngs = sorted(glob.glob(os.path.join(ckpt_dir, "rng_rank*.pt")))
    verify_checkpoint(*dict.fromkeys([os.path.join(root, engine_tag), ckpt_dir]))
    # DeepSpeed's loader unpickles with weights_only=False (its files hold a few of its own
    # classes): it only sees files that passed the weights-only check above.
    path, client = engine.load_checkpoint(root, tag=engine_tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} could not be loaded")
    known = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in client["train_state"].items() if k in known})
    rng_path = os.path.join(ckpt_dir, f"rng_rank{_rank():04d}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        _seed_fresh_stream(seed, _rank(), state.step)
        log.warning("rank %d: %s holds RNG states of %d rank(s), none for this one: seeded a stream of its own "
                    "from (--seed %d, rank %d, step %d)", _rank(), tag, len(rngs), seed, _rank(), state.step)
    return state, client


@dataclass
class ResumePlan:
    """How to resume from a committed checkpoint ``root/tag``, from :func:`plan_resume`."""
    root: str
    tag: str  # the committed checkpoint: train state, RNG files
    engine_tag: str  # what DeepSpeed loads: ``tag``, or its universal copy ``tag.universal``
    saved_world: int  # ranks whose ZeRO optimizer partitions it holds (0: not partitioned)
    ds_config_patch: dict[str, Any] = field(default_factory=dict)  # merged into the ds_config before initialize

    def apply(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """``ds_config`` with the patch merged in (one level deep)."""
        out = dict(ds_config)
        for key, value in self.ds_config_patch.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out


def _saved_partitions(ckpt_dir: str) -> tuple[int, bool]:
    """(ranks whose ZeRO optimizer partitions ``ckpt_dir`` holds, whether it is a ZeRO-3 one)."""
    optim = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_optim_states.pt"))
    zero3 = bool(glob.glob(os.path.join(ckpt_dir, "zero_pp_rank_*_model_states.pt")))
    return len(optim), zero3


def _convert_to_universal(root: str, tag: str, out_tag: str) -> None:
    """DeepSpeed's universal checkpoint of ``root/tag`` at ``root/out_tag`` (rank 0), all
    or nothing: built in ``out_tag.partial/`` (which also takes the ``latest_universal``
    file the converter writes next to its output), then renamed into place. ``tag`` itself is
    only read, after its files passed the weights-only check (the converter unpickles fully)."""
    from argparse import Namespace
    from contextlib import redirect_stdout
    from io import StringIO

    from deepspeed.checkpoint import ds_to_universal

    verify_weights_only(os.path.join(root, tag))
    staging = os.path.join(root, out_tag + PARTIAL)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    out = StringIO()
    with redirect_stdout(out):  # the converter prints its progress
        ds_to_universal.main(Namespace(input_folder=os.path.join(root, tag), output_folder=os.path.join(staging, tag),
                                       num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                       strict=True, inject_missing_state=True))
    log.debug("ds_to_universal: %s", out.getvalue())
    os.rename(os.path.join(staging, tag), os.path.join(root, out_tag))
    _fsync_dir(root)
    shutil.rmtree(staging, ignore_errors=True)


def plan_resume(found: tuple[str, str], world: int, ds_config: dict[str, Any]) -> ResumePlan:
    """Before ``deepspeed.initialize`` (collective): how to load ``found`` = (root, tag) with
    ``world`` ranks. A checkpoint whose ZeRO-1/2 optimizer state is partitioned over another
    number of ranks is converted (once, on rank 0, into ``tag.universal`` beside it; ``tag`` is
    left as it is) to DeepSpeed's universal checkpoint, which loads at any world size: the plan's
    ``ds_config_patch`` (``{"checkpoint": {"load_universal": true}}``) then goes into the
    ds_config and its ``engine_tag`` to :func:`load`."""
    root, tag = found
    saved, zero3 = _saved_partitions(os.path.join(root, tag))
    if saved in (0, world):
        return ResumePlan(root, tag, tag, saved)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if zero3 or stage == 3:
        raise CheckpointError(f"{os.path.join(root, tag)} holds the ZeRO optimizer partitions of {saved} ranks; "
                              f"this run has {world}. Resuming at another world size goes through DeepSpeed's "
                              f"universal checkpoint, used here for ZeRO stages 1 and 2 only: resume with {saved} "
                              f"ranks, or save and resume under ZeRO-1/2")
    engine_tag = tag.removesuffix(SUPERSEDED) + UNIVERSAL
    error = None
    if _rank() == 0 and not os.path.isdir(os.path.join(root, engine_tag)):
        try:
            _convert_to_universal(root, tag, engine_tag)
        except Exception as e:
            error = _describe(e)
    errors = gather_errors(error)
    if errors:
        raise CheckpointError(f"converting {os.path.join(root, tag)} (ZeRO partitions of {saved} ranks) to DeepSpeed's "
                              f"universal checkpoint for {world} ranks failed ({errors[0]}); the checkpoint itself is "
                              f"unchanged: resume with {saved} ranks")
    log.warning("resuming %s, saved by %d ranks, with %d: through DeepSpeed's universal checkpoint %s (the "
                "optimizer state re-partitioned over the new ranks)",
                tag, saved, world, engine_tag)
    return ResumePlan(root, tag, engine_tag, saved, {"checkpoint": {"load_universal": True}})
