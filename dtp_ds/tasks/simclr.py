"""``--task simclr``: SimCLR (Chen et al. 2020) pretraining of the image trunk, re-implemented from
the paper: two views from one augmentation distribution (:func:`dtp_ds.data.views.simclr_views`),
a projector with BatchNorm synchronised across ranks, and NT-Xent over the 2N projected views of
the global batch (gathered from every rank with their gradients). Evaluated by kNN.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtp_ds.data.views import MultiView, simclr_views
from dtp_ds.models import record_forward
from dtp_ds.models.ssl_heads import simclr_projector

from . import TaskSpec, reducer_terms, register_task
from .ssl import MEAN, STD, KnnConfig, SSLTask, add_knn_flags, check_knn
from .ssl_losses import nt_xent, sync_batchnorm


@dataclass
class SimCLRConfig(KnnConfig):
    """``--task simclr``'s settings."""

    simclr_temperature: float = 0.1
    simclr_mlp_dim: int = 2048  # the projector's hidden width
    simclr_dim: int = 128  # the projected feature width
    simclr_layers: int = 2  # projector layers: 2 (SimCLR) or 3 (SimCLR v2)
    simclr_color_strength: float = 1.0  # colour distortion strength s


class SimCLRModule(nn.Module):
    """Trunk + projector + NT-Xent: ``{"view1", "view2"}`` -> ``{"loss", "contrastive_loss", ...}``."""

    def __init__(self, trunk: nn.Module, cfg: SimCLRConfig, aux_loss_weight: float, input_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = trunk
        self.projector = sync_batchnorm(simclr_projector(trunk.num_features, cfg.simclr_mlp_dim, cfg.simclr_dim,
                                                         cfg.simclr_layers))
        self.temperature, self.aux_loss_weight, self.input_dtype = cfg.simclr_temperature, aux_loss_weight, input_dtype

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with record_forward() as records:
            z1, z2 = (self.projector(self.model(batch[k].to(self.input_dtype))) for k in ("view1", "view2"))
        contrastive = nt_xent(z1.float(), z2.float(), self.temperature)
        aux, row = reducer_terms(records, self.aux_loss_weight)
        return {"loss": contrastive if aux is None else contrastive + aux, "contrastive_loss": contrastive.detach(),
                **row}


@register_task("simclr")
class SimCLRTask(SSLTask):
    """--task simclr: SimCLR (NT-Xent over 2N views), evaluated by kNN."""

    Config = SimCLRConfig
    views_per_sample = 2

    @classmethod
    def add_flags(cls, add: Callable[..., Any]) -> None:
        add_knn_flags(add)
        add("--simclr-temperature", type=float, help="NT-Xent temperature (0.1)")
        add("--simclr-mlp-dim", type=int, help="projector hidden width (2048)")
        add("--simclr-dim", type=int, help="projected feature width (128)")
        add("--simclr-layers", type=int, choices=[2, 3], help="projector layers: 2 (SimCLR) or 3 (SimCLR v2)")
        add("--simclr-color-strength", type=float, help="colour distortion strength (1.0)")

    @classmethod
    def check(cls, cfg: SimCLRConfig) -> None:
        check_knn(cfg)
        if not cfg.simclr_temperature > 0 or cfg.simclr_color_strength < 0:
            raise ValueError(f"--simclr-temperature {cfg.simclr_temperature} must be > 0 and --simclr-color-strength "
                             f"{cfg.simclr_color_strength} >= 0")

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.module = SimCLRModule(self.model, self.cfg, spec.aux_loss_weight, spec.input_dtype)

    def views(self) -> MultiView:
        return simclr_views(self.size, MEAN, STD, self.cfg.simclr_color_strength)
