"""The cross-rank half of augmentation-invariance pretraining: the losses of MoCo v3, SimCLR and
DINO over batches gathered from every rank, and BatchNorm with statistics over every rank.
Re-implemented from the papers (MoCo v3: Chen, Xie, He 2021; SimCLR: Chen et al. 2020; DINO:
Caron et al. 2021); MoCo v3's reference code is CC-BY-NC and was not copied.

Here rather than in dtp_ds.models: model code is single-device and cross-rank work lives in the
loss (tests/unit/test_layering.py). Every function works without a process group (one rank).

Gradients across ranks: DeepSpeed averages parameter gradients over ranks, so the objective is
the mean of the ranks' losses. Each rank's loss here is the mean over its own anchors (queries,
samples) against the whole gathered batch, and the collectives send gradients back to the rank
whose samples produced them (summed), so two ranks train exactly what one rank does on the
concatenated batch (tests/unit/test_ssl_heads_losses.py checks losses, outputs and gradients).

lightly (PyPI, MIT) ships these losses, but its wheel requires pytorch-lightning and hydra-core:
two frameworks this DeepSpeed trainer does not use.

``torch.nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU", torch
2.15), and the CPU runs (gloo) train the same models: :class:`SyncBatchNorm1d` all-reduces the
batch moments with autograd itself, on any device.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of the ranks' output
    gradients (each rank's output feeds that rank's loss)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's ``(n, ...)`` tensor in rank order; the gradient of this
    rank's block is the sum over ranks of their gradients for it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, differentiable (``x`` itself on one rank)."""
    return _AllReduceSum.apply(x) if rank_world()[1] > 1 else x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated in rank order, differentiable."""
    return _AllGather.apply(x) if rank_world()[1] > 1 else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, detached (MoCo's keys)."""
    if rank_world()[1] == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(rank_world()[1])]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch over every rank: the moments
    are all-reduced (count and sum, then the centred sum of squares: two passes, no cancellation)
    with autograd through the reduction. Eval mode, and a single rank, are plain BatchNorm1d.
    Computed in fp32 whatever the module's dtype; the running statistics as BatchNorm's (the
    unbiased variance of the global batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.track_running_stats and rank_world()[1] == 1:
            # fp32 whatever the module's dtype: a 16-bit module may hold fp32 buffers (DeepSpeed
            # casts the parameters), which torch's CPU batch_norm refuses to mix
            def f32(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.float()

            use_batch = self.training or not self.track_running_stats
            return F.batch_norm(x.float(), f32(self.running_mean) if not use_batch else None,
                                f32(self.running_var) if not use_batch else None, f32(self.weight), f32(self.bias),
                                use_batch, 0.0, self.eps).to(x.dtype)
        if x.dim() not in (2, 3):
            raise ValueError(f"SyncBatchNorm1d expects (N, C) or (N, C, L) input, got {tuple(x.shape)}")
        flat = x.float().transpose(0, 1).reshape(x.shape[1], -1) if x.dim() == 3 else x.float().t()  # (C, M)
        count = all_reduce_sum(flat.new_tensor([float(flat.shape[1])]))
        mean = all_reduce_sum(flat.sum(1)) / count
        centred = flat - mean[:, None]
        var = all_reduce_sum((centred * centred).sum(1)) / count
        y = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.affine:
            y = y * self.weight.float()[:, None] + self.bias.float()[:, None]
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(count))
        y = y.t() if x.dim() == 2 else y.reshape(x.shape[1], x.shape[0], x.shape[2]).transpose(0, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / max(count - 1.0, 1.0)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d`` replaced by a :class:`SyncBatchNorm1d` holding the
    same parameters and buffers (on one rank too: its fp32 arithmetic is what a 16-bit module
    needs). Call before the engine wraps the module. The state dict keys do not change, so a
    checkpoint resumes at any world size."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        sync = SyncBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child))
    return module


def infonce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss of this rank's queries ``q`` (N, D) against the keys of every
    rank (``k`` (N, D) here, gathered without gradient: they come from the momentum encoder):
    cross-entropy of the cosine similarities / ``temperature``, the positive of query i the key
    at i + rank * N, times 2 * temperature (MoCo v3 scales it so: the gradient's size then
    depends less on the temperature). Every rank must pass the same N."""
    rank, _ = rank_world()
    q = F.normalize(q.float(), dim=1)
    keys = F.normalize(gather_no_grad(k).float(), dim=1)
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                temperature: float = 0.2) -> torch.Tensor:
    """The symmetric loss: each view's predictions against the other view's momentum keys."""
    return infonce(q1, k2, temperature) + infonce(q2, k1, temperature)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N projections of every rank's two views: each of this rank's
    2n anchors against all 2N - 1 others (cosine similarity / ``temperature``), its other view
    the positive; mean over this rank's anchors. The gathered projections carry gradient back to
    the rank that made them. Every rank must pass the same n."""
    rank, _ = rank_world()
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, D): this rank's anchors
    everyone = gather_with_grad(z)  # (W * 2n, D), rank blocks [z1_r; z2_r]
    own = torch.arange(2 * n, device=z.device) + rank * 2 * n
    self_pair = F.one_hot(own, everyone.shape[0]).bool()
    logits = (z @ everyone.t() / temperature).masked_fill(self_pair, float("-inf"))  # never one's own positive
    positive = own + torch.cat([torch.full((n,), n), torch.full((n,), -n)]).to(z.device)
    return F.cross_entropy(logits, positive)


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """DINO's teacher temperature at ``step``: linear from ``start`` to ``end`` over
    ``warmup_steps`` (DINO: 0.04 -> 0.07 over 30 epochs; a sharper teacher early keeps the
    training from collapsing to a uniform output), then ``end``."""
    if warmup_steps <= 0:
        return end
    return start + (end - start) * min(1.0, step / warmup_steps)


class DINOLoss(nn.Module):
    """DINO's loss: cross-entropy of each student crop's softmax (temperature ``student_temp``)
    against the centred, sharpened teacher softmax (``teacher_temp``, set by
    :class:`TeacherTemperature`) of every global crop but the same one, averaged over the pairs.

    The centre (a buffer: checkpointed with the module) is an EMA (``center_momentum``) of the
    teacher's mean output over the global batch (all-reduced), updated after each training
    forward; it stays fp32 whatever dtype the module is cast to (a bf16 EMA with momentum 0.9
    would round small moves away)."""

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.teacher_temp, self.center_momentum = student_temp, teacher_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def _apply(self, fn: Any, recurse: bool = True) -> DINOLoss:
        center = self.center
        super()._apply(fn, recurse)
        self.center = center.to(device=self.center.device, dtype=torch.float32)  # moves, never casts
        return self

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """``student``: one (B, K) output per crop, the global crops first; ``teacher``: one per
        global crop. The loss is this rank's mean over its B samples."""
        if len(student) < 2 or not 1 <= len(teacher) <= len(student):
            raise ValueError(f"DINO's loss needs the student's crops (global first) and the teacher's global crops, "
                             f"got {len(student)} and {len(teacher)}")
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        targets = [F.softmax((t.detach().float() - self.center) / self.teacher_temp, dim=-1) for t in teacher]
        terms = [-(q * log_p[v]).sum(-1).mean() for i, q in enumerate(targets) for v in range(len(log_p)) if v != i]
        loss = torch.stack(terms).mean()
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Sequence[torch.Tensor]) -> None:
        out = torch.cat([t.detach().float() for t in teacher])
        stats = torch.cat([out.sum(0), out.new_tensor([out.shape[0]])])
        if rank_world()[1] > 1:
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1])[None]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class TeacherTemperature:
    """DINO's teacher-temperature warm-up as a run schedule (``dtp_ds.train.schedule.Schedule``):
    after each optimizer step sets ``loss.teacher_temp`` for the next one; saved and restored
    with the checkpoint, so a resumed run continues the same curve."""

    def __init__(self, loss: DINOLoss, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> None:
        self.loss, self.warmup_steps, self.start, self.end = loss, warmup_steps, start, end
        self.steps = 0
        self.loss.teacher_temp = self.value(0)

    def value(self, step: int) -> float:
        return teacher_temperature(step, self.warmup_steps, self.start, self.end)

    def step(self, state: Any) -> None:
        self.steps = int(state.step)
        self.loss.teacher_temp = self.value(self.steps)

    def metrics(self, step: int) -> dict[str, float]:
        """The teacher temperature the last step trained with."""
        return {"teacher_temp": self.value(max(0, step - 1))}

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "start": self.start, "end": self.end, "steps": self.steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        mine = (self.warmup_steps, self.start, self.end)
        theirs = (saved["warmup_steps"], saved["start"], saved["end"])
        if mine != theirs:
            raise ValueError(f"the checkpoint's teacher-temperature warm-up (steps, start, end) {theirs} is not this "
                             f"run's {mine}: resume with the flags that drew it, or start a new run")
        self.steps = int(saved["steps"])
        self.loss.teacher_temp = self.value(self.steps)
