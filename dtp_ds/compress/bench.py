"""``tools/bench_compression``: time to the uncompressed run's accuracy, per compression strategy.

Arms, all the same model, data order, seed, global batch and LR recipe, each trained to the same
training budget under the ``deepspeed`` launcher and zero-shot evaluated every ``--eval-every``
steps:

- ``baseline``: uncompressed, ``--steps`` steps;
- ``dropout``: token dropout at ``--constant-rate`` for the whole run;
- ``patch``: patch scaling to ``--constant-patch`` for the whole run;
- ``schedule``: the CA-MSE schedule (``--schedule FILE``, or chosen here by ``make demo-compress``'s
  pipeline: pilot -> cost table -> estimator, at the arms' global batch).

Same budget: an arm of mean step cost ``c`` (a segment's cost from the measured cost table, the
uncompressed remainder 1) trains ``steps / c`` steps, so every arm spends about the baseline's
training time; its LR curve and schedule span its own steps (as the paper compares schedules).
Time is training time: the sum of the steps' logged ``step_time`` up to an evaluation (data waits
included; evaluation and checkpoint saves not), or with ``--clock cpu`` their ``step_cpu_time``
(rank 0's CPU time; the arms then run one thread per rank and the cost table is timed the same
way), which other jobs on a shared CPU do not inflate: use it with ``--nproc 1`` (a rank waiting
for a peer in a collective may spin).

Printed per arm: steps, mean cost, training time, final and best top-1, the time to reach the
baseline's final top-1 (or ``-`` and its best), and that time over the baseline's own time to it.
Writes ``bench.{json,md,png}`` (top-1 against training time) to ``--out``. An arm whose run
directory holds a finished run of the same arguments is not trained again (so arms can be run by
separate invocations, and the table re-made from them). The machine's load
average at each arm's start and end goes in the JSON: a shared machine distorts the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from dtp_ds.compress.demo import add_pipeline_args, choose_schedule, train_run
from dtp_ds.train.metrics import read_metrics


@dataclass
class Arm:
    name: str
    spec: str  # --compression-schedule (a file or SPEC); "" uncompressed
    mean_cost: float = 1.0
    schedule: str = "none"  # the segments (SPEC form, without costs)
    steps: int = 0
    load: list[float] = field(default_factory=list)  # 1-min load average at start and end
    curve: list[dict[str, float]] = field(default_factory=list)  # per evaluation: step, time_s, top1, top5
    train_time_s: float = float("nan")


def mean_cost(spec: str, costs_json: str) -> tuple[float, str]:
    """The cost per step of a schedule averaged over the run (the uncompressed remainder costs 1),
    and the schedule in SPEC form."""
    from dtp_ds.train.compression_schedule import load_schedule, with_costs

    if not spec:
        return 1.0, "none"
    segments = with_costs(load_schedule(spec), costs_json)
    covered = sum(s.fraction for s in segments)
    text = ";".join(f"{s.fraction:.3g}:{s.strategy.describe()}" for s in segments)
    return sum(s.fraction * s.cost for s in segments) + (1.0 - covered), text


def curve(run_dir: str, key: str = "step_time") -> tuple[list[dict[str, float]], float]:
    """(step, cumulative training time, top-1, top-5) at every evaluation; the whole training time.
    ``key``: the row's step time (``step_time`` or ``step_cpu_time``)."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    step_time = {r["step"]: r[key] for r in rows if key in r}
    last = max(step_time)
    missing = [s for s in range(1, last + 1) if s not in step_time]
    if missing:
        raise SystemExit(f"bench_compression: {run_dir} lacks step_time at steps {missing[:5]}...: "
                         f"the arms must log every step (--log-every-n-steps 1)")
    cum, t = {}, 0.0
    for s in range(1, last + 1):
        t += step_time[s]
        cum[s] = t
    evals = [{"step": r["step"], "time_s": cum[r["step"]], "top1": r["zeroshot_top1"], "top5": r["zeroshot_top5"]}
             for r in rows if "zeroshot_top1" in r]
    return evals, t


def time_to(points: list[dict[str, float]], target: float) -> float | None:
    """The training time of the first evaluation at or above ``target`` top-1 (None: never)."""
    return next((p["time_s"] for p in points if p["top1"] >= target), None)


def summarize(arms: list[Arm]) -> dict[str, Any]:
    base = arms[0]
    target = base.curve[-1]["top1"]
    t_base = time_to(base.curve, target)
    rows = []
    for arm in arms:
        t = time_to(arm.curve, target)
        rows.append({"arm": arm.name, "schedule": arm.schedule, "steps": arm.steps,
                     "mean_cost": round(arm.mean_cost, 4), "train_time_s": round(arm.train_time_s, 1),
                     "final_top1": arm.curve[-1]["top1"], "best_top1": max(p["top1"] for p in arm.curve),
                     "time_to_target_s": None if t is None else round(t, 1),
                     "ratio": None if t is None or not t_base else round(t / t_base, 3)})
    return {"target_top1": target, "baseline_time_to_target_s": t_base, "rows": rows,
            "arms": [asdict(a) for a in arms]}


def markdown(result: dict[str, Any]) -> str:
    head = ["arm", "schedule", "steps", "mean cost", "train time s", "final top-1", "best top-1",
            "time to target s", "ratio"]
    lines = [f"target: the baseline's final zero-shot top-1, {result['target_top1']:.1f}%", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result["rows"]:
        reached = "-" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['arm']} | {r['schedule']} | {r['steps']} | {r['mean_cost']:.3f} | "
                     f"{r['train_time_s']:.1f} | {r['final_top1']:.1f} | {r['best_top1']:.1f} | {reached} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in result["arms"]:
        ax.plot([p["time_s"] for p in arm["curve"]], [p["top1"] for p in arm["curve"]], marker="o", ms=3,
                label=f"{arm['name']} ({arm['schedule']})"[:60])
    ax.axhline(result["target_top1"], color="grey", ls="--", lw=1, label="baseline final top-1")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_compression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)
    p.add_argument("--logs", default="logs/bench_compression", help="the arms' and the pilot's run directories")
    p.add_argument("--out", default=None, help="bench.{json,md,png} here (default: LOGS)")
    p.add_argument("--steps", type=int, default=240, help="the baseline's steps (the others: steps / mean cost)")
    p.add_argument("--eval-every", type=int, default=20, help="steps between zero-shot evaluations (one epoch)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--constant-rate", type=float, default=0.5)
    p.add_argument("--constant-patch", type=int, default=16)
    p.add_argument("--schedule", help="a --compression-schedule JSON to use instead of choosing one here")
    p.add_argument("--costs", help="the cost table (tools/compression_costs) with --schedule")
    p.add_argument("--arms", nargs="+", default=["baseline", "dropout", "patch", "schedule"],
                   choices=["baseline", "dropout", "patch", "schedule"], help="baseline is always run first")
    a = p.parse_args(argv)
    out = a.out or a.logs
    if a.clock == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"  # the runs' ranks and the cost table: one thread each
    os.makedirs(out, exist_ok=True)
    if a.schedule and not a.costs:
        p.error("--schedule needs --costs (the cost table its arms' budgets are computed from)")
    if a.schedule:
        schedule_json, costs_json = a.schedule, a.costs
    else:
        a.rates = sorted({*a.rates, a.constant_rate})
        a.patches = list(dict.fromkeys([*a.patches, a.constant_patch]))
        schedule_json, costs_json = choose_schedule(a, os.path.join(out, "schedule"))
    specs = {"baseline": "", "dropout": f"1:r={a.constant_rate:g}", "patch": f"1:p={a.constant_patch}",
             "schedule": schedule_json}
    arms = [Arm(name, specs[name], *mean_cost(specs[name], costs_json))
            for name in ["baseline", *[n for n in a.arms if n != "baseline"]]]
    global_batch = a.batch_size * a.nproc
    for arm in arms:
        epochs = max(1, math.ceil(a.steps / arm.mean_cost / a.eval_every))
        arm.steps = epochs * a.eval_every
        extra = ["--epochs", str(epochs), "--train-num-samples", str(a.eval_every * global_batch),
                 "--warmup", str(max(1, round(a.warmup_fraction * arm.steps))), "--zeroshot-frequency", "1",
                 "--log-every-n-steps", "1", "--keep-checkpoints", "1",
                 *(["--compression-schedule", arm.spec, "--compression-costs", costs_json] if arm.spec else [])]
        arm.load.append(os.getloadavg()[0])
        run_dir = train_run(a, f"bench-{arm.name}", extra, reuse=True)
        arm.load.append(os.getloadavg()[0])
        arm.curve, arm.train_time_s = curve(run_dir, "step_cpu_time" if a.clock == "cpu" else "step_time")
        print(f"bench_compression: {arm.name}: {arm.steps} steps, {arm.train_time_s:.1f} s training, "
              f"final top-1 {arm.curve[-1]['top1']:.1f}%", flush=True)
    result = summarize(arms)
    result.update(model=a.model, clock=a.clock, nproc=a.nproc, global_batch=global_batch, baseline_steps=a.steps,
                  costs=costs_json, schedule=schedule_json,
                  command=" ".join(sys.argv if argv is None else ["bench_compression", *argv]))
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(table)
    plot(result, os.path.join(out, "bench.png"))
    print(table + f"bench_compression: {out}/bench.{{json,md,png}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
