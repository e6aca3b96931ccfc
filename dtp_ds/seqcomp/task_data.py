"""What a task's runs in ``make demo-seqcomp`` and ``tools/bench_seqcomp`` read from the
synthetic data (``tools/make_synthetic_shards --out DATA``): its training shards and its
evaluation flags, chosen by the settings the task has (its ``Config``'s fields), not its name:

- zero-shot (``zeroshot_data``, CLIP): ``DATA/train`` (captioned shards), ``--zeroshot-data
  DATA/zeroshot`` (and ``--zeroshot-extra DATA/layout`` where it exists), as
  :func:`dtp_ds.train.runs.launch_command` gives them;
- kNN (``knn_bank``, the SSL tasks): ``DATA/classify/train`` (class-labelled shards; labels unused
  in training), ``--val-data DATA/classify/val --knn-bank`` the training shards (``--knn-bank-max-images``);
- classification (``val_data``): ``DATA/classify/train``, ``--val-data DATA/classify/val``.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass

# flags of launch_command's CLIP data that a task's own replace (each takes one value)
LAUNCH_DATA_FLAGS = ("--train-data", "--zeroshot-data", "--zeroshot-extra")


@dataclass
class TaskData:
    """A task's training shards and evaluation flags in a synthetic data directory."""

    task: str
    train_dir: str
    eval_flags: list[str]

    def shards(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.train_dir, "*.tar")))

    def train_pattern(self, part: slice = slice(None)) -> str:
        """The brace pattern of the training shards (``part``: of those, in name order)."""
        shards = self.shards()[part]
        if not shards:
            raise SystemExit(f"--task {self.task}: no training shards in {self.train_dir}: make them with "
                             f"tools/make_synthetic_shards")
        first, last = (os.path.basename(s)[: -len(".tar")] for s in (shards[0], shards[-1]))
        return os.path.join(self.train_dir, f"{{{first}..{last}}}.tar")

    def flags(self, part: slice = slice(None)) -> list[str]:
        """``--task``, ``--train-data`` (``part`` of the shards) and the evaluation flags."""
        return ["--task", self.task, "--train-data", self.train_pattern(part), *self.eval_flags]


def task_data(task: str, data: str, knn_bank_max_images: int | None = None) -> TaskData:
    """The task's :class:`TaskData` in ``data`` (module doc); ``ValueError`` for a task whose
    settings name none of the evaluations this knows."""
    from dtp_ds.tasks import task_type

    fields = {f.name for f in dataclasses.fields(task_type(task).Config)}
    if "zeroshot_data" in fields:
        layout = os.path.join(data, "layout")
        return TaskData(task, os.path.join(data, "train"), [
            "--zeroshot-data", os.path.join(data, "zeroshot"),
            *(["--zeroshot-extra", layout] if os.path.isdir(layout) else [])])
    classify = os.path.join(data, "classify")
    val = ["--val-data", os.path.join(classify, "val")]
    if "knn_bank" in fields:
        out = TaskData(task, os.path.join(classify, "train"), val)
        bank = out.train_pattern() if out.shards() else os.path.join(classify, "train")
        out.eval_flags += ["--knn-bank", bank, *(["--knn-bank-max-images", str(knn_bank_max_images)]
                                                 if knn_bank_max_images else [])]
        return out
    if "val_data" in fields:
        return TaskData(task, os.path.join(classify, "train"), val)
    raise ValueError(f"--task {task}: its settings have none of zeroshot_data, knn_bank, val_data: no evaluation "
                     f"on {data} to time the arms to")


def with_data_flags(cmd: list[str], flags: list[str]) -> list[str]:
    """A :func:`dtp_ds.train.runs.launch_command` with its CLIP data flags replaced by ``flags``
    (:meth:`TaskData.flags`), put where its ``--train-data`` was."""
    out, i, at = [], 0, None
    while i < len(cmd):
        if cmd[i] in LAUNCH_DATA_FLAGS and i + 1 < len(cmd):
            at = len(out) if at is None else at
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    at = len(out) if at is None else at
    return out[:at] + list(flags) + out[at:]
