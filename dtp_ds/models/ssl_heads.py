"""The heads augmentation-invariance pretraining puts on an image trunk's pooled embedding:
MoCo v3's projector and predictor, SimCLR's projector, DINO's head. Re-implemented from the
papers (MoCo v3: Chen, Xie, He 2021; SimCLR v1/v2: Chen et al. 2020; DINO: Caron et al. 2021).

Single-device code, as everything in dtp_ds.models: the BatchNorm layers are plain
``nn.BatchNorm1d``; the task converts them to batch statistics over every rank with
:func:`dtp_ds.tasks.ssl_losses.sync_batchnorm` (MoCo v3 and SimCLR synchronise BN across
devices: with a per-device batch of a few samples the statistics would be noise).

lightly (PyPI, MIT) ships these heads, but its wheel requires pytorch-lightning and hydra-core:
two frameworks this DeepSpeed trainer does not use, for a few dozen lines.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bn_mlp(in_dim: int, hidden: int, out: int, layers: int, last_bn: bool, last_bn_affine: bool = False
           ) -> nn.Sequential:
    """``layers`` bias-free linear layers (as MoCo v3's: a bias before BN is cancelled by it), each
    hidden one followed by BatchNorm and ReLU; the last optionally followed by BN (by default
    without affine: the output's scale is fixed before the loss normalises it)."""
    if layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {layers}")
    mods: list[nn.Module] = []
    dims = [in_dim] + [hidden] * (layers - 1) + [out]
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if not last:
            mods += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine))
    return nn.Sequential(*mods)


def mocov3_projector(in_dim: int, hidden: int = 4096, out: int = 256, layers: int = 3) -> nn.Sequential:
    """MoCo v3's ViT projector: 3 layers, BN after each hidden one and a final BN without affine."""
    return bn_mlp(in_dim, hidden, out, layers, last_bn=True)


def mocov3_predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    """MoCo v3's predictor: 2 layers, BN + ReLU after the hidden one, no BN on the output."""
    return bn_mlp(dim, hidden, dim, 2, last_bn=False)


def simclr_projector(in_dim: int, hidden: int = 2048, out: int = 128, layers: int = 2) -> nn.Sequential:
    """SimCLR's projector: 2 layers (v1) or 3 (v2), BN after every layer; the output's BN has no
    affine (SimCLR v2's output BN has no centring; the loss normalises the scale away)."""
    if layers not in (2, 3):
        raise ValueError(f"SimCLR's projector has 2 (v1) or 3 (v2) layers, got {layers}")
    return bn_mlp(in_dim, hidden, out, layers, last_bn=True)


class _NoGradient(torch.autograd.Function):
    """The identity whose gradient is zero: what it gates takes part in the backward (ZeRO's
    hooks see a gradient for every trained parameter) but is given nothing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation (Salimans & Kingma 2016): each output
    row is ``g * v / |v|``. Written out rather than ``torch.nn.utils.parametrizations.weight_norm``
    so that its two tensors are plain parameters, which ZeRO-3 partitions and an EMA teacher
    updates like any other. ``fixed_norm``: ``g`` stays 1 and is not trained (DINO's
    ``norm_last_layer``, which it recommends for stability).

    ``frozen`` (not module state; a schedule sets it): its parameters get zero gradients, while
    the input still gets its own (DINO's ``freeze_last_layer``: its first epoch cancels the last
    layer's gradients)."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's initialisation
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)
        self.frozen = False

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        return F.linear(x, _NoGradient.apply(w) if self.frozen and w.requires_grad else w)


class DINOHead(nn.Module):
    """DINO's head: an MLP (``layers`` linear layers with GELU, optional BN) to a ``bottleneck``
    embedding, L2-normalised, then a weight-normalised linear layer to ``out_dim`` prototypes
    (65536 in the paper; a tiny run uses far fewer)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINO's head needs at least one layer, got {layers}")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # DINO's initialisation of its MLP
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fixed_norm=norm_last_layer)
        # its own optimizer groups (dtp_ds.tasks.param_groups): frozen, it takes no update at all
        self.last_layer.own_param_group = "last_layer"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(z)
