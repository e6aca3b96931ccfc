"""``--task dino``: DINO (Caron et al. 2021) self-distillation of the image trunk, re-implemented
from the paper: two global crops (and ``--dino-local-crops`` smaller ones, multi-crop) of
:func:`dtp_ds.data.views.dino_views`; a student (trunk + DINO head) and an EMA teacher (momentum
``--dino-momentum`` rising to 1 on a cosine, :class:`dtp_ds.models.momentum.MomentumTeacher`)
that sees the global crops only; the cross-entropy of each student crop against the centred,
sharpened teacher output of every other global crop (:class:`dtp_ds.tasks.ssl_losses.DINOLoss`:
centre momentum 0.9, student temperature 0.1, teacher temperature warmed up from 0.04 to 0.07:
both schedules checkpointed). Evaluated by kNN, as the paper does.

Not carried over from the paper's recipe: the first epoch's frozen last layer and the weight
decay schedule (0.04 -> 0.4); the run's optimizer settings apply.
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
from dtp_ds.models.momentum import MomentumTeacher
from dtp_ds.models.ssl_heads import DINOHead

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

    @classmethod
    def check(cls, cfg: DINOConfig) -> None:
        check_knn(cfg)
        if cfg.dino_local_crops < 0 or cfg.dino_out_dim < 2 or not 0.0 <= cfg.dino_momentum <= 1.0:
            raise ValueError("--dino-local-crops must be >= 0, --dino-out-dim >= 2, --dino-momentum in [0, 1]")
        if not (cfg.dino_student_temp > 0 and cfg.dino_teacher_temp > 0 and 0 <= cfg.dino_center_momentum <= 1):
            raise ValueError("--dino-student-temp and --dino-teacher-temp must be > 0, --dino-center-momentum in "
                             "[0, 1]")

    @property
    def views_per_sample(self) -> int:  # type: ignore[override]
        return 2 + self.cfg.dino_local_crops

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.module = DINOModule(self.model, self.cfg, spec.aux_loss_weight, spec.input_dtype)
        # before the engine: the teacher is frozen (no optimizer state) and starts as the student
        self.teacher = MomentumTeacher(self.module.student(), self.module.teacher, self.cfg.dino_momentum, 1)

    def views(self) -> MultiView:
        return dino_views(self.size, MEAN, STD, n_local=self.cfg.dino_local_crops, patch=self.patch)

    def schedules(self, total_steps: int) -> dict[str, Any]:
        self.teacher.total_steps = total_steps  # the cosine spans the run
        warmup = self.cfg.dino_warmup_teacher_temp_steps or max(1, total_steps // 10)
        temperature = TeacherTemperature(self.module.loss, warmup, end=self.cfg.dino_teacher_temp)
        return {**super().schedules(total_steps), "teacher": self.teacher, "teacher_temperature": temperature}
