"""``--init-from``: the task's model starts from another model's weights, mapped into its trunk
by :mod:`dtp_ds.models.adapters`, before the engine wraps it (so ZeRO-3 partitions the loaded
weights). The table of what was loaded, mapped, resized or left fresh is printed and written
to ``RUN/init_from.txt``.

A resumed run does not apply it: the checkpoint holds the whole model (the warm-started
weights as trained since), so it replaces any warm start; the first start's table stays in
the run directory. ``--resume latest`` with no checkpoint yet starts fresh, warm-started.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dtp_ds.models.adapters import STATUSES, Row, counts, format_table, read_state_dict, warm_start
from dtp_ds.train.args import ConfigError

log = logging.getLogger("dtp_ds.train")
TABLE = "init_from.txt"


@dataclass
class InitFrom:
    source: str
    rows: list[Row] = field(default_factory=list)
    skipped: str = ""  # why the warm start was not applied (a resume)

    def summary(self) -> dict:
        """What config.json records."""
        return {"source": self.source, "applied": not self.skipped, "counts": counts(self.rows),
                "note": self.skipped}

    def write(self, run_dir: str) -> None:
        """RUN/init_from.txt: the full table (one row per weight), with what each status means."""
        if not self.rows:
            return
        legend = "\n".join(f"# {k}: {v}" for k, v in STATUSES.items())
        with open(os.path.join(run_dir, TABLE), "w") as f:
            f.write(f"# --init-from {self.source}: {counts(self.rows)}\n{legend}\n{format_table(self.rows)}\n")


def check_source(path: str) -> None:
    """Refuse a source that is not there, before anything is written."""
    if not os.path.exists(path):
        raise ConfigError(f"--init-from {path}: no such file or directory (give a weights file: open_clip or timm "
                          f"state dict, .pt/.bin/.safetensors, or a dtp_ds run / checkpoint directory)")


def read_source(path: str) -> dict[str, torch.Tensor]:
    """A weights file, or a dtp_ds run / checkpoint directory (its fp32 weights, any ZeRO stage)."""
    if os.path.isdir(path):
        from dtp_ds.train.export import load_model_from_checkpoint

        return load_model_from_checkpoint(path)[0].state_dict()
    return read_state_dict(path)


def apply(model: nn.Module, path: str, resume_from: tuple[str, str] | None, rank: int) -> InitFrom:
    """Warm-start ``model`` from ``path`` unless the run resumes (see module doc)."""
    if resume_from is not None:
        why = f"resumed from {os.path.join(*resume_from)}, whose weights replace the warm start"
        if rank == 0:
            log.warning("--init-from %s: not applied: %s", path, why)
        return InitFrom(path, skipped=why)
    try:
        rows = warm_start(model, read_source(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--init-from {path}: {e}") from e
    if rank == 0:
        log.info("--init-from %s: %s\n%s", path, counts(rows), format_table(rows, collapse=True))
    return InitFrom(path, rows)
