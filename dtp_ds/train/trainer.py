"""The Trainer: one DeepSpeed engine over a task's module, and everything that happens
around an optimizer step (see ``dtp_ds/train/README.md``).

It owns the engine, the :class:`~dtp_ds.train.checkpoint.TrainState`, the guards
(:mod:`dtp_ds.train.guard`), the metrics logger and the schedules; the loop in
:func:`dtp_ds.train.main.train` only feeds it batches:

    for batch in loader:
        if trainer.step(batch):  # True once the run's last step is done
            break
    trainer.end_epoch(epoch)

``step`` hands one loader batch to the run's :class:`BatchStep`: :class:`PlainStep` (one
micro-batch: forward, backward, engine step) or, under ``--accum-freq``,
:class:`~dtp_ds.train.gradcache.GradCacheStep` (one contrastive batch in chunks); once an
optimizer step is done ``after_step`` does the step's one all-reduce, the accounting, logging,
checks, schedules and periodic save.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm import tqdm

from dtp_ds.models.reducers import declared_stats
from dtp_ds.train import checkpoint
from dtp_ds.train.checkpoint import TrainState
from dtp_ds.train.guard import BadDataGuard, NonFiniteGuard, TrainingError, all_reduce_step
from dtp_ds.train.metrics import MetricsLogger, loss_scale, param_fingerprints, peak_memory_gb, plot_loss_curve
from dtp_ds.train.schedule import Schedules

log = logging.getLogger("dtp_ds.train")


@dataclass
class TrainerConfig:
    """The run settings the Trainer acts on."""

    run_dir: str
    accum: int  # loader batches per optimizer step
    global_batch: int
    last_step: int  # the step the run stops after
    batches_per_epoch: int  # micro-batches per rank per epoch
    log_every: int
    save_every: int  # 0: epoch ends only
    keep_checkpoints: int
    eval_every_epochs: int  # 0: never
    eval_batch_size: int
    eval_max_images: int | None
    eval_workers: int  # image-decoding processes of the evaluation
    missing_shards: int
    views_per_sample: int = 1  # the task's image views per sample: forward_passes = samples seen x this


def engine_step(engine) -> None:
    try:
        engine.step()
    except Exception as e:  # DeepSpeed's dynamic loss scaler gives up with a bare Exception
        if "loss scale already at minimum" in str(e):
            raise TrainingError("fp16: the dynamic loss scale reached its minimum and the gradients still "
                                "overflow: lower --lr, set --grad-clip-norm, or train in bf16") from e
        raise


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


class BatchStep(Protocol):
    def __call__(self, inputs: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], float | None]:
        """Forward, backward and engine steps of one loader batch (host tensors by name), in
        optimizer step ``step`` (1-based): its row terms (device tensors) and the LR of the
        optimizer step it completed (None when it completed none)."""
        ...


class PlainStep:
    """One micro-batch: its own loss (a contrastive batch of micro x world samples); the engine
    steps once every ``gradient_accumulation_steps`` of them."""

    def __init__(self, engine, nonfinite: NonFiniteGuard, device: torch.device) -> None:
        self.engine, self.nonfinite, self.device = engine, nonfinite, device

    def __call__(self, inputs: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], float | None]:
        out = self.engine({k: t.to(self.device, non_blocking=True) for k, t in inputs.items()})
        out["loss"] = self.nonfinite.loss(out["loss"], step)
        self.engine.backward(self.nonfinite.backward_loss(out["loss"]))
        lr = current_lr(self.engine) if self.engine.is_gradient_accumulation_boundary() else None
        engine_step(self.engine)
        return out, lr


class Trainer:
    def __init__(self, cfg: TrainerConfig, task: Any, engine, state: TrainState, logger: MetricsLogger,
                 nonfinite: NonFiniteGuard, bad_data: BadDataGuard, splits: list, client: dict[str, Any],
                 schedules: Schedules, device: torch.device, rank: int, saved_at: int = -1,
                 stepper: BatchStep | None = None) -> None:
        self.cfg, self.task, self.engine, self.state = cfg, task, engine, state
        self.stepper = stepper or PlainStep(engine, nonfinite, device)
        self.logger, self.nonfinite, self.bad_data = logger, nonfinite, bad_data
        self.splits, self.client, self.schedules = splits, client, schedules
        self.device, self.rank = device, rank
        self.saved_at, self.evaluated_at = saved_at, -1
        self.sums: dict[str, torch.Tensor | float] = {}
        self.step_begun = False  # the current optimizer step's before_step has run
        # the statistics the task's reducers declare: read under those names only
        self.reducer_stats = declared_stats(task.module)
        self.last_train: dict[str, float] = {}  # the last step's means of those statistics
        self.bar = tqdm(total=cfg.last_step, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True)
        self.restart_timer()

    @property
    def done(self) -> bool:
        return self.state.step >= self.cfg.last_step

    def restart_timer(self) -> None:
        """Start timing the next step here (after a save or an evaluation, not across them)."""
        self.t_step, self.t_data, self.t_cpu = time.time(), 0.0, time.process_time()

    def waited_for_data(self, seconds: float) -> None:
        self.t_data += seconds

    def step(self, batch: tuple[torch.Tensor, ...]) -> bool:
        """One loader batch: ``(*tensors in task.batch_keys order, bad counts)``. True when the
        run's last optimizer step is done."""
        *tensors, bad = batch
        self.bad_data.add(bad)
        if not self.step_begun:  # the first loader batch of an optimizer step: set its hyperparameters
            self.schedules.before_step(self.state, self.engine.optimizer.param_groups)
            self.step_begun = True
        out, lr = self.stepper(dict(zip(self.task.batch_keys, tensors)), self.state.step + 1)
        for k, v in out.items():  # summed on the device: no host synchronisation per micro-batch
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double().reshape(())
        self.state.batches_in_epoch += 1
        if lr is not None:
            self.after_step(lr)
        return self.done

    def after_step(self, lr: float) -> None:
        """Accounting, logging, checks, schedules and the periodic save of one optimizer step."""
        st, cfg = self.state, self.cfg
        st.step += 1
        self.step_begun = False
        step_time, step_cpu_time = time.time() - self.t_step, time.process_time() - self.t_cpu
        # one small collective per step: rank-mean losses and the bad-data counts
        means, bad_counts = all_reduce_step(self.sums, cfg.accum, self.bad_data.take(), self.device)
        self.sums = {}
        self.last_train.update({k: float(means[k]) for k in self.reducer_stats if k in means})
        st.samples_seen += cfg.global_batch
        self.bad_data.account(st, bad_counts)
        st.nonfinite_steps += self.nonfinite.account(st.step, means["loss"])
        if st.step % cfg.log_every == 0 or st.step in (1, cfg.last_step) or self.nonfinite.in_a_row:
            self.log_step(means, lr, step_time, step_cpu_time)
        self.bad_data.check(st)
        self.nonfinite.check(st.step)
        self.schedules.step(st)
        self.bar.update(1)
        if cfg.save_every and st.step % cfg.save_every == 0:
            self.save()
        self.restart_timer()

    def log_step(self, means: dict[str, float], lr: float, step_time: float, step_cpu_time: float) -> None:
        st = self.state
        rec = {"step": st.step, "epoch": st.epoch, **means, "lr": lr, "grad_norm": self.nonfinite.grad_norm(),
               "skipped_steps": self.engine.skipped_steps, "nonfinite_steps": st.nonfinite_steps,
               "samples_per_s": self.cfg.global_batch / step_time, "step_time": step_time,
               "step_cpu_time": step_cpu_time,
               "data_time": self.t_data, "peak_mem_gb": peak_memory_gb(), "samples_seen": st.samples_seen,
               "forward_passes": st.samples_seen * self.cfg.views_per_sample,
               "bad_samples": st.bad_samples, "bad_by_kind": dict(st.bad_by_kind),
               "missing_shards": self.cfg.missing_shards, **self.schedules.metrics(st.step)}
        scale = loss_scale(self.engine)
        if scale is not None:
            rec["loss_scale"] = scale
        self.logger.log({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in rec.items()})
        self.bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2e}")

    def end_epoch(self, epoch: int) -> None:
        """After an epoch's loader: if it ran to its end, save and (every N epochs) evaluate."""
        st = self.state
        if st.batches_in_epoch < self.cfg.batches_per_epoch:
            return  # stopped inside the epoch (--max-steps)
        st.epoch, st.batches_in_epoch = epoch + 1, 0
        self.save()
        if self.cfg.eval_every_epochs and st.epoch % self.cfg.eval_every_epochs == 0:
            self.evaluate()
        self.restart_timer()

    def save(self) -> None:
        self.nonfinite.check_params(self.state.step)  # never commit broken weights
        client = {**self.client, "schedules": self.schedules.state_dict()}
        checkpoint.save(self.engine, self.cfg.run_dir, self.state, client, self.cfg.keep_checkpoints)
        self.saved_at = self.state.step

    def evaluate(self) -> None:
        if not self.splits or self.cfg.eval_every_epochs == 0:
            return
        t0 = time.time()
        res, lines = self.task.evaluate(self.splits, self.device, self.cfg.eval_batch_size, self.cfg.eval_max_images,
                                        self.cfg.eval_workers)
        # the reducers' statistics of the last training step, next to evaluation's (train_compression, ...)
        training = ", ".join(f"{k} {v:.2f}" for k, v in self.last_train.items())
        if self.rank == 0:
            for line in lines:
                self.bar.write(f"{line} @ step {self.state.step}" + (f" (training {training})" if training else ""))
        res.update({f"train_{k}": v for k, v in self.last_train.items()})
        res.update(step=self.state.step, epoch=self.state.epoch, eval_time=time.time() - t0,
                   split=self.splits[0].name)
        self.logger.log(res)
        self.evaluated_at = self.state.step

    def finish(self) -> None:
        """The final save and evaluation (unless the last step just had them) and the final row."""
        st = self.state
        self.bar.close()
        if self.saved_at != st.step:
            self.save()
        if self.evaluated_at != st.step:
            self.evaluate()
        prints = param_fingerprints(self.engine, self.device)
        self.logger.log({"step": st.step, "final": True, "param_fingerprint_by_rank": prints,
                         "params_finite": all(math.isfinite(v) for row in prints for v in row),
                         "samples_seen": st.samples_seen, "bad_samples": st.bad_samples,
                         "bad_by_kind": dict(st.bad_by_kind), "nonfinite_steps": st.nonfinite_steps})
        if self.rank == 0:
            plot_loss_curve(self.logger.path, os.path.join(self.cfg.run_dir, "loss.png"))
        self.logger.close()
