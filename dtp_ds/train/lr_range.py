"""The LR range test's arithmetic (Smith 2017; torch-lr-finder's and fastai's rules), apart
from any engine: the exponential ramp, the smoothed loss, the stop at divergence and the two
suggestions. :mod:`dtp_ds.train.lr_find` drives it through the DeepSpeed engine
(torch-lr-finder drives a bare optimizer and model, which ZeRO partitions and loss scaling
are not).

- ramp: step ``i`` of ``N`` trains at ``start * (end / start) ** (i / (N - 1))``;
- smoothing: ``s_i = w * loss_i + (1 - w) * s_{i-1}``, ``s_0 = loss_0`` (torch-lr-finder's
  ``smooth_f``, no bias correction);
- divergence: stop once ``s_i > diverge * min(s_0..s_i)``, or at a non-finite loss (not
  recorded: nothing after it means anything);
- "steepest": the LR at the most negative ``np.gradient`` of the smoothed losses, the first
  ``skip_start`` and last ``skip_end`` points left out (torch-lr-finder's ``plot(suggest_lr=True)``);
- "min/10": the LR of the lowest smoothed loss over the same points, divided by 10 (fastai's
  ``minimum`` rule).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RangeTestConfig:
    """The test's settings (``tools/lr_find`` flags: the field names with dashes)."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_steps: int = 100  # optimizer steps of the ramp (fewer if the loss diverges first)
    smooth: float = 0.05  # weight of the newest loss in the smoothed one (1: no smoothing)
    diverge: float = 5.0  # stop once the smoothed loss exceeds this multiple of its minimum so far
    skip_start: int = 10  # points left out of both suggestions at the low end ...
    skip_end: int = 5  # ... and at the high end (where the loss blows up)

    def check(self) -> None:
        if not 0 < self.start_lr < self.end_lr:
            raise ValueError(f"--start-lr {self.start_lr} and --end-lr {self.end_lr}: need 0 < start < end")
        if self.num_steps < 2:
            raise ValueError(f"--num-steps {self.num_steps}: need at least 2")
        if not 0 < self.smooth <= 1:
            raise ValueError(f"--smooth {self.smooth}: must be in (0, 1]")
        if self.diverge <= 1:
            raise ValueError(f"--diverge {self.diverge}: must be > 1")
        if self.skip_start < 0 or self.skip_end < 0:
            raise ValueError("--skip-start and --skip-end must be >= 0")


class ExponentialRamp:
    """The LR factor of step ``i`` relative to ``start_lr`` (a callable object for ``LambdaLR``)."""

    def __init__(self, cfg: RangeTestConfig) -> None:
        self.ratio, self.last = cfg.end_lr / cfg.start_lr, cfg.num_steps - 1

    def __call__(self, step: int) -> float:
        return self.ratio ** (min(step, self.last) / self.last)


@dataclass
class RangeTest:
    """Records (LR, loss) per optimizer step; :meth:`record` says when to stop."""

    cfg: RangeTestConfig
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # as measured (mean over ranks)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    def record(self, lr: float, loss: float) -> bool:
        """Add one step; True once the test is over (diverged, or the ramp's last step)."""
        if not math.isfinite(loss):
            self.stop_reason = f"diverged: non-finite loss at lr {lr:.3g}"
            return True
        smooth = loss if not self.smoothed else self.cfg.smooth * loss + (1 - self.cfg.smooth) * self.smoothed[-1]
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(smooth)
        best = min(self.smoothed)
        if smooth > self.cfg.diverge * best:
            self.stop_reason = (f"diverged: smoothed loss {smooth:.4g} > {self.cfg.diverge:g} x its minimum "
                                f"{best:.4g} at lr {lr:.3g}")
        elif len(self.lrs) >= self.cfg.num_steps:
            self.stop_reason = f"ramp done: {len(self.lrs)} steps"
        return self.done

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def window(self) -> tuple[int, int]:
        """The points the suggestions read: [first, last) after the skips."""
        return self.cfg.skip_start, len(self.smoothed) - self.cfg.skip_end

    def suggestions(self) -> dict[str, Any]:
        """``steepest`` and ``min_loss_over_10`` (LR or None) with ``why_none`` when too few points."""
        lo, hi = self.window()
        if hi - lo < 2:
            return {"steepest": None, "min_loss_over_10": None,
                    "why_none": f"{len(self.smoothed)} points, {self.cfg.skip_start} + {self.cfg.skip_end} skipped: "
                                f"too few left; raise --num-steps or lower --skip-start / --skip-end"}
        losses = np.asarray(self.smoothed[lo:hi])
        steep = lo + int(np.gradient(losses).argmin())
        lowest = lo + int(losses.argmin())
        return {"steepest": self.lrs[steep], "steepest_index": steep,
                "min_loss_over_10": self.lrs[lowest] / 10, "min_loss_index": lowest}

    def result(self) -> dict[str, Any]:
        return {**self.suggestions(), "stop_reason": self.stop_reason, "steps": len(self.lrs),
                "config": asdict(self.cfg), "lr": self.lrs, "loss": self.losses, "smoothed_loss": self.smoothed}


def plot(result: dict[str, Any], out_png: str, title: str = "") -> None:
    """Smoothed (and raw) loss against LR, log x, both suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lr"], result["loss"], color="lightgray", label="loss")
    ax.plot(result["lr"], result["smoothed_loss"], label="smoothed loss")
    marks = (("steepest", "steepest_index", "tab:red"), ("min_loss_over_10", "min_loss_index", "tab:green"))
    for key, index, color in marks:
        if result.get(key) is None:
            continue
        lr = result[key]
        label = "steepest gradient" if key == "steepest" else "minimum loss / 10"
        ax.axvline(lr, color=color, linestyle="--", label=f"{label}: {lr:.2e}")
        if key == "steepest":
            ax.plot([lr], [result["smoothed_loss"][result[index]]], "o", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    lo, hi = min(result["smoothed_loss"]), max(result["smoothed_loss"])
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
    ax.set_ylim(lo - pad, hi + pad)  # the smoothed curve's range: raw losses past divergence are clipped
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"LR range test ({result['stop_reason']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
