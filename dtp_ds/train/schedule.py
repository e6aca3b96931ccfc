"""What changes over training, with state saved in every checkpoint.

The learning rate is open_clip's warmup + cosine (:func:`warmup_cosine`) as a torch
``LambdaLR`` that DeepSpeed steps at every applied optimizer step (not on fp16-overflow
steps) and saves with each checkpoint. Its factor is a :class:`WarmupCosine` object, so
``LambdaLR.state_dict`` saves the curve's warmup and length with it: a resume continues the
saved curve, and :func:`check_resumed_lr` refuses a resume whose ``--warmup`` / ``--epochs``
would have drawn another one. (DeepSpeed's own WarmupCosineLR spends its first two steps at lr 0.)

Anything else that changes over training is a :class:`Schedule`: an object with
``step(state)``, ``state_dict()`` and ``load_state_dict()``, stepped by the Trainer after each
optimizer step and saved in the checkpoint's client state (:class:`Schedules`).
"""
from __future__ import annotations

import math
from typing import Any, Protocol

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip_train.scheduler.cosine_lr: linear warmup to base_lr, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


class WarmupCosine:
    """The LR factor of step ``step`` (a callable object: LambdaLR saves its fields, the flags
    that drew the curve among them)."""

    def __init__(self, warmup: int, total_steps: int, epochs: int | None = None) -> None:
        self.warmup, self.total_steps, self.epochs = warmup, total_steps, epochs

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, 1.0, self.warmup, self.total_steps)


def warmup_cosine_lr(optimizer: Optimizer, warmup: int, total_steps: int, epochs: int | None = None) -> LambdaLR:
    """The run's LR scheduler: ``base lr * warmup_cosine`` of the steps done."""
    return LambdaLR(optimizer, WarmupCosine(max(1, warmup), total_steps, epochs))


def check_resumed_lr(scheduler: LambdaLR, warmup: int, epochs: int, total_steps: int) -> str | None:
    """After loading a checkpoint (whose curve LambdaLR restored): ``ValueError`` naming the flag
    when ``--warmup`` or ``--epochs`` would draw another curve (a silent jump is never taken);
    when only the steps of an epoch changed (another world size or batch), the saved curve goes on
    and the returned message says so."""
    saved = scheduler.lr_lambdas[0]
    if saved.warmup != max(1, warmup):
        raise ValueError(f"--warmup {warmup} differs from the checkpoint's {saved.warmup}: resume with "
                         f"--warmup {saved.warmup} (the LR curve it was trained on), or start a new run")
    if saved.epochs is not None and saved.epochs != epochs:
        raise ValueError(f"--epochs {epochs} differs from the checkpoint's {saved.epochs}: resume with "
                         f"--epochs {saved.epochs} (the LR curve it was trained on; --max-steps stops earlier), "
                         f"or start a new run")
    if saved.total_steps != total_steps:
        return (f"the epochs now take {total_steps} steps in all, the checkpoint's LR curve {saved.total_steps} "
                f"(another world size or batch): the saved curve goes on (warmup {saved.warmup}, cosine to 0 at "
                f"step {saved.total_steps})")
    return None


class Schedule(Protocol):
    def step(self, state: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Schedules:
    """Named :class:`Schedule` objects: stepped together, saved together."""

    def __init__(self, schedules: dict[str, Schedule] | None = None) -> None:
        self.items = dict(schedules or {})

    def step(self, state: Any) -> None:
        for s in self.items.values():
            s.step(state)

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.items.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        missing = sorted(set(self.items) - set(saved))
        if missing:
            raise ValueError(f"the checkpoint has no state for the schedules {missing}: it was trained without "
                             f"them; start a new run to use them")
        for name, s in self.items.items():
            s.load_state_dict(saved[name])
