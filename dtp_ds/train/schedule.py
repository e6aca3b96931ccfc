"""Warmup + cosine learning-rate schedule, as open_clip's trainer computes it, with state.

DeepSpeed steps it at every optimizer step (not on fp16-overflow steps) and saves its
``state_dict`` in each checkpoint, so ``--resume`` continues the curve where it stopped.
(DeepSpeed's own WarmupCosineLR spends its first two steps at lr 0.)
"""
from __future__ import annotations

import math

from torch.optim import Optimizer


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip_train.scheduler.cosine_lr: linear warmup to base_lr, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


class WarmupCosineLR:
    """Sets each param group's lr for the step about to be taken (``last_step`` steps done)."""

    def __init__(self, optimizer: Optimizer, warmup: int, total_steps: int):
        self.optimizer = optimizer
        self.warmup, self.total_steps = warmup, total_steps
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = warmup_cosine(self.last_step, base, self.warmup, self.total_steps)

    def step(self, **_: object) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": self.base_lrs, "warmup": self.warmup,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state["last_step"]
        self._apply()
