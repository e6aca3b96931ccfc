"""What changes over training, with state saved in every checkpoint.

The learning rate is open_clip's warmup + cosine (:func:`warmup_cosine`; or polynomial or
constant after the warmup, ``--lr-scheduler``, :func:`warmup_decay`) as a torch
``LambdaLR`` that DeepSpeed steps at every applied optimizer step (not on fp16-overflow
steps) and saves with each checkpoint. Its factor is a :class:`WarmupDecay` object, so
``LambdaLR.state_dict`` saves the curve's warmup and length with it: a resume continues the
saved curve, and :func:`check_resumed_lr` refuses a resume whose ``--warmup`` / ``--epochs``
would have drawn another one. (DeepSpeed's own WarmupCosineLR spends its first two steps at lr 0.)

Anything else that changes over training is a :class:`Schedule`: an object with
``step(state)``, ``state_dict()`` and ``load_state_dict()``, stepped by the Trainer after each
optimizer step and saved in the checkpoint's client state (:class:`Schedules`); one with a
``before_step(state, param_groups)`` method is also called before the first forward of every
optimizer step with the optimizer's groups, to set that step's hyperparameters (DINO's weight
decay, its frozen last layer's lr: see ``dtp_ds.tasks.Task.schedules``).
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


LR_SCHEDULERS = ("cosine", "poly", "const")
LR_HELP = ("the LR after the linear warmup of W steps, at progress t = (step - W) / (S - W) in [0, 1] of S steps: "
           "cosine: lr * (1 + cos(pi t)) / 2; poly: lr * (1 - t) ** POWER (--lr-poly-power, default 2: the "
           "seqcomp paper's polynomial decay); const: lr")


def warmup_decay(step: int, base_lr: float, warmup: int, total: int, kind: str = "cosine", power: float = 2.0) -> float:
    """Linear warmup to base_lr over ``warmup`` steps, then the decay ``kind`` (see :data:`LR_HELP`) to
    0 at step ``total`` (``const``: stays)."""
    if kind == "cosine":
        return warmup_cosine(step, base_lr, warmup, total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    if kind == "poly":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return base_lr * (1.0 - progress) ** power
    raise ValueError(f"--lr-scheduler {kind!r}: one of {', '.join(LR_SCHEDULERS)}")


class WarmupDecay:
    """The LR factor of step ``step`` (a callable object: LambdaLR saves its fields, the flags
    that drew the curve among them; LambdaLR saves a callable object's fields, not its class):
    one of :data:`LR_SCHEDULERS`; ``power`` is the polynomial's (None unless ``poly``)."""

    # what a checkpoint saved before --lr-scheduler existed was trained on
    LEGACY = {"kind": "cosine", "power": None}

    def __init__(self, warmup: int, total_steps: int, epochs: int | None = None, kind: str = "cosine",
                 power: float | None = None) -> None:
        if kind not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler {kind!r}: one of {', '.join(LR_SCHEDULERS)}")
        self.warmup, self.total_steps, self.epochs = warmup, total_steps, epochs
        self.kind, self.power = kind, (float(2.0 if power is None else power) if kind == "poly" else None)

    def __call__(self, step: int) -> float:
        return warmup_decay(step, 1.0, self.warmup, self.total_steps, self.kind, self.power or 2.0)


def warmup_decay_lr(optimizer: Optimizer, warmup: int, total_steps: int, epochs: int | None = None,
                     kind: str = "cosine", power: float | None = None) -> LambdaLR:
    """The run's LR scheduler: ``base lr * warmup_decay`` of the steps done (cosine by default)."""
    return LambdaLR(optimizer, WarmupDecay(max(1, warmup), total_steps, epochs, kind, power))


def before_resume(scheduler: LambdaLR) -> None:
    """Before loading a checkpoint into ``scheduler``: mark its factor with what a checkpoint that
    saved no scheduler kind was trained on (cosine); a newer checkpoint overwrites it."""
    scheduler.lr_lambdas[0].__dict__.update(WarmupDecay.LEGACY)


def check_resumed_lr(scheduler: LambdaLR, warmup: int, epochs: int, total_steps: int, kind: str = "cosine",
                     power: float | None = None) -> str | None:
    """After loading a checkpoint (whose curve LambdaLR restored): ``ValueError`` naming the flag
    when ``--warmup``, ``--epochs``, ``--lr-scheduler`` or ``--lr-poly-power`` would draw another
    curve (a silent jump is never taken);
    when only the steps of an epoch changed (another world size or batch), the saved curve goes on
    and the returned message says so."""
    saved = scheduler.lr_lambdas[0]
    saved_kind = getattr(saved, "kind", "cosine")
    if saved_kind != kind:
        raise ValueError(f"--lr-scheduler {kind} differs from the checkpoint's {saved_kind}: resume with "
                         f"--lr-scheduler {saved_kind} (the LR curve it was trained on), or start a new run")
    if kind == "poly" and getattr(saved, "power", None) != float(2.0 if power is None else power):
        raise ValueError(f"--lr-poly-power {power} differs from the checkpoint's {saved.power}: resume with "
                         f"--lr-poly-power {saved.power} (the LR curve it was trained on), or start a new run")
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
    """Named :class:`Schedule` objects: stepped together, saved together; a schedule with a
    ``metrics(step)`` method adds its entries to every logged step's row."""

    def __init__(self, schedules: dict[str, Schedule] | None = None) -> None:
        self.items = dict(schedules or {})

    def before_step(self, state: Any, param_groups: list[dict]) -> None:
        """Before optimizer step ``state.step + 1``: each schedule's ``before_step``, if it has one."""
        for s in self.items.values():
            if hasattr(s, "before_step"):
                s.before_step(state, param_groups)

    def step(self, state: Any) -> None:
        for s in self.items.values():
            s.step(state)

    def metrics(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.items.values():
            if hasattr(s, "metrics"):
                out.update(s.metrics(step))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.items.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if "compression" in saved:  # the seqcomp schedule's key before the rename; never read as seqcomp
            raise ValueError("the checkpoint's schedule 'compression' was renamed 'seqcomp' (--seqcomp-schedule): "
                             "a checkpoint from before the rename cannot resume; start a new run (its weights: "
                             "--init-from RUN)")
        missing = sorted(set(self.items) - set(saved))
        if missing:
            raise ValueError(f"the checkpoint has no state for the schedules {missing}: it was trained without "
                             f"them; start a new run to use them")
        extra = sorted(set(saved) - set(self.items))
        if extra:  # e.g. a --seqcomp-schedule the resume left out: never continue without it silently
            raise ValueError(f"the checkpoint was trained with the schedules {extra}, which this run does not have: "
                             f"resume with the flags that made them (e.g. the same --seqcomp-schedule), or "
                             f"start a new run")
        for name, s in self.items.items():
            s.load_state_dict(saved[name])
