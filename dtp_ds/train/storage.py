"""Start-up checks of the output directory: that it can be written, and that it has room for
the checkpoints the run will write, estimated from the parameter count, the precision and
the ZeRO stage. A run that would die at its first (or its Kth) checkpoint is refused before
it trains, and before it writes anything.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any

from dtp_ds.train.args import ConfigError
from dtp_ds.train.checkpoint import checkpoint_root, gather_errors, list_checkpoints

# Room for config.json, metrics.jsonl, loss.png, wandb's offline files.
LOGS_MARGIN = 16 << 20


def checkpoint_bytes(n_params: int, precision: str, zero_stage: int) -> int:
    """Estimated size of one checkpoint, all ranks' files together, with AdamW: fp32 master
    weights and two moments (12 bytes per parameter; 8 under ZeRO-0 in fp32, where the module
    is the master), plus the module weights in the model precision (4 or 2 bytes per parameter)
    except under ZeRO-3, whose module file holds placeholders. Within 1% of the real size on
    the tiny models for every stage and precision; 2% and 1 MiB are added."""
    optimizer = 8 if (precision == "fp32" and zero_stage == 0) else 12
    module = 0 if zero_stage == 3 else (4 if precision == "fp32" else 2)
    return int(n_params * (optimizer + module) * 1.02) + (1 << 20)


def _multiples(every: int, after: int, upto: int) -> int:
    return upto // every - after // every if every > 0 else 0


def saves_planned(done: int, last: int, save_every: int, steps_per_epoch: int) -> int:
    """Checkpoints written from step ``done`` to ``last``: every ``save_every`` steps, at each
    epoch end, and at the end."""
    if last <= done:
        return 0
    both = math.lcm(save_every, steps_per_epoch) if save_every > 0 and steps_per_epoch > 0 else 0
    n = _multiples(save_every, done, last) + _multiples(steps_per_epoch, done, last) - _multiples(both, done, last)
    on_grid = (save_every > 0 and last % save_every == 0) or (steps_per_epoch > 0 and last % steps_per_epoch == 0)
    return n + (0 if on_grid else 1)


def bytes_needed(ckpt: int, saves: int, existing: int, keep: int) -> int:
    """Free space the run needs: a new checkpoint is written before the oldest beyond ``keep``
    is removed, so up to ``keep + 1`` exist at once; ``existing`` are already on disk."""
    if saves == 0:
        return LOGS_MARGIN
    return ckpt * min(saves, max(1, keep + 1 - existing)) + LOGS_MARGIN


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_output_dir(run_dir: str, need: int, what: str) -> str | None:
    """Why ``run_dir`` cannot take this run (None: it can). Writes (and removes) one probe file
    in the nearest existing directory; ``what`` describes the estimate for the message."""
    d = os.path.abspath(run_dir)
    while not os.path.lexists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        return f"output directory {run_dir}: {d} is not a directory, so the run directory cannot be created there"
    try:
        fd, probe = tempfile.mkstemp(prefix=".dtp_ds_write_probe.", dir=d)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return f"output directory {run_dir} is not writable ({d}: {e.strerror or e}): pick another --logs"
    free = shutil.disk_usage(d).free
    if free < need:
        return (f"output directory {run_dir} is nearly full: {_gb(free)} free on its filesystem, the run needs about "
                f"{_gb(need)} ({what}). Free space, lower --keep-checkpoints, or pick another --logs")
    return None


def check_storage(run_dir: str, ds_config: dict[str, Any], n_params: int, precision: str, keep: int,
                  saves: int) -> None:
    """Refuse (ConfigError on every rank) an output directory that cannot be written or has
    no room for the ``saves`` checkpoints this run will write. Collective: each rank checks
    its own view of the directory (node-local disks differ)."""
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    ckpt = checkpoint_bytes(n_params, precision, stage)
    need = bytes_needed(ckpt, saves, len(list_checkpoints(checkpoint_root(run_dir))), keep)
    what = (f"{saves} checkpoint(s) to write, keeping {keep}, each about {ckpt / 1e6:,.0f} MB: "
            f"{n_params / 1e6:,.1f}M parameters, {precision}, ZeRO stage {stage}")
    errors = gather_errors(check_output_dir(run_dir, need, what))
    if errors:
        raise ConfigError(next(iter(errors.values())))
