"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per logged step and per
evaluation), ``config.json``, wandb when asked, and a loss-curve PNG at the end. Everything
written goes through :mod:`dtp_ds.train.redact` first.

``metrics.jsonl`` survives a ``kill -9``: a last line cut off mid-write is dropped when the
file is read (and when a resumed run rewrites the file up to its checkpoint's step).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from dtp_ds.train.checkpoint import write_atomic
from dtp_ds.train.redact import redact_obj

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def peak_memory_gb() -> float:
    """Peak accelerator memory allocated by tensors; on CPU, the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut off by a killed writer is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: line %d is not complete JSON (a writer killed mid-line?); skipped", path, i + 1)
    return out


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` (secrets redacted) as indented JSON at ``path``, replaced atomically."""
    write_atomic(path, json.dumps(redact_obj(obj), indent=2, default=str))


def loss_scale(engine) -> float | None:
    """The dynamic loss scale under fp16 (None otherwise)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", float("nan"))))


@torch.no_grad()
def param_fingerprints(engine, device: torch.device) -> list[list[float]]:
    """(sum, sum of squares) of the full parameters, as every rank holds them: equal rows
    mean the ranks agree. ZeRO-3 parameters are gathered first."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for p in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            x = p.detach().double()
            total += torch.stack([x.sum(), (x * x).sum()]).to(device)
    rows = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, total)
    return [r.tolist() for r in rows]


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl (rank 0 only; other ranks get a no-op logger)."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int | None = None,
                 wandb_cfg: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if wandb_cfg is not None:
            import wandb

            # no system metadata (it records the command line and environment details) and no
            # code or git snapshot: nothing that could carry a secret into the run directory
            settings = wandb.Settings(x_disable_meta=True, x_disable_machine_info=True, save_code=False,
                                      disable_git=True, x_save_requirements=False)
            self.wandb = wandb.init(**redact_obj(wandb_cfg), settings=settings)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed checkpoint: those steps are trained again, and the
        curve in the file stays a single line."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = redact_obj(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(metrics_path: str, out_png: str) -> None:
    """Loss (and LR) against step from a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss")
    if "contrastive_loss" in rows[0]:
        ax.plot(steps, [r["contrastive_loss"] for r in rows], label="contrastive loss", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="gray", linestyle="--", label="lr")
    ax2.set_ylabel("lr")
    ax.legend(loc="upper right")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
