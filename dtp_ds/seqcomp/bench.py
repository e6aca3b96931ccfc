"""``tools/bench_seqcomp``: time to the full-sequence run's accuracy, per seqcomp strategy,
with every cost the method needs counted.

Arms, all the same model, task (``--task``, default ``clip``), data order, global batch and LR
recipe, each run under the ``deepspeed`` launcher at every seed of ``--seeds`` (a seed changes
initialisation and data order; all arms share each seed) and evaluated by the task every
``--eval-every`` steps (its data and evaluation in ``--data``: :mod:`dtp_ds.seqcomp.task_data`;
CLIP zero-shot on the captioned shards, an SSL task kNN on the class-labelled split, with
``--knn-bank-max-images`` of the training shards as the bank; the accuracy is the first of
:data:`ACCURACY_KEYS` the evaluation rows log: ``zeroshot_top1``, ``knn_top1``, ``val_top1``):

- ``baseline``: full-sequence, ``--steps`` steps;
- ``dropout``: token dropout at ``--constant-rate`` for the whole run;
- ``patch``: patch scaling to ``--constant-patch`` for the whole run;
- ``schedule``: the CA-MSE schedule (``--schedule FILE``, or chosen here by ``make demo-seqcomp``'s
  pipeline: pilot -> cost table -> estimator, at the arms' global batch).

**Time** is training time: the sum of the steps' logged ``step_time`` up to an evaluation (data
waits included; evaluation and checkpoint saves not), or with ``--clock cpu`` their
``step_cpu_time`` (rank 0's CPU time; the arms then run one thread per rank and the cost table
is timed the same way), which other jobs on a shared CPU do not inflate: use it with
``--nproc 1`` (a rank waiting for a peer in a collective may spin).

**Equal budgets in measured time**: an arm of mean step cost ``c`` (the cost table's, the
full-sequence remainder 1) is planned for ``--budget-margin x steps / c`` steps (its LR curve and
schedule span them), and only its evaluations within the baseline's measured training time on
the same seed count: each arm trains until its measured time reaches the baseline's.
``budget used`` is the share of the baseline's time an arm really trained (below 1: the cost
table promised more steps than fit).

**Target** = the baseline's final top-1 (of the task's accuracy), mean over seeds. **Time to
target** is *sustained*: the time of the first evaluation after which the arm stays at or above
the target for the rest of its budget (per seed; never: ``-``); the first evaluation touching it
stands beside it, labelled. The baseline's own time to target on a seed is its sustained time, or its whole
training time where it ends below the mean (the target is where its run ends).

**Every cost counted**: what choosing the schedule took (the pilot's training time, the cost
table, the estimator: ``overhead.json`` of the pipeline, or ``--overhead-s``) is charged to the
schedule arm: ``ratio`` = (time to target + overhead) / the baseline's time to target, per seed
then mean and 95% interval; ``ratio_without_overhead`` beside it, and the baseline run length
at which the overhead is paid back (overhead / (1 - ratio without it)).

Printed per arm: ``mean +- half-width (n)`` over seeds (95% t interval, :mod:`dtp_ds.bench.stats`)
of each column, then each arm's paired difference to the baseline in ratio and final top-1 and
whether it separates. Writes ``bench.{json,md,png}`` to ``--out`` (the PNG: mean top-1 against
mean training time, or with ``--x forward_passes`` against the image forward passes, in millions,
as the paper plots, with 95% error bars across seeds). An arm whose run directory holds a
finished run with the same reuse hash (arguments, the contents of the schedule, cost, model and
ds_config files, threads, code revision: :mod:`dtp_ds.bench.reuse`) is not trained again. The
machine's load average at each arm's start and end goes in the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dtp_ds.bench.stats import compare, fmt, interval_of, mean_ci, overhead_ratios, separation_lines, time_to_target
from dtp_ds.seqcomp.demo import add_pipeline_args, choose_schedule, parse_pipeline_args, train_run
from dtp_ds.seqcomp.task_data import task_data
from dtp_ds.train.metrics import read_metrics


@dataclass
class Arm:
    """One arm at one seed."""

    name: str
    spec: str  # --seqcomp-schedule (a file or SPEC); "" full-sequence
    mean_cost: float = 1.0
    schedule: str = "none"  # the segments (SPEC form, without costs)
    steps: int = 0
    load: list[float] = field(default_factory=list)  # 1-min load average at start and end
    # per evaluation: step, time_s, top1, top5 (of the task's accuracy key), forward_passes
    curve: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = float("nan")
    seed: int = 0


def mean_cost(spec: str, costs_json: str) -> tuple[float, str]:
    """The cost per step of a schedule averaged over the run (the full-sequence remainder costs 1),
    and the schedule in SPEC form."""
    from dtp_ds.train.seqcomp_schedule import load_schedule, with_costs

    if not spec:
        return 1.0, "none"
    segments = with_costs(load_schedule(spec), costs_json)
    covered = sum(s.fraction for s in segments)
    text = ";".join(f"{s.fraction:.3g}:{s.strategy.describe()}" for s in segments)
    return sum(s.fraction * s.cost for s in segments) + (1.0 - covered), text


# the evaluation rows' accuracy, by task: CLIP's zero-shot, the SSL tasks' kNN, classify's validation
ACCURACY_KEYS = ("zeroshot_top1", "knn_top1", "val_top1")
ACCURACY_NAMES = {"zeroshot_top1": "zero-shot", "knn_top1": "kNN", "val_top1": "validation"}


def accuracy_key(rows: Sequence[dict[str, Any]]) -> str:
    """The accuracy the arms are timed to: the first of :data:`ACCURACY_KEYS` in the first
    evaluation row (a row with any of them)."""
    for r in rows:
        found = [k for k in ACCURACY_KEYS if k in r]
        if found:
            return found[0]
    raise SystemExit(f"bench_seqcomp: no evaluation row with any of {', '.join(ACCURACY_KEYS)}: the arms must "
                     f"be evaluated (the task's evaluation flags, --eval-frequency 1)")


def curve(run_dir: str, key: str = "step_time") -> tuple[list[dict[str, float]], float, str]:
    """(step, cumulative training time, top-1, top-5, forward passes) at every evaluation; the
    whole training time; the accuracy key (:func:`accuracy_key`). ``key``: the row's step time
    (``step_time`` or ``step_cpu_time``)."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    step_time = {r["step"]: r[key] for r in rows if key in r}
    last = max(step_time)
    missing = [s for s in range(1, last + 1) if s not in step_time]
    if missing:
        raise SystemExit(f"bench_seqcomp: {run_dir} lacks step_time at steps {missing[:5]}...: "
                         f"the arms must log every step (--log-every-n-steps 1)")
    cum, t = {}, 0.0
    for s in range(1, last + 1):
        t += step_time[s]
        cum[s] = t
    acc = accuracy_key(rows)
    passes = {r["step"]: r["forward_passes"] for r in rows if "forward_passes" in r}
    evals = [{"step": r["step"], "time_s": cum[r["step"]], "top1": r[acc], "top5": r.get(acc.replace("top1", "top5")),
              "forward_passes": passes.get(r["step"])} for r in rows if acc in r]
    return evals, t, acc


def time_to(points: list[dict[str, float]], target: float) -> float | None:
    """The sustained time to ``target`` top-1 (:func:`dtp_ds.bench.stats.time_to_target`)."""
    return time_to_target([p["time_s"] for p in points], [p["top1"] for p in points], target)[0]


def within(points: list[dict[str, float]], budget_s: float) -> list[dict[str, float]]:
    """The evaluations inside the budget (a float sum's last ulp aside)."""
    return [p for p in points if p["time_s"] <= budget_s * (1 + 1e-9)]


KEYS = ["steps", "budget_used", "final_top1", "best_top1", "time_to_target_s", "time_to_target_first_s",
        "ratio", "ratio_without_overhead", "ratio_first", "payback_baseline_s"]


def summarize(arms: Sequence[Arm], overhead_s: float = 0.0, overhead_arm: str = "schedule") -> dict[str, Any]:
    """Per arm and seed within the baseline's budget, then over seeds (``compare``'s per-seed
    values, ``*_mean``, ``*_ci95`` and the paired differences to the baseline). ``overhead_s`` is
    charged to ``overhead_arm``. ``rows``: one per arm, the means under the plain names
    (``ratio``: None where the arm reached the target on no seed), the per-seed values under
    ``per_seed``."""
    names = list(dict.fromkeys(a.name for a in arms))
    base_name = names[0]
    base = {a.seed: a for a in arms if a.name == base_name}
    target = mean_ci([b.curve[-1]["top1"] for b in base.values()]).mean
    base_time = {}
    for s, b in base.items():
        reached = time_to(b.curve, target)
        base_time[s] = reached if reached is not None else b.train_time_s
    per_seed: dict[str, dict[str, dict[int, float | None]]] = {n: {k: {} for k in KEYS} for n in names}
    for arm in arms:
        if arm.seed not in base:
            continue
        budget = base[arm.seed].train_time_s
        pts = within(arm.curve, budget) if arm.name != base_name else arm.curve
        sustained, first = time_to_target([p["time_s"] for p in pts], [p["top1"] for p in pts], target)
        if arm.name == base_name:  # the baseline's time to target: where it stays at it, else its run's end
            sustained, first = base_time[arm.seed], first if first is not None else base_time[arm.seed]
        cost = overhead_s if arm.name == overhead_arm else 0.0
        r = overhead_ratios(sustained, base_time[arm.seed], cost)
        vals = {"steps": arm.steps, "budget_used": min(arm.train_time_s, budget) / budget,
                "final_top1": pts[-1]["top1"] if pts else None,
                "best_top1": max(p["top1"] for p in pts) if pts else None,
                "time_to_target_s": sustained, "time_to_target_first_s": first, "ratio": r["ratio"],
                "ratio_without_overhead": r["ratio_without_overhead"],
                "ratio_first": None if first is None else first / base_time[arm.seed],
                "payback_baseline_s": r["payback_baseline_s"] if cost else None}
        for k, v in vals.items():
            per_seed[arm.name][k][arm.seed] = v
    stats = compare(per_seed, KEYS, reference=base_name)
    rows = []
    for name in names:
        first = next(a for a in arms if a.name == name)
        st = stats[name]
        seeds = [a.seed for a in arms if a.name == name and a.seed in base]
        reached = sum(per_seed[name]["time_to_target_s"].get(s) is not None for s in seeds)
        ratio, without = interval_of(st, "ratio"), interval_of(st, "ratio_without_overhead")
        cost = overhead_s if name == overhead_arm else 0.0
        per = {k: v for k, v in st.items() if isinstance(v, dict)}  # the per-seed values
        row = {k: v for k, v in st.items() if k not in per}
        row.update({k: st.get(f"{k}_mean") for k in KEYS})  # the means under the plain names
        row.update(per_seed=per, arm=name, schedule=first.schedule, mean_cost=round(first.mean_cost, 4),
                   overhead_s=cost, reached=f"{reached}/{len(seeds)}",
                   train_time_s=mean_ci([a.train_time_s for a in arms if a.name == name]).mean,
                   ratio=ratio.mean if ratio.n else None, ratio_without_overhead=without.mean if without.n else None,
                   # on the mean ratio: the baseline time to target at which the overhead is paid back
                   payback_baseline_s=overhead_ratios(without.mean, 1.0, cost)["payback_baseline_s"]
                   if cost and without.n else None)
        rows.append(row)
    return {"target_top1": target, "baseline_time_to_target_s": mean_ci(list(base_time.values())).mean,
            "baseline_time_to_target_s_per_seed": {str(s): t for s, t in base_time.items()},
            "overhead_s": overhead_s, "seeds": sorted(base), "rows": rows, "arms": [asdict(a) for a in arms]}


COLUMNS = [("budget_used", "budget used", "{:.2f}"), ("final_top1", "final top-1", "{:.1f}"),
           ("time_to_target_s", "time to target s (sustained)", "{:.1f}"),
           ("time_to_target_first_s", "first touch s", "{:.1f}"),
           ("ratio", "ratio (with overhead)", "{:.2f}"), ("ratio_without_overhead", "ratio w/o overhead", "{:.2f}"),
           ("ratio_first", "first-touch ratio w/o overhead", "{:.2f}")]
SEPARATION = [("ratio", "ratio (with overhead)", "{:.2f}"), ("final_top1", "final top-1", "{:.1f}")]


def markdown(result: dict[str, Any]) -> str:
    head = ["arm", "schedule", "steps", "mean cost", "overhead s", *[h for _, h, _ in COLUMNS], "reached"]
    n = len(result.get("seeds", [])) or 1
    name = ACCURACY_NAMES.get(result.get("accuracy_key", "zeroshot_top1"), result.get("accuracy_key"))
    lines = [f"target: the baseline's final {name} top-1, mean over {n} seed(s): {result['target_top1']:.1f}%; "
             "cells: mean +- half-width of the 95% t interval (seeds); time to target: sustained (the first "
             "evaluation after which the arm stays at or above the target); ratio: (time to target + overhead) / "
             "the baseline's time to target", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["rows"]:
        cells = [r["arm"], r["schedule"], fmt(interval_of(r, "steps"), "{:.0f}"), f"{r['mean_cost']:.3f}",
                 f"{r['overhead_s']:.1f}", *[fmt(interval_of(r, k), spec) for k, _, spec in COLUMNS], r["reached"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    rows = {r["arm"]: r for r in result["rows"]}
    lines += [f"differences to {result['rows'][0]['arm']}, paired by seed (separated: the 95% interval excludes 0):",
              *separation_lines(rows, SEPARATION)]
    for r in result["rows"]:
        if r["overhead_s"]:
            without = "-" if r["ratio_without_overhead"] is None else f"{r['ratio_without_overhead']:.2f}"
            payback = ("never: it reached the target on no seed" if r["ratio_without_overhead"] is None else
                       "never: it saves no time" if r["payback_baseline_s"] is None else
                       f"at a baseline time to target of {r['payback_baseline_s']:.0f} s "
                       f"({r['payback_baseline_s'] / result['baseline_time_to_target_s']:.1f}x this run)")
            ratio = fmt(interval_of(r, "ratio"))
            lines.append(f"{r['arm']}: {r['overhead_s']:.1f} s of overhead counted (ratio {ratio}; without it "
                         f"{without}); the overhead is paid back {payback}, if the ratio without it holds at other "
                         f"run lengths")
    return "\n".join(lines) + "\n"


def mean_curve(arm_curves: list[list[dict[str, float]]], x: str = "time_s") -> list[tuple[float, float, float, float]]:
    """Per evaluation index every seed reached: (mean ``x``, its half-width, mean top-1, its
    half-width); ``x``: ``time_s`` or ``forward_passes``."""
    out = []
    for i in range(min(len(c) for c in arm_curves)):
        t, a = mean_ci([c[i][x] for c in arm_curves]), mean_ci([c[i]["top1"] for c in arm_curves])
        out.append((t.mean, 0.0 if math.isnan(t.half_width) else t.half_width, a.mean,
                    0.0 if math.isnan(a.half_width) else a.half_width))
    return out


X_AXES = {"time_s": ("training time (s)", 1.0), "forward_passes": ("forward passes (millions)", 1e-6)}


def plot(result: dict[str, Any], path: str, x: str = "time_s") -> None:
    """Mean top-1 against ``x`` (:data:`X_AXES`: training time, or the image forward passes, as the
    paper plots), 95% intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, scale = X_AXES[x]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for arm in result["arms"]:
        by_name.setdefault(arm["name"], []).append(arm)
    for name, arms in by_name.items():
        pts = mean_curve([a["curve"] for a in arms if a["curve"]], x)
        ax.errorbar([p[0] * scale for p in pts], [p[2] for p in pts], xerr=[p[1] * scale for p in pts],
                    yerr=[p[3] for p in pts],
                    marker="o", ms=3, capsize=2, label=f"{name} ({arms[0]['schedule']}, {len(arms)} seeds)"[:60])
    ax.axhline(result["target_top1"], color="grey", ls="--", lw=1, label="baseline final top-1 (mean)")
    ax.set_xlabel(f"{label}, mean over seeds, 95% interval")
    key = result.get("accuracy_key", "zeroshot_top1")
    ax.set_ylabel(f"{ACCURACY_NAMES.get(key, key)} top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arm_flags(a: argparse.Namespace, arm: Arm, costs_json: str) -> list[str]:
    """The training flags of ``arm`` (besides the model, task, data and seed of every run): its
    planned steps (``arm.steps``, set here: ``--budget-margin`` past what the cost table says the
    baseline's time allows) in epochs of ``--eval-every`` steps, each evaluated, every step logged,
    its schedule."""
    global_batch = a.batch_size * a.nproc
    margin = 1.0 if arm.name == "baseline" else a.budget_margin
    epochs = max(1, math.ceil(margin * a.steps / arm.mean_cost / a.eval_every))
    arm.steps = epochs * a.eval_every
    return ["--epochs", str(epochs), "--train-num-samples", str(a.eval_every * global_batch),
            "--warmup", str(max(1, round(a.warmup_fraction * arm.steps))), "--eval-frequency", "1",
            "--log-every-n-steps", "1", "--keep-checkpoints", "1",
            *(["--seqcomp-schedule", arm.spec, "--seqcomp-costs", costs_json] if arm.spec else [])]


def overhead_of(a: argparse.Namespace, schedule_json: str, p: argparse.ArgumentParser) -> float:
    """The schedule's overhead: ``--overhead-s``, else ``overhead.json`` beside the schedule."""
    if a.overhead_s is not None:
        return a.overhead_s
    path = os.path.join(os.path.dirname(os.path.abspath(schedule_json)), "overhead.json")
    if not os.path.isfile(path):
        p.error(f"--schedule {schedule_json}: no overhead.json beside it (the pipeline writes one); give "
                f"--overhead-s (the pilot's, the cost table's and the estimator's seconds; 0 to leave it out)")
    with open(path) as f:
        recorded = json.load(f)
    if recorded.get("clock", a.clock) != a.clock:
        p.error(f"{path} was measured on the {recorded['clock']} clock, the arms on {a.clock}: give --overhead-s")
    return float(recorded["overhead_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_seqcomp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)
    p.add_argument("--logs", default="logs/bench_seqcomp", help="the arms' and the pilot's run directories")
    p.add_argument("--out", default=None, help="bench.{json,md,png} here (default: LOGS)")
    p.add_argument("--steps", type=int, default=240, help="the baseline's steps")
    p.add_argument("--seeds", type=int, default=1, help="seeds SEED, SEED+1, ...; every arm runs each (3 or more "
                   "for an interval worth reading; the schedule is chosen once, at SEED)")
    p.add_argument("--budget-margin", type=float, default=1.15,
                   help="arms are planned this much longer than the cost table says the baseline's time allows, "
                        "then cut at the baseline's measured time (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=20, help="steps between the task's evaluations (one epoch)")
    p.add_argument("--x", choices=sorted(X_AXES), default="time_s",
                   help="the PNG's x-axis: training time, or image forward passes (samples x views, as the paper "
                        "plots; the table's times are training time either way)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--constant-rate", type=float, default=0.5)
    p.add_argument("--constant-patch", type=int, default=16)
    p.add_argument("--schedule", help="a --seqcomp-schedule JSON to use instead of choosing one here")
    p.add_argument("--costs", help="the cost table (tools/seqcomp_costs) with --schedule")
    p.add_argument("--overhead-s", type=float,
                   help="with --schedule: what choosing it cost, in seconds on --clock (default: overhead.json "
                        "beside the schedule)")
    p.add_argument("--arms", nargs="+", default=["baseline", "dropout", "patch", "schedule"],
                   choices=["baseline", "dropout", "patch", "schedule"], help="baseline is always run first")
    a = parse_pipeline_args(p, argv)
    out = a.out or a.logs
    if a.clock == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"  # the runs' ranks and the cost table: one thread each
    os.makedirs(out, exist_ok=True)
    if a.schedule and not a.costs:
        p.error("--schedule needs --costs (the cost table its arms' budgets are planned from)")
    if a.schedule:
        schedule_json, costs_json = a.schedule, a.costs
        overhead_s = overhead_of(a, schedule_json, p) if "schedule" in a.arms else 0.0
    else:
        a.rates = sorted({*a.rates, a.constant_rate})
        a.patches = list(dict.fromkeys([*a.patches, a.constant_patch]))
        schedule_json, costs_json = choose_schedule(a, os.path.join(out, "schedule"))
        overhead_s = overhead_of(a, schedule_json, p)
    specs = {"baseline": "", "dropout": f"1:r={a.constant_rate:g}", "patch": f"1:p={a.constant_patch}",
             "schedule": schedule_json}
    names = ["baseline", *[n for n in a.arms if n != "baseline"]]
    costs = {name: mean_cost(specs[name], costs_json) for name in names}
    global_batch = a.batch_size * a.nproc
    data_flags = task_data(a.task, a.data, a.knn_bank_max_images).flags()
    first_seed, arms, acc = a.seed, [], None
    key = "step_cpu_time" if a.clock == "cpu" else "step_time"
    for seed in range(first_seed, first_seed + a.seeds):
        a.seed = seed  # train_run's --seed
        for name in names:
            arm = Arm(name, specs[name], *costs[name], seed=seed)
            extra = [*arm_flags(a, arm, costs_json), *a.task_flags]
            arm.load.append(os.getloadavg()[0])
            run_dir = train_run(a, f"bench-{name}-s{seed}", extra, reuse_run=True, data_flags=data_flags)
            arm.load.append(os.getloadavg()[0])
            arm.curve, arm.train_time_s, acc = curve(run_dir, key)
            arms.append(arm)
            print(f"bench_seqcomp: {name} seed {seed}: {arm.steps} steps, {arm.train_time_s:.1f} s training, "
                  f"final top-1 {arm.curve[-1]['top1']:.1f}%", flush=True)
    a.seed = first_seed
    result = summarize(arms, overhead_s)
    result.update(model=a.model, task=a.task, accuracy_key=acc, x=a.x,
                  clock=a.clock, nproc=a.nproc, global_batch=global_batch, baseline_steps=a.steps,
                  budget_margin=a.budget_margin, costs=costs_json, schedule=schedule_json,
                  command=" ".join(sys.argv if argv is None else ["bench_seqcomp", *argv]))
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, "bench.png"), a.x)
    print(table + f"bench_seqcomp: {out}/bench.{{json,md,png}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
