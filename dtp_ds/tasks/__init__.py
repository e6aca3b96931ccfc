"""Tasks: what is trained. A task is one file in this package: its settings (a dataclass, whose
fields are its flags), its model, loss, data stage (what a sample becomes), evaluation splits and
evaluation, and what a checkpoint must record to rebuild its model. ``--task NAME`` picks one from
:data:`TASKS`; ``--task FILE.py`` imports a file that registers one (:func:`load_task_file`).

A task class (:class:`TaskType`) has the class-level parts, read before anything is built (flags,
checks, splits, the export's model); an instance (:class:`Task`) is built from a :class:`TaskSpec`
and holds the model and the module the engine wraps: a dict batch in, a dict with ``"loss"`` out.
:class:`TaskBase` gives the defaults a task may keep.

Tasks sit between models/data/eval and train: they import no ``dtp_ds.train`` module, so
everything they need from the run comes in a :class:`TaskSpec`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

TASKS: dict[str, type[TaskType]] = {}


@dataclass
class NoSettings:
    """A task without settings of its own."""


@dataclass
class TaskSpec:
    """What a task is built from (the run's settings that concern it)."""

    model: str
    rank: int = 0
    world: int = 1
    input_dtype: torch.dtype = torch.float32
    aux_loss_weight: float = 1.0  # each reducer auxiliary loss (DRIP's boundary loss) enters with this weight
    config: Any = None  # the task's own settings (its ``Config``); None: the defaults
    weight_decay: float = 0.0  # the optimizer's weight decay (--wd, else the ds_config's): a schedule's start


@dataclass
class SplitsContext:
    """What a task's evaluation splits may depend on besides its settings."""

    train_classes: int | None = None  # class folders of a class-folder --train-data (None: shards)
    micro_batch: int = 1  # the engine's micro-batch per rank
    train_data: str | None = None  # --train-data as given (a kNN bank may be drawn from it)


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
    """A built task (an instance of a :class:`TaskType`)."""

    name: str
    model: nn.Module  # the trained model itself (exported, evaluated)
    module: nn.Module  # model + loss: dict batch -> dict with "loss"
    batch_keys: tuple[str, ...]  # the names of a batch's tensors, in the data stage's order

    def data_stage(self) -> DataStage: ...

    def schedules(self, total_steps: int) -> dict[str, Any]:
        """What changes over the run besides the LR, by name: objects with ``step(state)`` after
        each optimizer step, ``state_dict()`` / ``load_state_dict()`` saved with every checkpoint,
        optionally ``metrics(step)`` for the logged rows and optionally
        ``before_step(state, param_groups)``, called before the first forward of every optimizer
        step (``state.step`` steps done, ``state.epoch`` the epoch it is in) with the optimizer's
        groups (:func:`param_groups`' dicts, each with its ``"group"`` name and ``"decays"``), to
        set what that step's forward and update use: a group's ``weight_decay`` or ``lr`` (the
        LR scheduler sets every group's ``lr`` again after the step). A value that is a function
        of ``state`` resumes exactly. (``dtp_ds.train.schedule.Schedule``; a reducer's, a momentum
        encoder's update, DINO's weight decay.)"""
        ...

    def evaluate(self, splits: Iterable[Any], device: torch.device, batch_size: int,
                 max_images: int | None, workers: int) -> tuple[dict[str, float], list[str]]:
        """Metrics of every split (row keys) and one summary line per split; images decoded by
        ``workers`` loader processes."""
        ...

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint records besides the weights so that :meth:`TaskType.build_model`
        rebuilds the model (e.g. the classifier's width)."""
        ...


class TaskType(Protocol):
    """A registered task class: what is read before a task is built."""

    name: ClassVar[str]
    Config: ClassVar[type]  # a dataclass: the task's settings, one flag per field (defaults written there)
    train_layouts: ClassVar[frozenset[str]]  # what --train-data may be: "shards", "folder" (a class-folder tree)
    contrastive_memory: ClassVar[bool]  # the memory model's CLIP shapes apply (GPU start-up memory check)
    # its loss compares the samples of a batch: --accum-freq needs a SplitLoss module (GradCache);
    # without coupling, --accum-freq K is plain accumulation of K micro-batches (exact)
    couples_batch: ClassVar[bool]
    # image views one sample becomes (the rows' forward_passes = samples seen x this)
    views_per_sample: ClassVar[int]

    def __call__(self, spec: TaskSpec) -> Task: ...

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        """Declare the Config's flags: ``add("--num-classes", type=int, help=...)``, the flag's
        destination a Config field (defaults come from the Config)."""
        ...

    @classmethod
    def check(cls, cfg: Any) -> None:
        """``ValueError`` naming the flag and the fix for settings that cannot work (no files read)."""
        ...

    @classmethod
    def eval_splits(cls, cfg: Any, ctx: SplitsContext) -> tuple[list[Any], list[dict[str, Any]]]:
        """(evaluation splits, settings it settled as override records ``{"key", "flag", "value",
        "why"}``); ``ValueError`` naming the flag for splits that cannot be read."""
        ...

    @classmethod
    def build_model(cls, model: str, client_state: dict[str, Any]) -> nn.Module:
        """The model a run trains, weights fresh, from a checkpoint's :meth:`Task.client_state`."""
        ...


class TaskBase:
    """The defaults a task may keep: no settings, shards only, no evaluation splits, no
    client state, the reducers' schedules."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoSettings
    train_layouts: ClassVar[frozenset[str]] = frozenset({"shards"})
    contrastive_memory: ClassVar[bool] = False
    couples_batch: ClassVar[bool] = True  # (the safe default: --accum-freq refused unless a SplitLoss)
    views_per_sample: ClassVar[int] = 1
    model: nn.Module

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        pass

    @classmethod
    def check(cls, cfg: Any) -> None:
        pass

    @classmethod
    def eval_splits(cls, cfg: Any, ctx: SplitsContext) -> tuple[list[Any], list[dict[str, Any]]]:
        return [], []

    def schedules(self, total_steps: int) -> dict[str, Any]:
        from dtp_ds.models import reducers_of

        found = ((f"reducer{i}_{r.type_name}", r.schedule(total_steps)) for i, r in enumerate(reducers_of(self.model)))
        return {name: s for name, s in found if s is not None}

    def client_state(self) -> dict[str, Any]:
        return {}


def register_task(name: str):
    """Class decorator: registers a task class under ``name`` (its ``name`` attribute)."""

    def wrap(cls):
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"task {name!r}: its Config must be a dataclass (the task's settings)")
        cls.name = name
        TASKS[name] = cls
        return cls

    return wrap


def task_type(name: str) -> type[TaskType]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {', '.join(sorted(TASKS))}, or a FILE.py that registers one")
    return TASKS[name]


def build_task(name: str, spec: TaskSpec) -> Task:
    cls = task_type(name)
    if spec.config is None:
        spec = dataclasses.replace(spec, config=cls.Config())
    return cls(spec)


def load_task_file(path: str) -> str:
    """Import ``path`` (a Python file that registers one task with :func:`register_task`) and
    return the name it registered; ``ValueError`` when it registers none or several."""
    if not os.path.isfile(path):
        raise ValueError(f"--task {path}: no such file (a task name: {', '.join(sorted(TASKS))})")
    before = dict(TASKS)
    module_name = "dtp_ds_task_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up
    spec.loader.exec_module(module)
    new = [n for n in TASKS if before.get(n) is not TASKS[n]]
    if len(new) != 1:
        raise ValueError(f"--task {path}: the file must register exactly one task with "
                         f"dtp_ds.tasks.register_task (it registered {new or 'none'})")
    return new[0]


def reducer_terms(records: list[Any], weight: float) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The weighted sum of the image trunk's auxiliary losses (``None`` without any), and the
    row entries: each auxiliary loss and statistic (detached) and ``image_tokens``, averaged over
    the trunk forwards the records (:class:`dtp_ds.models.TowerOutput`, from
    :func:`dtp_ds.models.record_forward`) hold."""
    if not records:
        return None, {}
    keys = {**records[0].aux_losses, **records[0].stats}
    row = {k: torch.stack([(r.aux_losses.get(k, r.stats.get(k))).float().reshape(()) for r in records]).mean()
           for k in keys}
    # mean tokens per sample over the blocks: what the trunk's compute scales with
    row["image_tokens"] = torch.stack([r.token_counts.float().mean() for r in records]).mean()
    aux = [row[k] for k in records[0].aux_losses]
    total = weight * torch.stack(aux).sum() if aux else None
    return total, {k: v.detach() for k, v in row.items()}


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
    embeddings, the logit scale; frozen parameters left out), always [no decay, decay] first
    with the same split whatever ``weight_decay`` is (the export rebuilds the groups to name a
    checkpoint's fp32 masters). A submodule with an ``own_param_group`` name (DINO's last layer)
    puts its parameters in groups of their own after those, [NAME no decay, NAME decay] (an empty
    one left out), so that a schedule can set their ``lr`` or ``weight_decay`` apart. Each group
    carries its ``"group"`` name and whether it ``"decays"`` (takes ``weight_decay``)."""
    from timm.optim import param_groups_weight_decay

    owner = {id(p): m.own_param_group for m in model.modules() if getattr(m, "own_param_group", None)
             for p in m.parameters()}
    # timm puts everything in one group at weight decay 0: ask with 1.0, set the value after
    split = param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_weight_decay_names(model))
    groups = {("", False): [], ("", True): []}  # (own group name, decays) -> params, the plain two first
    for g in split:
        for p in g["params"]:
            groups.setdefault((owner.get(id(p), ""), bool(g["weight_decay"])), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "decays": decays,
             "group": f"{name + '_' if name else ''}{'decay' if decays else 'no_decay'}"}
            for (name, decays), params in groups.items() if params or not name]


from . import classify, clip, dino, mocov3, simclr  # noqa: E402,F401  (each registers its task)

__all__ = ["TASKS", "DataStage", "NoSettings", "SplitLoss", "SplitsContext", "Task", "TaskBase", "TaskSpec", "TaskType",
           "build_task", "load_task_file", "no_weight_decay_names", "param_groups", "reducer_terms", "register_task",
           "task_type"]
