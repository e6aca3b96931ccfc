"""Guards of the training loop: non-finite steps and bad data.

**Non-finite steps.** A step whose loss or gradient is not finite must change nothing:
no parameter, no optimizer moment, no LR-schedule step. DeepSpeed already discards such a
step in every optimizer wrapper it builds (the ZeRO 1-3 optimizers, its bf16 and fp16
wrappers: they all-reduce the gradient norm, find it inf/NaN, zero the gradients, count
``engine.skipped_steps`` and do not step the LR scheduler), except for a plain torch
optimizer (ZeRO stage 0 in fp32), which :class:`_FiniteStep` covers the same way. Two cases
would still slip through: a loss that is non-finite while its gradients are finite (an
``inf`` constant term), and a non-finite loss on one rank only. So the guard back-propagates
``loss * NaN`` whenever a rank's loss is not finite: every gradient of that rank becomes NaN,
the collective norm check sees it on every rank, and all ranks skip the same step, which keeps
ZeRO's partitioned optimizer states in step. Under fp16, overflow skips with a finite loss
are the dynamic loss scale's business (counted in ``skipped_steps``, not here); a step with a
non-finite loss counts in every precision. ``--max-nonfinite-steps`` such steps in a row stop
the run: nothing of them was applied, so every checkpoint holds good weights (and before each
save the weights are checked to be finite: no checkpoint of broken weights is ever committed).

**Bad data.** Per step, one all-reduce carries the loss terms and the data loader's bad
counts per kind (:data:`dtp_ds.data.shards.BAD_KINDS`); each rank warns once per shard it
found damaged. The run stops when the bad fraction exceeds ``--max-bad-fraction``:
undecodable or incomplete samples over the samples read (once at least
:data:`MIN_SAMPLES_FOR_FRACTION` were read, or a whole epoch), plus the samples lost with
broken shards over the samples the epochs so far planned (a broken shard's loss arrives at
once; counted against the samples read it would stop a run at its first broken shard).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from dtp_ds.data.shards import BAD_KINDS, SAMPLE_KINDS, BadCounts
from dtp_ds.train import faults
from dtp_ds.train.checkpoint import latest_tag

log = logging.getLogger("dtp_ds.train")
MIN_SAMPLES_FOR_FRACTION = 1000


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad samples, non-finite steps, ...); the message says why."""


class _FiniteStep:
    """``optimizer.step`` for a plain torch optimizer that DeepSpeed does not guard: skips
    the update when any gradient is non-finite (decided with an all-reduce, so every rank
    agrees) and reports it through ``optimizer.overflow``, which the engine reads to count
    the skip and hold the LR schedule, as it does for its own wrappers.

    It also reports the gradient norm (``optimizer._global_grad_norm``, which the engine
    copies after the step), as DeepSpeed's wrappers do: the norm before clipping, taken from
    the engine's own clipping (whose result DeepSpeed discards on this path), else computed
    here. The gradients are already all-reduced, so the local norm is the global one."""

    def __init__(self, engine):
        self.engine, self.optimizer = engine, engine.optimizer
        self.inner = self.optimizer.step
        self.optimizer.overflow = False
        self.optimizer.step = self
        self.clipped_norm: torch.Tensor | None = None
        engine.clip_fp32_gradients = self._clip

    def _clip(self) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_

        self.clipped_norm = clip_grad_norm_(parameters=list(self.engine.module.parameters()),
                                            max_norm=self.engine.gradient_clipping(), mpu=self.engine.mpu)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros(1, device=device)
        norm = torch.zeros((), device=device)
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).float()
            bad[0] = (~torch.isfinite(norms).all()).float()
            norm = torch.linalg.vector_norm(norms)
        if self.clipped_norm is not None:
            norm, self.clipped_norm = self.clipped_norm, None
        self.optimizer._global_grad_norm = float(norm)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.optimizer.overflow = bool(bad.item())
        if self.optimizer.overflow:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        return self.inner(*args, **kwargs)


class NonFiniteGuard:
    """Skips and counts non-finite steps; stops after ``max_in_a_row`` of them in a row."""

    def __init__(self, engine, precision: str, max_in_a_row: int, rank: int, ckpt_root: str):
        self.engine, self.precision, self.max_in_a_row = engine, precision, max_in_a_row
        self.rank, self.ckpt_root = rank, ckpt_root
        self.inject_steps, self.inject_ranks = faults.nonfinite_injection()
        self.in_a_row = 0
        self.first_of_run: int | None = None
        self._skipped = engine.skipped_steps
        if not hasattr(engine.optimizer, "overflow"):
            _FiniteStep(engine)
        # DeepSpeed 0.19's engine.backward applies the loss scale for its ZeRO optimizers only:
        # under ZeRO-0 in fp16, its FP16_(Unfused)Optimizer unscales gradients that were never
        # scaled (updates 2^16 times too small, no overflow ever seen). Scale them here.
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        opt = engine.optimizer
        self.scale_loss = (engine.fp16_enabled() and not isinstance(opt, ZeROOptimizer)
                           and hasattr(getattr(opt, "loss_scale_config", None), "cur_scale"))
        self._scale = 1.0

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The micro-batch loss of optimizer step ``step`` (1-based), with the fault hook's
        ``+inf`` where :data:`dtp_ds.train.faults.NONFINITE_ENV` asks for it."""
        if step in self.inject_steps and (self.inject_ranks is None or self.rank in self.inject_ranks):
            return loss + float("inf")
        return loss

    def backward_loss(self, loss: torch.Tensor, whole: torch.Tensor | None = None) -> torch.Tensor:
        """What to back-propagate: ``loss`` (times the fp16 loss scale where the engine does
        not apply it), or ``loss * NaN`` when it, or the ``whole`` step's loss it is a part of
        (GradCache: a chunk's share), is not finite. Chosen on the device: no host
        synchronisation per micro-batch (the step's one is in :func:`all_reduce_step`)."""
        finite = torch.isfinite(loss.detach()).all()
        if whole is not None:
            finite = finite & torch.isfinite(whole.detach()).all()
        keep = torch.where(finite, 1.0, float("nan")).to(loss.dtype)
        if self.scale_loss:
            self._scale = float(self.engine.optimizer.loss_scale_config.cur_scale)  # a Python float
            loss = loss.float() * self._scale
        return loss * keep

    def grad_norm(self) -> float | None:
        """The engine's gradient norm of the last step, unscaled (DeepSpeed's ZeRO-0 fp16
        wrappers report it times the loss scale)."""
        norm = self.engine.get_global_grad_norm()
        if norm is None or not self.scale_loss:
            return norm
        norm = float(norm)
        return norm / self._scale if math.isfinite(norm) else norm

    def check_params(self, step: int) -> None:
        """Before a checkpoint: refuse to write non-finite weights (collective; each rank checks
        its own parameters, or its ZeRO-3 partitions). Skipped steps change nothing, so this
        only fires if an *applied* update overflowed."""
        tensors = [t for p in self.engine.module.parameters() if (t := getattr(p, "ds_tensor", p)).numel()]
        device = tensors[0].device if tensors else self.engine.device
        ok = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all() if tensors else torch.tensor(True)
        bad = (~ok).float().reshape(1).to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise TrainingError(f"step {step}: the parameters are no longer finite, so no checkpoint is written; the "
                                f"last good one is {latest_tag(self.ckpt_root) or 'none yet'} in {self.ckpt_root}. "
                                f"Lower --lr or set --grad-clip-norm, then --resume latest")

    def account(self, step: int, mean_loss: float) -> int:
        """Book-keeping after optimizer step ``step`` (the same on every rank: the skip was
        decided collectively and ``mean_loss`` is all-reduced): 1 if it was non-finite."""
        skipped = self.engine.skipped_steps > self._skipped
        self._skipped = self.engine.skipped_steps
        nonfinite = not math.isfinite(mean_loss) or (skipped and self.precision != "fp16")
        if not nonfinite:
            self.in_a_row = 0
            return 0
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_of_run = step
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning("step %d: non-finite %s; the step was skipped (%d in a row, limit %d)", step,
                        f"loss ({mean_loss})" if not math.isfinite(mean_loss) else "gradients", self.in_a_row,
                        self.max_in_a_row)
        return 1

    def check(self, step: int) -> None:
        """Raise :class:`TrainingError` at ``max_in_a_row`` non-finite steps in a row."""
        if self.in_a_row >= self.max_in_a_row:
            latest = latest_tag(self.ckpt_root)
            raise TrainingError(
                f"{self.in_a_row} non-finite steps in a row (steps {self.first_of_run}-{step}: inf/NaN loss or "
                f"gradients), limit --max-nonfinite-steps {self.max_in_a_row}; none of them was applied. The last "
                f"good checkpoint is {latest or 'none yet'} in {self.ckpt_root}. Lower --lr, set --grad-clip-norm, "
                f"or check the data near those steps, then --resume latest")


class BadDataGuard:
    """Counts, warns about and limits bad data (see the module docstring)."""

    def __init__(self, max_fraction: float, epoch_samples: int):
        self.max_fraction, self.epoch_samples = max_fraction, max(1, epoch_samples)
        self.pending: dict[str, int] = {}
        self.warned: set[str] = set()

    def add(self, bad: BadCounts) -> None:
        """This rank's skipped items of one micro-batch; warns once per damaged shard."""
        for kind, n in bad.counts.items():
            self.pending[kind] = self.pending.get(kind, 0) + n
        for shard, why in bad.first.items():
            if shard not in self.warned:
                self.warned.add(shard)
                log.warning("bad data in shard %s (%s): skipped and counted; further ones in it are only counted",
                            shard, why)

    def take(self) -> list[float]:
        """This rank's counts since the last step, in :data:`BAD_KINDS` order (then reset)."""
        out = [float(self.pending.get(k, 0)) for k in BAD_KINDS]
        self.pending = {}
        return out

    def fraction(self, state) -> float:
        by = state.bad_by_kind
        sample_bad = sum(by.get(k, 0) for k in SAMPLE_KINDS)
        read = state.samples_seen + sample_bad
        floor = min(MIN_SAMPLES_FOR_FRACTION, self.epoch_samples)
        planned = self.epoch_samples * (state.epoch + 1)
        return sample_bad / max(read, floor) + by.get("lost_in_shards", 0) / planned

    def account(self, state, reduced: list[float]) -> None:
        """Add one step's all-reduced counts to ``state``."""
        for kind, n in zip(BAD_KINDS, reduced):
            if n:
                state.bad_by_kind[kind] = state.bad_by_kind.get(kind, 0) + int(n)
        state.bad_samples = sum(state.bad_by_kind.get(k, 0) for k in (*SAMPLE_KINDS, "lost_in_shards"))

    def check(self, state) -> None:
        """Raise :class:`TrainingError` past ``--max-bad-fraction``."""
        by = state.bad_by_kind
        frac = self.fraction(state)
        if frac > self.max_fraction:
            detail = ", ".join(f"{k} {by[k]}" for k in BAD_KINDS if by.get(k))
            raise TrainingError(f"bad data: {100 * frac:.1f}% of the data could not be used ({detail}; "
                                f"{state.samples_seen} samples trained), above --max-bad-fraction "
                                f"{self.max_fraction}: fix or remove the shards named in the warnings, or raise "
                                f"--max-bad-fraction")


def all_reduce_step(sums: dict[str, torch.Tensor | float], accum: int, bad: list[float], device: torch.device
                    ) -> tuple[dict[str, float], list[float]]:
    """One collective per step: the rank-mean of the loss terms (``sums`` over ``accum``
    micro-batches, device tensors: read back here, once per step) and the bad-data counts
    summed over ranks."""
    keys = sorted(sums)
    terms = [torch.as_tensor(sums[k], dtype=torch.float64, device=device).reshape(()) / accum for k in keys]
    red = torch.cat([torch.stack(terms) if terms else torch.zeros(0, dtype=torch.float64, device=device),
                     torch.tensor(bad, dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(red)
    world = dist.get_world_size() if dist.is_initialized() else 1
    vals = red.tolist()
    return {k: vals[i] / world for i, k in enumerate(keys)}, vals[len(keys):]
