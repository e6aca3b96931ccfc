"""Tasks: what is trained. A task builds its model, its loss, its data stage (what a sample
becomes) and its evaluation; its :attr:`Task.module` takes a dict batch and returns a dict with
``"loss"`` (the engine wraps that module). ``--task NAME`` picks one from :data:`TASKS`.

Tasks sit between models/data/eval and train: they import no ``dtp_ds.train`` module, so
everything they need from the run comes in a :class:`TaskSpec`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

TASKS: dict[str, Callable[[TaskSpec], Task]] = {}


@dataclass
class TaskSpec:
    """What a task is built from (the run's settings that concern it)."""

    model: str
    rank: int = 0
    world: int = 1
    input_dtype: torch.dtype = torch.float32
    aux_loss_weight: float = 1.0  # each reducer auxiliary loss (DRIP's boundary loss) enters with this weight
    options: dict[str, Any] = field(default_factory=dict)  # task-specific (CLIP: local_loss, gather_with_grad)


class DataStage(Protocol):
    """What one sample of the shards becomes: ``keys`` are the sample's fields besides the image
    (a sample without one is counted as bad data), ``__call__`` turns the decoded RGB image and
    the raw sample into the tensors of :attr:`Task.batch_keys`, in that order."""

    keys: tuple[str, ...]

    def __call__(self, image: Any, sample: dict[str, bytes]) -> tuple[torch.Tensor, ...]: ...


class SplitLoss(Protocol):
    """A task module whose loss couples the samples of a batch (CLIP's contrastive loss: every
    sample is the others' negative), split in two so that GradCache (``--accum-freq``,
    :mod:`dtp_ds.train.gradcache`) can train a batch larger than memory exactly.

    ``forward(batch, encode=True)`` returns a dict: ``"batched"``, the ``(B, ...)`` tensors the
    coupled loss compares across the batch (concatenated over chunks); ``"shared"``, tensors
    every chunk gives alike (CLIP's logit scale); optionally ``"own_loss"``, the batch's own
    loss terms as a mean over its samples (a whole batch's is the mean over equal chunks);
    every other entry a detached row statistic. ``forward(batch)`` is ``coupled_loss`` of the
    batch's own encoding plus its ``own_loss``."""

    def __call__(self, batch: dict[str, torch.Tensor], encode: bool = False) -> dict[str, Any]: ...

    def coupled_loss(self, batched: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """``{"loss": ..., row entries}`` over the features of a whole batch."""
        ...


class Task(Protocol):
    name: str
    model: nn.Module  # the trained model itself (exported, evaluated)
    module: nn.Module  # model + loss: dict batch -> dict with "loss"
    batch_keys: tuple[str, ...]  # the names of a batch's tensors, in the data stage's order

    def data_stage(self) -> DataStage: ...

    def schedules(self, total_steps: int) -> dict[str, Any]:
        """What changes over the run besides the LR (``dtp_ds.train.schedule.Schedule`` objects,
        by name), e.g. a reducer's: stepped by the Trainer, saved with every checkpoint."""
        ...

    def evaluate(self, splits: Iterable[Any], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int) -> tuple[dict[str, float], list[str]]:
        """Metrics of every split (row keys) and one summary line per split; images decoded by
        ``workers`` loader processes."""
        ...


def register_task(name: str):
    """Decorator for a task factory ``(TaskSpec) -> Task``."""

    def wrap(factory):
        TASKS[name] = factory
        return factory

    return wrap


def build_task(name: str, spec: TaskSpec) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {sorted(TASKS)}")
    return TASKS[name](spec)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters that take no weight decay besides timm's 1-d rule (gains,
    biases, the logit scale): each submodule's ``no_weight_decay()`` (positions, CLS), and
    token embeddings, whose rare rows would shrink at every step without ever being used."""
    names = set()
    for prefix, module in model.named_modules():
        dot = prefix + "." if prefix else ""
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {dot + n for n in module.no_weight_decay()}
        if isinstance(module, nn.Embedding):
            names.add(dot + "weight")
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups through timm's ``param_groups_weight_decay`` (no decay on gains, biases,
    embeddings, the logit scale), always [no decay, decay] with the same split whatever
    ``weight_decay`` is (the export rebuilds the groups to name a checkpoint's fp32 masters)."""
    from timm.optim import param_groups_weight_decay

    # timm puts everything in one group at weight decay 0: ask with 1.0, set the value after
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_weight_decay_names(model))
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


from . import classify, clip  # noqa: E402,F401  (registers "classify", "clip")

__all__ = ["TASKS", "DataStage", "SplitLoss", "Task", "TaskSpec", "build_task", "no_weight_decay_names", "param_groups",
           "register_task"]
