"""``--task mocov3``: MoCo v3 (Chen, Xie, He 2021) pretraining of the image trunk, re-implemented
from the paper: two asymmetric views (:func:`dtp_ds.data.views.mocov3_views`), a 3-layer
projector and a 2-layer predictor with BatchNorm synchronised across ranks, a momentum encoder
(trunk + projector, an EMA whose momentum rises from ``--moco-momentum`` to 1 on a cosine,
:class:`dtp_ds.models.momentum.MomentumTeacher`: a run schedule, checkpointed) and the symmetric
InfoNCE loss with temperature 0.2 over keys gathered from every rank. Evaluated by kNN.

The paper's "random patch projection" (sec. 4.2; ``--moco-freeze-patch-embed``, on by default
as in its ViT recipe): the trunk's patch embedding (either stem) keeps its random initialisation,
which the paper found stabilises ViT training. Its parameters are frozen (``requires_grad``
off) before the engine is built, so the optimizer never holds them (every ZeRO stage) and the
momentum encoder's copy stays equal to it.

A ``--seqcomp-schedule`` applies seqcomp to both encoders' training inputs (each view's tokens
dropped or its patches scaled independently): the momentum encoder's forward is half the cost.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtp_ds.data.views import MultiView, mocov3_views
from dtp_ds.models import record_forward
from dtp_ds.models.momentum import MomentumTeacher
from dtp_ds.models.ssl_heads import mocov3_predictor, mocov3_projector

from . import TaskSpec, reducer_terms, register_task
from .ssl import MEAN, STD, KnnConfig, SSLTask, add_knn_flags, check_knn
from .ssl_losses import mocov3_loss, sync_batchnorm


@dataclass
class MoCoV3Config(KnnConfig):
    """``--task mocov3``'s settings (the paper's ViT recipe by default)."""

    moco_momentum: float = 0.99  # the momentum encoder's EMA momentum at the start (cosine to 1)
    moco_temperature: float = 0.2
    moco_mlp_dim: int = 4096  # the projector's and predictor's hidden width
    moco_dim: int = 256  # the projected feature width
    moco_freeze_patch_embed: bool = True  # the paper's random patch projection: the patch embedding is not trained


class MoCoV3Module(nn.Module):
    """Trunk + projector + predictor, the momentum encoder (``teacher``: trunk + projector), the
    loss: ``{"view1", "view2"}`` -> ``{"loss", "contrastive_loss", reducer terms}``."""

    def __init__(self, trunk: nn.Module, cfg: MoCoV3Config, aux_loss_weight: float, input_dtype: torch.dtype) -> None:
        super().__init__()
        if cfg.moco_freeze_patch_embed:  # before the teacher's copy and the engine: no optimizer state
            trunk.patch_embed.requires_grad_(False)
        self.model = trunk
        self.projector = sync_batchnorm(mocov3_projector(trunk.num_features, cfg.moco_mlp_dim, cfg.moco_dim))
        self.predictor = sync_batchnorm(mocov3_predictor(cfg.moco_dim, cfg.moco_mlp_dim))
        self.teacher = nn.ModuleDict({"model": copy.deepcopy(trunk), "projector": copy.deepcopy(self.projector)})
        self.temperature, self.aux_loss_weight, self.input_dtype = cfg.moco_temperature, aux_loss_weight, input_dtype

    def student(self) -> nn.ModuleDict:
        """The parts the teacher averages, under the teacher's names."""
        return nn.ModuleDict({"model": self.model, "projector": self.projector})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = (batch[k].to(self.input_dtype) for k in ("view1", "view2"))
        with record_forward() as records:  # the student's reducer terms (not the teacher's)
            q1 = self.predictor(self.projector(self.model(v1)))
            q2 = self.predictor(self.projector(self.model(v2)))
        with torch.no_grad():
            k1 = self.teacher["projector"](self.teacher["model"](v1))
            k2 = self.teacher["projector"](self.teacher["model"](v2))
        contrastive = mocov3_loss(q1.float(), q2.float(), k1.float(), k2.float(), self.temperature)
        aux, row = reducer_terms(records, self.aux_loss_weight)
        return {"loss": contrastive if aux is None else contrastive + aux, "contrastive_loss": contrastive.detach(),
                **row}


@register_task("mocov3")
class MoCoV3Task(SSLTask):
    """--task mocov3: MoCo v3 (momentum encoder, symmetric InfoNCE), evaluated by kNN."""

    Config = MoCoV3Config
    views_per_sample = 2

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        add_knn_flags(add)
        add("--moco-momentum", type=float, help="the momentum encoder's momentum at the start, cosine to 1 (0.99)")
        add("--moco-temperature", type=float, help="InfoNCE temperature (0.2)")
        add("--moco-mlp-dim", type=int, help="projector / predictor hidden width (4096)")
        add("--moco-dim", type=int, help="projected feature width (256)")
        add("--moco-freeze-patch-embed", action=argparse.BooleanOptionalAction,
            help="keep the trunk's patch embedding at its random initialisation, untrained: the paper's random "
                 "patch projection (sec. 4.2), which stabilises ViT training (default on, as its ViT recipe)")

    @classmethod
    def check(cls, cfg: MoCoV3Config) -> None:
        check_knn(cfg)
        if not 0.0 <= cfg.moco_momentum <= 1.0 or not cfg.moco_temperature > 0:
            raise ValueError(f"--moco-momentum {cfg.moco_momentum} must be in [0, 1] and --moco-temperature "
                             f"{cfg.moco_temperature} > 0")

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.module = MoCoV3Module(self.model, self.cfg, spec.aux_loss_weight, spec.input_dtype)
        # before the engine: the teacher is frozen (no optimizer state) and starts as the student
        self.teacher = MomentumTeacher(self.module.student(), self.module.teacher, self.cfg.moco_momentum, 1)

    def views(self) -> MultiView:
        return mocov3_views(self.size, MEAN, STD)

    def schedules(self, total_steps: int) -> dict[str, Any]:
        self.teacher.total_steps = total_steps  # the cosine spans the run
        return {**super().schedules(total_steps), "momentum_encoder": self.teacher}
