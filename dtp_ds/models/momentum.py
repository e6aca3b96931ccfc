"""The momentum (EMA) teacher of MoCo v3 and DINO: after every optimizer step the teacher's
weights move towards the student's, ``teacher <- m teacher + (1 - m) student``, with ``m`` on a
cosine schedule from ``base`` (MoCo v3: 0.99, DINO: 0.996) to 1 at the end of training.

The teacher is part of the trained module (its weights are in the module's state dict, so every
checkpoint holds them) but is not trained: its parameters have ``requires_grad=False`` and the
optimizer never sees them. :class:`MomentumTeacher` is a run schedule
(``dtp_ds.train.schedule.Schedule``: ``step(state)``, ``state_dict``, ``load_state_dict``,
``metrics``): what it saves is the schedule and the updates done, for an exact resume.

Under DeepSpeed (no import of it here: the parameters say what they are):
- ZeRO 0-2: every rank holds whole parameters; the update is elementwise on ``.data``, the same
  on every rank. With bf16 (or fp16) the module's parameters are 16-bit copies of the fp32
  masters the optimizer holds: the EMA reads the student's 16-bit copy (what the forward uses)
  and updates the teacher's 16-bit weights (the teacher has no fp32 master: it stays in the
  module's dtype). The arithmetic is fp32 with one rounding, but a move smaller than half a
  16-bit step of a weight is lost: with ``m`` near 1 a bf16 teacher freezes earlier than an fp32
  one would (fp32 training avoids it).
- ZeRO-3: a parameter is partitioned over ranks (``.ds_tensor``: this rank's flat slice; the
  same slicing for tensors of the same size), so the update runs slice by slice on each rank,
  no communication. Parameters ZeRO-3 keeps whole besides (the persistent small ones, status
  AVAILABLE) get the same elementwise update on their whole copy, so the copy the forward uses
  and the partition stay equal bit for bit. Parameters swapped to NVMe (ZeRO-Infinity) are not
  supported.

tests/dist/test_momentum_teacher.py checks under a real 2-rank engine (ZeRO-2 and ZeRO-3, fp32
and bf16) that the gathered teacher after a step is the EMA of the gathered student.

lightly ships momentum updates too (``update_momentum``) but over ``.data`` only (not ZeRO-3's
partitions), and its wheel requires pytorch-lightning and hydra-core.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """A half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (and after): DINO's
    ``cosine_scheduler`` for its momentum and its weight decay."""
    progress = min(1.0, step / total_steps) if total_steps > 0 else 1.0
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """The momentum after ``step`` of ``total_steps`` updates: ``base`` at 0, 1 at the end,
    half-cosine in between (MoCo v3, BYOL, DINO)."""
    return cosine_schedule(step, total_steps, base, 1.0)


def is_zero3(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitioned ``p`` (it then carries its slice, ``ds_tensor``)."""
    return hasattr(p, "ds_tensor")


def _whole(p: torch.Tensor) -> bool:
    """Whether a ZeRO-3 parameter holds its whole value right now (persistent or gathered)."""
    status = getattr(p, "ds_status", None)
    return getattr(status, "name", None) == "AVAILABLE" and p.data.numel() == p.ds_numel


@torch.no_grad()
def ema_(teacher: torch.Tensor, student: torch.Tensor, m: float) -> None:
    """``teacher <- m teacher + (1 - m) student`` in place, in fp32 (16-bit teachers rounded
    once at the end)."""
    if teacher.dtype in (torch.float32, torch.float64):
        teacher.mul_(m).add_(student.to(teacher.dtype), alpha=1.0 - m)
    else:
        teacher.copy_(teacher.float().mul_(m).add_(student.float(), alpha=1.0 - m))


@torch.no_grad()
def ema_parameter(teacher: nn.Parameter, student: nn.Parameter, m: float) -> None:
    """One parameter's EMA update, plain or ZeRO-3 partitioned (see the module doc)."""
    if is_zero3(teacher) != is_zero3(student):
        raise ValueError("the teacher and the student must both be ZeRO-3 parameters or neither: wrap both in "
                         "the one DeepSpeed engine")
    if not is_zero3(teacher):
        ema_(teacher.data, student.data, m)
        return
    if teacher.ds_tensor.numel() != student.ds_tensor.numel() or tuple(teacher.ds_shape) != tuple(student.ds_shape):
        raise ValueError(f"ZeRO-3 partitions differ: teacher {tuple(teacher.ds_shape)} / {teacher.ds_tensor.numel()}, "
                         f"student {tuple(student.ds_shape)} / {student.ds_tensor.numel()}")
    ema_(teacher.ds_tensor.data, student.ds_tensor.data, m)
    if _whole(teacher):  # its whole copy, what the next forward uses without gathering
        gather = not _whole(student)
        if gather:
            student.all_gather(param_list=[student])
        ema_(teacher.data, student.data, m)
        if gather:
            student.partition(param_list=[student])


class MomentumTeacher:
    """The EMA teacher of ``student`` (see the module doc). ``teacher`` has the student's
    architecture (or a part of it: each of its parameters is paired with the student's of the
    same name); at construction, before the engine wraps the module, it is frozen and (``copy``)
    set to the student's weights. Buffers are not averaged: the teacher's BatchNorm statistics
    are its own (as MoCo v3's and DINO's).

    A student parameter that is not trained (``requires_grad`` off: MoCo v3's frozen patch
    projection, DINO's fixed weight norm) is copied once and never averaged: its teacher stays
    equal to it bit for bit (an EMA of two equal values rounds away from them).

    Call :meth:`step` after each applied optimizer step (the Trainer's schedules do; not on an
    fp16 overflow, which leaves the student unchanged)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, base: float, total_steps: int,
                 copy: bool = True) -> None:
        if not 0.0 <= base <= 1.0:
            raise ValueError(f"the base momentum is in [0, 1], got {base}")
        self.base, self.total_steps, self.updates = base, total_steps, 0
        students = dict(student.named_parameters())
        self.pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = []
        for name, t in teacher.named_parameters():
            s = students.get(name)
            if s is None or s.shape != t.shape:
                raise ValueError(f"teacher parameter {name} {tuple(t.shape)} has no student parameter of that name "
                                 f"and shape ({None if s is None else tuple(s.shape)})")
            if s is t:
                raise ValueError(f"teacher parameter {name} is the student's own tensor: build the teacher as a copy")
            self.pairs.append((name, t, s))
        with torch.no_grad():
            for _, t, s in self.pairs:
                t.requires_grad_(False)
                if copy:
                    t.copy_(s)
        self.pairs = [(name, t, s) for name, t, s in self.pairs if s.requires_grad]

    def momentum(self, done: int) -> float:
        """The momentum of the update that follows ``done`` earlier updates."""
        return cosine_momentum(done, self.total_steps, self.base)

    def update(self, m: float) -> None:
        """One EMA update of every teacher parameter with momentum ``m``."""
        for _, t, s in self.pairs:
            ema_parameter(t, s, m)

    def step(self, state: Any) -> None:
        """After optimizer step ``state.step`` (1 for the first): the update with the momentum
        of step ``state.step - 1`` (``base`` for the first)."""
        self.update(self.momentum(int(state.step) - 1))
        self.updates = int(state.step)

    def metrics(self, step: int) -> dict[str, float]:
        """The momentum of the update after optimizer step ``step``."""
        return {"momentum": self.momentum(max(0, step - 1))}

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "total_steps": self.total_steps, "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Resume the saved schedule; one drawn with another base or length is refused (its
        curve would change mid-run)."""
        if (saved["base"], saved["total_steps"]) != (self.base, self.total_steps):
            raise ValueError(f"the checkpoint's momentum schedule (base {saved['base']}, {saved['total_steps']} steps) "
                             f"is not this run's (base {self.base}, {self.total_steps} steps): resume with the flags "
                             f"that drew it, or start a new run")
        self.updates = int(saved["updates"])
