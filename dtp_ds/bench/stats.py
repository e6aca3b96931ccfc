"""The statistics every comparison tool reports through (scipy.stats; no hand-written tables).

- :func:`mean_ci`: an arm's mean over seeds and its 95% t interval;
- :func:`paired_diff`: an arm's difference to a reference arm over the seeds both ran, its t
  interval, and ``separated`` only where that interval excludes zero (:func:`welch_diff` is the
  unpaired counterpart, for comparison);
- :func:`median_ci`: the median of step times and a bootstrap interval, resampling whole repeats
  (separate processes) when the times come grouped by repeat;
- :func:`compare`: the JSON every tool writes (per-seed values, ``*_mean``, ``*_ci95``, and per
  pair ``*_diff_mean``, ``*_diff_ci95``, ``*_separated``), :func:`separation_lines` its summary;
- :func:`time_to_target`: sustained time to a target (the first evaluation after which the curve
  stays at or above it) beside the first touch;
- :func:`overhead_ratios`: a method's one-off cost charged to its time to target;
- :func:`correlation_from_sums`: Pearson's r over paired values given as all-reducible sums, with
  its Fisher-z interval.

An interval prints as ``mean +- half-width (n)`` (:func:`fmt`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval over ``n`` values (lo/hi nan when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width; for an asymmetric (bootstrap) one the longer side."""
        return max(self.mean - self.lo, self.hi - self.mean)

    def excludes(self, value: float = 0.0) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi)) and (value < self.lo or value > self.hi)

    def as_list(self) -> list[float | None]:
        return [_json_float(self.lo), _json_float(self.hi)]


def _json_float(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` and its t interval (Student's t, n - 1 degrees of freedom)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(NAN, NAN, NAN, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, NAN, NAN, n)
    if np.all(x == x[0]):  # no spread: scipy's interval is nan; the data say the value is exact
        return Interval(mean, mean, mean, n)
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), n)


def correlation_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float,
                          confidence: float = CONFIDENCE) -> Interval:
    """Pearson's r of ``n`` pairs (x, y) given their sums, sums of squares and of products (so
    ranks can all-reduce them), with the Fisher-z interval ``tanh(atanh(r) +- z / sqrt(n - 3))``
    (the normal approximation for r; nan for n < 4 or a constant x or y)."""
    if n < 2:
        return Interval(NAN, NAN, NAN, int(n))
    vx, vy = sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
    if vx <= 1e-12 * max(1.0, sxx / n) or vy <= 1e-12 * max(1.0, syy / n):
        return Interval(NAN, NAN, NAN, int(n))
    r = max(-1.0, min(1.0, (sxy / n - sx * sy / n ** 2) / math.sqrt(vx * vy)))
    if n < 4 or abs(r) == 1.0:
        return Interval(r, NAN, NAN, int(n))
    z, half = math.atanh(r), stats.norm.ppf(0.5 + confidence / 2) / math.sqrt(n - 3)
    return Interval(r, math.tanh(z - half), math.tanh(z + half), int(n))


@dataclass(frozen=True)
class Diff:
    """``arm`` minus ``reference`` over the ``seeds`` both have."""

    arm: str
    reference: str
    interval: Interval
    seeds: tuple[Any, ...]

    @property
    def separated(self) -> bool:
        return self.interval.excludes(0.0)


def paired_diff(arm: Mapping[Any, float], reference: Mapping[Any, float], arm_name: str = "arm",
                reference_name: str = "reference", confidence: float = CONFIDENCE) -> Diff:
    """Per-seed differences ``arm[s] - reference[s]`` over the seeds both ran, and their t
    interval: a per-seed effect both arms share (the seed's data order, its initialisation)
    cancels."""
    seeds = tuple(s for s in arm if s in reference and arm[s] is not None and reference[s] is not None)
    return Diff(arm_name, reference_name, mean_ci([arm[s] - reference[s] for s in seeds], confidence), seeds)


def welch_diff(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Unpaired difference of means ``mean(a) - mean(b)`` with Welch's t interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    mean = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return Interval(mean, NAN, NAN, min(len(x), len(y)))
    ci = stats.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
    return Interval(mean, float(ci.low), float(ci.high), min(len(x), len(y)))


def median_ci(values: Sequence[float] | Sequence[Sequence[float]], confidence: float = CONFIDENCE,
              n_resamples: int = 2000, seed: int = 0) -> Interval:
    """Median and a percentile-bootstrap interval (scipy.stats.bootstrap).

    ``values`` flat: the values are resampled (``n`` = their count). ``values`` grouped (a list
    per repeat, e.g. the step times of one process each): whole repeats are resampled and the
    median of the pooled values taken, so the spread between processes is in the interval
    (``n`` = the number of repeats)."""
    groups = [np.asarray(g, dtype=float) for g in values] if values and np.ndim(values[0]) else None
    if groups is None:
        x = np.asarray(values, dtype=float)
        if len(x) < 2 or np.all(x == x[0]):
            m = float(np.median(x)) if len(x) else NAN
            return Interval(m, m if len(x) > 1 else NAN, m if len(x) > 1 else NAN, len(x))
        res = stats.bootstrap((x,), np.median, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", rng=np.random.default_rng(seed))
        return Interval(float(np.median(x)), float(res.confidence_interval.low),
                        float(res.confidence_interval.high), len(x))
    groups = [g for g in groups if len(g)]
    pooled = np.concatenate(groups) if groups else np.asarray([])
    m = float(np.median(pooled)) if len(pooled) else NAN
    if len(groups) < 2:
        return Interval(m, NAN, NAN, len(groups))

    def pooled_median(idx: np.ndarray) -> float:
        return float(np.median(np.concatenate([groups[int(i)] for i in idx])))

    res = stats.bootstrap((np.arange(len(groups)),), pooled_median, confidence_level=confidence,
                          n_resamples=n_resamples, method="percentile", vectorized=False,
                          rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return Interval(m, min(lo, m), max(hi, m), len(groups))


def fmt(iv: Interval, spec: str = "{:.2f}") -> str:
    """``mean +- half-width (n)``; ``mean (n)`` where no interval exists (one value)."""
    if iv.n == 0 or math.isnan(iv.mean):
        return "-"
    if math.isnan(iv.half_width):
        return f"{spec.format(iv.mean)} ({iv.n})"
    return f"{spec.format(iv.mean)} +- {spec.replace('+', '').format(iv.half_width)} ({iv.n})"


def compare(per_seed: Mapping[str, Mapping[str, Mapping[Any, float]]], keys: Sequence[str],
            reference: str | None = None, confidence: float = CONFIDENCE) -> dict[str, dict[str, Any]]:
    """The JSON of a comparison. ``per_seed[arm][key][seed]``: one value per seed (None: the arm
    has none). Per arm and key: ``key`` (the per-seed values, seed -> value), ``key_mean``,
    ``key_ci95`` [lo, hi]; for arms other than ``reference`` (default: the first arm) and keys
    the reference has: ``key_diff_mean``, ``key_diff_ci95``, ``key_separated`` (the paired
    difference arm - reference over shared seeds)."""
    arms = list(per_seed)
    reference = arms[0] if reference is None and arms else reference
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        row: dict[str, Any] = {"arm": arm, "reference": reference}
        for key in keys:
            vals = {s: v for s, v in per_seed[arm].get(key, {}).items() if v is not None}
            if not vals:
                continue
            iv = mean_ci(list(vals.values()), confidence)
            row[key] = {str(s): v for s, v in vals.items()}
            row[f"{key}_mean"], row[f"{key}_ci95"], row[f"{key}_n"] = _json_float(iv.mean), iv.as_list(), iv.n
            ref_vals = per_seed[reference].get(key, {}) if reference in per_seed else {}
            if arm != reference and ref_vals:
                d = paired_diff(vals, ref_vals, arm, reference, confidence)
                if d.interval.n:
                    row[f"{key}_diff_mean"] = _json_float(d.interval.mean)
                    row[f"{key}_diff_ci95"] = d.interval.as_list()
                    row[f"{key}_separated"] = d.separated
        out[arm] = row
    return out


def interval_of(row: Mapping[str, Any], key: str, diff: bool = False) -> Interval:
    """The :class:`Interval` of ``key`` (or of its difference to the reference) in a row of :func:`compare`."""
    name = f"{key}_diff" if diff else key
    if f"{name}_mean" not in row or row[f"{name}_mean"] is None:
        return Interval(NAN, NAN, NAN, 0)
    lo, hi = (NAN if v is None else v for v in row[f"{name}_ci95"])
    n = len(row[key]) if isinstance(row.get(key), Mapping) else row.get(f"{key}_n", 0)
    return Interval(row[f"{name}_mean"], lo, hi, n)


def separation_lines(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[tuple[str, str, str]]) -> list[str]:
    """One line per (arm, key) difference to the reference: ``separated`` (95% interval excludes 0)
    or ``not separated``. ``keys``: (key, label, format)."""
    lines = []
    for arm, row in rows.items():
        if arm == row.get("reference"):
            continue
        for key, label, spec in keys:
            if f"{key}_diff_mean" not in row:
                continue
            iv = interval_of(row, key, diff=True)
            verdict = "separated" if row[f"{key}_separated"] else "not separated"
            interval = (f"[{spec.format(iv.lo)}, {spec.format(iv.hi)}] over {iv.n} seeds" if not math.isnan(iv.lo)
                        else f"over {iv.n} seed: no interval")
            lines.append(f"{arm} - {row['reference']}, {label}: {spec.format(iv.mean)} {interval}: {verdict}")
    return lines


def time_to_target(times: Sequence[float], values: Sequence[float], target: float
                   ) -> tuple[float | None, float | None]:
    """(sustained, first touch): the time of the first evaluation after which ``values`` stay
    at or above ``target`` to the end of the run, and of the first evaluation at or above it;
    None where never."""
    first = next((t for t, v in zip(times, values) if v >= target), None)
    sustained = None
    for t, v in zip(reversed(times), reversed(values)):
        if v < target:
            break
        sustained = t
    return sustained, first


def overhead_ratios(time_to_target_s: float | None, baseline_time_s: float, overhead_s: float) -> dict[str, Any]:
    """A method's one-off cost counted: ``ratio`` = (time to target + overhead) / the baseline's
    time, ``ratio_without_overhead`` = time to target / the baseline's time, and
    ``payback_baseline_s``: the baseline time to target at which the overhead is paid back,
    overhead / (1 - ratio_without_overhead), assuming the time ratio holds at other run
    lengths (None where the method saves no time, or never reaches the target)."""
    if time_to_target_s is None or not baseline_time_s:
        return {"ratio": None, "ratio_without_overhead": None, "payback_baseline_s": None}
    without = time_to_target_s / baseline_time_s
    saved = 1.0 - without
    return {"ratio": (time_to_target_s + overhead_s) / baseline_time_s, "ratio_without_overhead": without,
            "payback_baseline_s": (overhead_s / saved if saved > 0 else None) if overhead_s else 0.0}


def per_seed_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str, str]],
                   extra: Callable[[Mapping[str, Any]], dict[str, str]] | None = None) -> list[dict[str, str]]:
    """Rows of formatted cells ``mean +- half-width (n)`` for :func:`dtp_ds.bench.markdown_table`
    (every column's format then "{}")."""
    out = []
    for arm, row in rows.items():
        cells: dict[str, str] = {"arm": arm}
        for key, _, spec in columns:
            if key == "arm":
                continue
            if f"{key}_mean" in row:
                cells[key] = fmt(interval_of(row, key), spec)
            elif row.get(key) is not None and not isinstance(row[key], Mapping):
                cells[key] = row[key] if isinstance(row[key], str) else spec.format(row[key])
        if extra:
            cells.update(extra(row))
        out.append(cells)
    return out
