"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per logged step and per
evaluation), wandb when asked, and a loss-curve PNG at the end."""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


def peak_memory_gb() -> float:
    """Peak accelerator memory allocated by tensors; on CPU, the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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

            self.wandb = wandb.init(**wandb_cfg)

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
