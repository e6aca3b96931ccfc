"""``--seqcomp-schedule FILE|SPEC``: which seqcomp strategy the image trunk trains under at
each stage of training, as a :class:`~dtp_ds.train.schedule.Schedule` the Trainer steps after
every optimizer step and saves in the checkpoint.

A schedule is a list of segments, each a fraction of the run's optimizer steps (the steps the LR
curve spans, ``--epochs``) with a strategy (:class:`~dtp_ds.models.seqcomp.SeqComp`):

- SPEC: ``FRACTION:STRATEGY`` joined by ``;``; a STRATEGY is ``none`` or comma-joined
  ``r=RATE`` (token-drop rate in [0, 1)), ``p=PATCH`` (patch size), ``cost=C`` (the step's cost
  in units of a full-sequence step, e.g. from a measured cost table), e.g.
  ``"0.5:r=0.5,p=16;0.3:r=0.25;0.2:none"``.
- FILE (``*.json``, what the schedule estimator writes): ``{"segments": [{"fraction": 0.5,
  "r": 0.5, "p": 16, "cost": 0.31}, ...]}`` (``r``, ``p``, ``cost`` optional; other top-level
  keys are kept for the reader, ignored here).

The fractions must be positive and sum to at most 1; what they leave is a final **full-sequence**
segment (evaluation runs full-sequence, so training ends so by default). Fractions that sum to 1
say otherwise: the last segment given is the last one run (``"1:r=0.5"``: constant dropout).

Segment ``i`` covers the steps ``[round(S c_{i-1}), round(S c_i))`` of ``S`` steps (``c_i`` the
cumulative fractions). Cost units: a full-sequence step costs 1, a seqcomp one its ``cost``
or else the image tower's estimated FLOP fraction
(:func:`~dtp_ds.models.seqcomp.image_tower_cost`: the text tower has no seqcomp, so
the whole step saves less: the Amdahl limit).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dtp_ds.models.seqcomp import NONE, SeqComp, image_tower_cost

SPEC_HELP = "e.g. '0.5:r=0.5,p=16;0.3:r=0.25;0.2:none'"


@dataclass(frozen=True)
class Segment:
    fraction: float
    strategy: SeqComp = NONE
    cost: float | None = None  # measured cost per step (full-sequence step = 1); None: estimated

    def describe(self) -> str:
        """The SPEC form of this segment (``0.5:r=0.5,p=16``, ``0.2:none``)."""
        parts = ([] if self.strategy == NONE else [self.strategy.describe()]) + \
            ([] if self.cost is None else [f"cost={self.cost:.10g}"])
        return f"{self.fraction:.10g}:{','.join(parts) or 'none'}"


def _strategy(text: str, where: str) -> tuple[SeqComp, float | None]:
    text = text.strip()
    if text in ("none", ""):
        return NONE, None
    rate, patch, cost = 0.0, None, None
    for item in text.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        try:
            if not eq:
                raise ValueError
            if key == "r":
                rate = float(value)
            elif key == "p":
                patch = int(value)
            elif key == "cost":
                cost = float(value)
            else:
                raise KeyError(key)
        except KeyError:
            raise ValueError(f"{where}: unknown key {key!r} in {text!r}; a strategy is 'none' or comma-joined "
                             f"r=RATE, p=PATCH, cost=C") from None
        except ValueError:
            raise ValueError(f"{where}: {item.strip()!r} is not KEY=NUMBER (r=0.5, p=16, cost=0.4)") from None
    try:
        return SeqComp(rate, patch), cost
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _checked(segments: list[Segment], source: str) -> list[Segment]:
    if not segments:
        raise ValueError(f"{source}: no segments; give at least one FRACTION:STRATEGY ({SPEC_HELP})")
    for i, seg in enumerate(segments):
        if not (seg.fraction > 0 and math.isfinite(seg.fraction)):
            raise ValueError(f"{source}: segment {i + 1} has fraction {seg.fraction}; each fraction of training "
                             f"must be > 0")
        if seg.cost is not None and not (seg.cost > 0 and math.isfinite(seg.cost)):
            raise ValueError(f"{source}: segment {i + 1} has cost {seg.cost}; a cost (full-sequence step = 1) must "
                             f"be > 0")
    total = sum(s.fraction for s in segments)
    if total > 1 + 1e-6:
        raise ValueError(f"{source}: the fractions sum to {total:g} > 1; they are fractions of the whole run: "
                         f"scale them down (what they leave under 1 trains full-sequence)")
    if total < 1 - 1e-6:
        segments = [*segments, Segment(1.0 - total)]
    return segments


def parse_spec(text: str) -> list[Segment]:
    """The SPEC form (see module doc) -> segments (a final full-sequence one added where the
    fractions leave room)."""
    segments = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        frac, colon, strat = part.partition(":")
        where = f"--seqcomp-schedule segment {i + 1} ({part.strip()!r})"
        if not colon:
            raise ValueError(f"{where}: write FRACTION:STRATEGY ({SPEC_HELP})")
        try:
            fraction = float(frac)
        except ValueError:
            raise ValueError(f"{where}: {frac.strip()!r} is not a fraction of training") from None
        strategy, cost = _strategy(strat, where)
        segments.append(Segment(fraction, strategy, cost))
    return _checked(segments, f"--seqcomp-schedule {text!r}")


def _from_json(path: str) -> list[Segment]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--seqcomp-schedule {path}: cannot read it as JSON ({e})") from None
    rows = data.get("segments") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"--seqcomp-schedule {path}: expected {{\"segments\": [{{\"fraction\": F, \"r\": R, "
                         f"\"p\": P, \"cost\": C}}, ...]}}")
    segments = []
    for i, row in enumerate(rows):
        where = f"--seqcomp-schedule {path} segment {i + 1}"
        unknown = sorted(set(row) - {"fraction", "r", "p", "cost"}) if isinstance(row, dict) else None
        if unknown is None or unknown or "fraction" not in row:
            raise ValueError(f"{where}: {row!r}; a segment has 'fraction' and optionally 'r', 'p', 'cost'"
                             + (f" (unknown: {unknown})" if unknown else ""))
        try:
            strategy = SeqComp(float(row.get("r") or 0.0), None if row.get("p") is None else int(row["p"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        cost = None if row.get("cost") is None else float(row["cost"])
        segments.append(Segment(float(row["fraction"]), strategy, cost))
    return _checked(segments, f"--seqcomp-schedule {path}")


def load_schedule(arg: str) -> list[Segment]:
    """A schedule file (``*.json`` or an existing path) or a SPEC string -> segments."""
    if arg.endswith(".json") or os.path.isfile(arg):
        return _from_json(arg)
    return parse_spec(arg)


def load_costs(path: str) -> dict[tuple[float, int | None], float]:
    """A ``tools/seqcomp_costs`` table's ``cost`` per strategy, keyed ``(r, p)`` with ``p``
    None for the table model's stored patch size (as :class:`SeqComp` holds the full-sequence
    patch)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("strategies"), list):
        raise ValueError(f"{path}: not a cost table of tools/seqcomp_costs (no 'strategies' list)")
    stored = data.get("patch_size")
    table = {}
    for row in data["strategies"]:
        p = None if row.get("p") is None or row.get("p") == stored else int(row["p"])
        s = SeqComp(float(row.get("r") or 0.0), p)
        cost = float(row["cost"])
        if not (cost > 0 and math.isfinite(cost)):
            raise ValueError(f"{path}: strategy {s.describe()} has cost {cost}; a cost must be > 0")
        table[(round(s.rate, 9), p)] = cost
    return table


def cost_of(table: dict[tuple[float, int | None], float], s: SeqComp, stored: int | None) -> float | None:
    """``s``'s cost in a :func:`load_costs` table for a trunk of patch size ``stored`` (None
    where the table lacks it)."""
    return table.get((round(s.rate, 9), None if s.patch == stored else s.patch))


def with_costs(segments: Sequence[Segment], table_path: str, stored: int | None = None) -> list[Segment]:
    """``segments`` with each one that has no ``cost`` given its strategy's measured cost from a
    ``tools/seqcomp_costs`` table (``--seqcomp-costs``; the identity costs 1); a strategy
    the table lacks is refused by name."""
    table = load_costs(table_path)
    if stored is None:  # the table model's patch size: p=stored in a schedule is the stored patch
        with open(table_path) as f:
            stored = json.load(f).get("patch_size")
    out = []
    for seg in segments:
        s = seg.strategy
        cost = seg.cost if seg.cost is not None else (1.0 if s == NONE else cost_of(table, s, stored))
        if cost is None:
            have = ", ".join(SeqComp(r, p).describe() for r, p in table) or "none"
            raise ValueError(f"--seqcomp-costs {table_path}: no measured cost for {s.describe()} (it has: "
                             f"{have}); measure it with tools/seqcomp_costs or give cost= in the schedule")
        out.append(Segment(seg.fraction, s, cost))
    return out


def segment_ends(segments: Sequence[Segment], total_steps: int) -> list[int]:
    """The step each segment ends before (the last one: ``total_steps``)."""
    ends, cum = [], 0.0
    for seg in segments:
        cum += seg.fraction
        ends.append(int(round(total_steps * cum)))
    ends[-1] = total_steps
    return ends


class SeqCompSchedule:
    """Sets each segment's strategy on the image trunks (``set_seqcomp``) for the steps it
    covers; its position, boundaries and costs are saved (exact on resume at any step)."""

    def __init__(self, segments: Sequence[Segment], trunks: Sequence[Any], total_steps: int,
                 spec: str = "") -> None:
        if not trunks:
            raise ValueError("--seqcomp-schedule needs a dtp_ds image trunk (a model whose config has trunk_cfg "
                             "or reducer_cfg, e.g. PatchStem-ViT-Tiny-8 or a DRIP model); open_clip's own ViT has none")
        self.segments, self.trunks, self.spec = list(segments), list(trunks), spec
        for trunk in self.trunks:  # refuse a strategy a trunk cannot run before the first step
            for seg in self.segments:
                trunk.check_seqcomp(seg.strategy)
        self.ends = segment_ends(self.segments, total_steps)
        self.total_steps = total_steps
        self.costs = [seg.cost if seg.cost is not None else image_tower_cost(self.trunks[0], seg.strategy)
                      for seg in self.segments]
        self.step_done = 0
        self._apply()

    def describe(self) -> list[str]:
        return [s.describe() for s in self.segments]

    def index_at(self, step: int) -> int:
        """The segment that step ``step`` (0-based: ``step`` steps done before it) runs in."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)

    def strategy_at(self, step: int) -> SeqComp:
        return self.segments[self.index_at(step)].strategy

    def cost_units(self, steps: int) -> float:
        """The cost of the first ``steps`` steps (a full-sequence step = 1)."""
        total, start = 0.0, 0
        for end, cost in zip(self.ends, self.costs):
            n = max(0, min(steps, end) - start)
            total += n * cost
            start = end
        return total + max(0, steps - self.ends[-1]) * self.costs[-1]

    def _apply(self) -> None:
        strategy = self.strategy_at(self.step_done)
        for trunk in self.trunks:
            trunk.set_seqcomp(strategy)

    def step(self, state: Any) -> None:
        self.step_done = state.step
        self._apply()

    def metrics(self, step: int) -> dict[str, Any]:
        """The row entries of step ``step`` (1-based, just done): its strategy and cost, the cost
        units of all steps so far."""
        i = self.index_at(step - 1)
        strategy = self.segments[i].strategy
        return {"seqcomp_r": strategy.rate, "seqcomp_p": strategy.patch_or(self.trunks[0].patch_size),
                "seqcomp_cost": self.costs[i], "cost_units": self.cost_units(step)}

    def state_dict(self) -> dict[str, Any]:
        return {"step_done": self.step_done, "segments": self.describe(), "ends": list(self.ends),
                "costs": list(self.costs), "total_steps": self.total_steps,
                "cost_units": self.cost_units(self.step_done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["segments"] != self.describe():
            saved = ";".join(state["segments"])
            raise ValueError(f"--seqcomp-schedule {';'.join(self.describe())!r} differs from the checkpoint's "
                             f"{saved!r}: resume with --seqcomp-schedule '{saved}' (the schedule it was "
                             f"trained on), or start a new run")
        # the saved boundaries and costs go on (another world size changes the steps of an epoch)
        self.ends, self.costs = list(state["ends"]), list(state["costs"])
        self.total_steps, self.step_done = state["total_steps"], state["step_done"]
        self._apply()
