"""Checkpoints: DeepSpeed's engine state plus everything else a resume needs.

A checkpoint ``RUN/checkpoints/step_00000100/`` holds the engine's files (weights,
optimizer, LR scheduler, loss scale) with dtp_ds's training state (step, epoch, data
position, samples seen, model config) in its client state, and one RNG file per rank.
``RUN/checkpoints/latest`` names the newest *complete* checkpoint: it is written, atomically,
only after every rank has finished writing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of this epoch already trained (the data position)
    samples_seen: int = 0  # over all ranks
    bad_samples: int = 0  # undecodable samples skipped, over all ranks


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _tag(step: int) -> str:
    return f"step_{step:08d}"


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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := TAG_RE.match(name))]
    return sorted(found)


def latest_tag(root: str) -> str | None:
    path = os.path.join(root, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save(engine, run_dir: str, state: TrainState, client: dict[str, Any], keep: int) -> str:
    """Save on every rank (collective). Returns the tag."""
    root = checkpoint_root(run_dir)
    tag = _tag(state.step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    torch.save(_rng_state(), os.path.join(root, tag, f"rng_rank{rank:04d}.pt"))
    engine.save_checkpoint(root, tag=tag, client_state={"train_state": dataclasses.asdict(state), **client},
                           save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _write_atomic(os.path.join(root, "latest"), tag)
        for _, old in list_checkpoints(root)[:-keep]:
            if old != tag:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return tag


def resolve_resume(resume: str, run_dir: str) -> tuple[str, str] | None:
    """(checkpoint root, tag) for ``--resume latest`` or ``--resume DIR``; None when
    ``latest`` finds nothing yet (a fresh start, as open_clip's trainer does)."""
    if resume == "latest":
        root = checkpoint_root(run_dir)
        tag = latest_tag(root)
        return (root, tag) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isfile(os.path.join(path, "latest")):
        tag = latest_tag(path)
        return (path, tag) if tag else None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return os.path.dirname(path), os.path.basename(path)


def load(engine, root: str, tag: str) -> tuple[TrainState, dict[str, Any]]:
    """Load engine state (weights, optimizer, scheduler, loss scale) and this rank's RNG."""
    path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint {os.path.join(root, tag)} could not be loaded")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = os.path.join(root, tag, f"rng_rank{rank:04d}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?): continuing with fresh RNG", rank, tag)
    return TrainState(**client["train_state"]), client
