"""Numbers read back from a run directory's ``metrics.jsonl``. Standard library only: the
tuner and the FLOP counter both read it."""
from __future__ import annotations

import json
import os


def boundary_rate_arg(arg: str | None) -> float | None:
    """``--boundary-rate``: a number, or a run directory / ``metrics.jsonl``: the boundary rate
    its last evaluation ran at (``zeroshot_boundary_rate``, the rate the deterministic eval rule
    gives), else (runs without an evaluation) the mean of the last logged training rates. A torn
    last line (a run killed mid-write) is skipped."""
    if arg is None:
        return None
    try:
        return float(arg)
    except ValueError:
        pass
    path = os.path.join(arg, "metrics.jsonl") if os.path.isdir(arg) else arg
    rows = []
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    evals = [r["zeroshot_boundary_rate"] for r in rows if "zeroshot_boundary_rate" in r]
    if evals:
        return evals[-1]
    rates = [r["boundary_rate"] for r in rows if "boundary_rate" in r]
    if not rates:
        raise ValueError(f"--boundary-rate {arg}: no boundary_rate logged in {path}")
    return sum(rates[-10:]) / len(rates[-10:])
