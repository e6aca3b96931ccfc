"""``--task dino``: DINO (Caron et al. 2021) self-distillation of the image trunk, re-implemented
from the paper: two global crops (and ``--dino-local-crops`` smaller ones, multi-crop) of
:func:`dtp_ds.data.views.dino_views`; a student (trunk + DINO head) and an EMA teacher (momentum
``--dino-momentum`` rising to 1 on a cosine, :class:`dtp_ds.models.momentum.MomentumTeacher`)
that sees the global crops only; the cross-entropy of each student crop against the centred,
sharpened teacher output of every other global crop (:class:`dtp_ds.tasks.ssl_losses.DINOLoss`:
centre momentum 0.9, student temperature 0.1, teacher temperature warmed up from 0.04 to 0.07:
both schedules checkpointed). Evaluated by kNN, as the paper does.

Two parts of the paper's optimisation, as run schedules (``before_step``: set before every
optimizer step from the step and epoch alone, so a resume is exact):

- the head's last layer frozen for the first ``--dino-freeze-last-layer-epochs`` epochs (DINO's
  ``freeze_last_layer``, 1): its gradients are zero (:class:`WeightNormLinear`'s ``frozen``) and
  its optimizer groups (``last_layer_*``, :func:`dtp_ds.tasks.param_groups`) take lr 0, so the
  decoupled weight decay does not move it either (DINO's AdamW skips a parameter without a
  gradient). Unlike DINO's AdamW, whose per-parameter step count starts when the layer thaws,
  DeepSpeed's Adam counts the frozen steps too: the layer's first updates after it thaws are
  bias-corrected as late ones (its moments start at 0 all the same);
- the weight decay on a cosine from the run's (``--wd``, else the ds_config's; DINO's recipe:
  ``--wd 0.04``) to ``--dino-weight-decay-end`` (0.4) over the run's steps, on every decayed
  group (DINO's ``cosine_scheduler``, per step).
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtp_ds.data.views import MultiView, dino_views
from dtp_ds.models import record_forward
from dtp_ds.models.momentum import MomentumTeacher, cosine_schedule
from dtp_ds.models.ssl_heads import DINOHead, WeightNormLinear

from . import TaskSpec, reducer_terms, register_task
from .ssl import MEAN, STD, KnnConfig, SSLTask, add_knn_flags, check_knn
from .ssl_losses import DINOLoss, TeacherTemperature


@dataclass
class DINOConfig(KnnConfig):
    """``--task dino``'s settings (the paper's, with fewer prototypes by default for small runs)."""

    dino_out_dim: int = 4096  # prototypes (the paper: 65536)
    dino_momentum: float = 0.996  # the teacher's EMA momentum at the start (cosine to 1)
    dino_local_crops: int = 0  # local crops per image besides the 2 global ones (the paper: 8)
    dino_teacher_temp: float = 0.07  # after the warm-up from 0.04
    dino_warmup_teacher_temp_steps: int = 0  # 0: a tenth of the run's steps
    dino_student_temp: float = 0.1
    dino_center_momentum: float = 0.9
    dino_norm_last_layer: bool = True
    dino_freeze_last_layer_epochs: int = 1  # the head's last layer takes no update in these first epochs
    dino_weight_decay_end: float = 0.4  # the weight decay's cosine from the run's --wd ends here


def refuse_changed(what: str, saved: dict[str, Any], now: dict[str, Any], flags: str) -> None:
    """``ValueError`` when a checkpoint's schedule settings are not this run's (its curve would
    change mid-run)."""
    if saved != now:
        raise ValueError(f"the checkpoint's {what} ({saved}) is not this run's ({now}): resume with the same "
                         f"{flags}, or start a new run")


class CosineWeightDecay:
    """A run schedule: the weight decay of optimizer step ``k`` (0-based) is a half-cosine from
    ``start`` at 0 to ``end`` at ``total_steps`` (DINO's per-step ``cosine_scheduler``), set on
    every group that ``"decays"`` before the step."""

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start, self.end, self.total_steps = float(start), float(end), int(total_steps)

    def value(self, done: int) -> float:
        """The weight decay of the optimizer step that follows ``done`` steps."""
        return cosine_schedule(done, self.total_steps, self.start, self.end)

    def before_step(self, state: Any, param_groups: list[dict]) -> None:
        wd = self.value(int(state.step))
        for group in param_groups:
            if group.get("decays"):
                group["weight_decay"] = wd

    def step(self, state: Any) -> None:
        pass  # a function of the step: nothing to count

    def metrics(self, step: int) -> dict[str, float]:
        """The weight decay optimizer step ``step`` (1 for the first) used."""
        return {"weight_decay": self.value(max(0, step - 1))}

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "total_steps": self.total_steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        refuse_changed("weight-decay schedule", saved, self.state_dict(), "--wd (or ds_config) and "
                       "--dino-weight-decay-end, and the same epochs")


class FrozenLastLayer:
    """A run schedule: during the first ``epochs`` epochs ``layer`` (the student head's last
    layer) gets zero gradients and its optimizer groups (``group`` ``last_layer_*``) lr 0."""

    GROUP_PREFIX = "last_layer_"

    def __init__(self, layer: WeightNormLinear, epochs: int) -> None:
        self.layer, self.epochs = layer, int(epochs)

    def frozen(self, epoch: int) -> bool:
        return epoch < self.epochs

    def before_step(self, state: Any, param_groups: list[dict]) -> None:
        self.layer.frozen = self.frozen(int(state.epoch))
        if self.layer.frozen:  # the LR scheduler sets it again after the step
            for group in param_groups:
                if str(group.get("group", "")).startswith(self.GROUP_PREFIX):
                    group["lr"] = 0.0

    def step(self, state: Any) -> None:
        pass  # a function of the epoch: nothing to count

    def metrics(self, step: int) -> dict[str, float]:
        return {"last_layer_frozen": float(self.layer.frozen)}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        refuse_changed("frozen last layer", saved, self.state_dict(), "--dino-freeze-last-layer-epochs")


class DINOModule(nn.Module):
    """Student (trunk + head), teacher (trunk + head, EMA, global crops only), the loss:
    ``{"view1", "view2"[, "local"]}`` -> ``{"loss", "dino_loss", reducer terms}``."""

    def __init__(self, trunk: nn.Module, cfg: DINOConfig, aux_loss_weight: float, input_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = trunk
        self.head = DINOHead(trunk.num_features, cfg.dino_out_dim, norm_last_layer=cfg.dino_norm_last_layer)
        self.teacher = nn.ModuleDict({"model": copy.deepcopy(trunk), "head": copy.deepcopy(self.head)})
        self.loss = DINOLoss(cfg.dino_out_dim, cfg.dino_student_temp, center_momentum=cfg.dino_center_momentum)
        if cfg.dino_local_crops:  # the local crops are smaller: positions resampled to their grid
            trunk.any_input_size = True
        self.aux_loss_weight, self.input_dtype = aux_loss_weight, input_dtype

    def student(self) -> nn.ModuleDict:
        return nn.ModuleDict({"model": self.model, "head": self.head})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        globals_ = [batch["view1"].to(self.input_dtype), batch["view2"].to(self.input_dtype)]
        crops = list(globals_)
        if "local" in batch:  # (B, n, 3, s, s): one batch per local crop index
            crops += [c.to(self.input_dtype) for c in batch["local"].unbind(1)]
        with record_forward() as records:
            student = [self.head(self.model(c)) for c in crops]
        with torch.no_grad():
            teacher = [self.teacher["head"](self.teacher["model"](g)) for g in globals_]
        loss = self.loss(student, teacher)
        aux, row = reducer_terms(records, self.aux_loss_weight)
        return {"loss": loss if aux is None else loss + aux, "dino_loss": loss.detach(), **row}


@register_task("dino")
class DINOTask(SSLTask):
    """--task dino: DINO self-distillation (EMA teacher, centring, multi-crop), evaluated by kNN."""

    Config = DINOConfig

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        add_knn_flags(add)
        add("--dino-out-dim", type=int, help="prototypes of the head's last layer (4096; the paper 65536)")
        add("--dino-momentum", type=float, help="the teacher's momentum at the start, cosine to 1 (0.996)")
        add("--dino-local-crops", type=int, help="local crops per image besides the 2 global ones (0; the paper 8)")
        add("--dino-teacher-temp", type=float, help="teacher temperature after the warm-up from 0.04 (0.07)")
        add("--dino-warmup-teacher-temp-steps", type=int,
            help="steps of the teacher-temperature warm-up (0: a tenth of the run)")
        add("--dino-student-temp", type=float, help="student temperature (0.1)")
        add("--dino-center-momentum", type=float, help="momentum of the teacher-output centre (0.9)")
        add("--dino-norm-last-layer", action=argparse.BooleanOptionalAction,
            help="a weight-normalised last layer of fixed norm (default on)")
        add("--dino-freeze-last-layer-epochs", type=int,
            help="epochs at the start in which the head's last layer takes no update (zero gradients, lr 0), as "
                 "DINO's freeze_last_layer (1; 0: never)")
        add("--dino-weight-decay-end", type=float,
            help="the weight decay follows a cosine over the run's steps from the run's (--wd, else the "
                 "ds_config's; DINO's recipe: --wd 0.04) to this (0.4; the same value as --wd: constant)")

    @classmethod
    def check(cls, cfg: DINOConfig) -> None:
        check_knn(cfg)
        if cfg.dino_local_crops < 0 or cfg.dino_out_dim < 2 or not 0.0 <= cfg.dino_momentum <= 1.0:
            raise ValueError("--dino-local-crops must be >= 0, --dino-out-dim >= 2, --dino-momentum in [0, 1]")
        if not (cfg.dino_student_temp > 0 and cfg.dino_teacher_temp > 0 and 0 <= cfg.dino_center_momentum <= 1):
            raise ValueError("--dino-student-temp and --dino-teacher-temp must be > 0, --dino-center-momentum in "
                             "[0, 1]")
        if cfg.dino_freeze_last_layer_epochs < 0 or not cfg.dino_weight_decay_end >= 0:
            raise ValueError(f"--dino-freeze-last-layer-epochs {cfg.dino_freeze_last_layer_epochs} must be >= 0 "
                             f"(0: never frozen) and --dino-weight-decay-end {cfg.dino_weight_decay_end} >= 0")

    @property
    def views_per_sample(self) -> int:  # type: ignore[override]
        return 2 + self.cfg.dino_local_crops

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.module = DINOModule(self.model, self.cfg, spec.aux_loss_weight, spec.input_dtype)
        # before the engine: the teacher is frozen (no optimizer state) and starts as the student
        self.teacher = MomentumTeacher(self.module.student(), self.module.teacher, self.cfg.dino_momentum, 1)
        self.weight_decay = spec.weight_decay

    def views(self) -> MultiView:
        return dino_views(self.size, MEAN, STD, n_local=self.cfg.dino_local_crops, patch=self.patch)

    def schedules(self, total_steps: int) -> dict[str, Any]:
        self.teacher.total_steps = total_steps  # the cosine spans the run
        warmup = self.cfg.dino_warmup_teacher_temp_steps or max(1, total_steps // 10)
        temperature = TeacherTemperature(self.module.loss, warmup, end=self.cfg.dino_teacher_temp)
        return {**super().schedules(total_steps), "teacher": self.teacher, "teacher_temperature": temperature,
                "weight_decay": CosineWeightDecay(self.weight_decay, self.cfg.dino_weight_decay_end, total_steps),
                "frozen_last_layer": FrozenLastLayer(self.module.head.last_layer,
                                                     self.cfg.dino_freeze_last_layer_epochs)}
