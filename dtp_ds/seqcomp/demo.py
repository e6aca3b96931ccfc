"""``make demo-seqcomp``: the CA-MSE pipeline end to end on the synthetic shards, on this machine.

1. **pilot**: a short run of the tiny patch-stem trunk (``PatchStem-ViT-Tiny-8``: token dropout and
   patch scaling both apply) under the ``deepspeed`` launcher, checkpointing every
   ``--pilot-save-every`` steps (``LOGS/seqcomp-pilot``), on the first half of the shards (the
   estimator takes its gradients on the other half: samples the pilot did not train on);
2. **costs**: ``tools/seqcomp_costs`` on this CPU for the grid (``LOGS/seqcomp/costs.json``);
3. **schedule**: ``tools/seqcomp_schedule`` on the pilot's stages (a freshly built model as
   the 0% stage, then each checkpoint; fraction = step / the pilot's last step), the global batch
   the runs train at (``LOGS/seqcomp/schedule.{json,md,png}``);
4. **scheduled run**: the same model trained with ``--seqcomp-schedule`` the estimator wrote
   (``LOGS/seqcomp-scheduled``), zero-shot evaluated; ``--baseline`` also trains it full-sequence
   (``LOGS/seqcomp-baseline``) and prints both runs' cost units and zero-shot top-1.

What choosing the schedule cost (the pilot's training time on the runs' clock, the cost table's
and the estimator's time) goes to ``LOGS/seqcomp/overhead.json``: ``tools/bench_seqcomp``
charges it to the schedule. The defaults take a few minutes on a 2-core CPU; every size is a flag.

Every run, the cost table and the estimator take ``--task`` (default ``clip``) and the task's own
flags given after the others; its training shards and evaluation in ``--data`` follow the task
(:mod:`dtp_ds.seqcomp.task_data`: an SSL task trains on the class-labelled split and is kNN-evaluated).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from dtp_ds.bench import reuse
from dtp_ds.cluster.ports import free_port
from dtp_ds.seqcomp.costs import patch_arg
from dtp_ds.train.metrics import read_metrics
from dtp_ds.train.runs import finished_as, launch_command, summary_lines

MODEL = "PatchStem-ViT-Tiny-8"


def run_command(a: argparse.Namespace, name: str, extra: list[str], data_flags: list[str] | None = None
                ) -> list[str]:
    """The launcher command of run ``name``: ``data_flags`` (:meth:`dtp_ds.seqcomp.task_data.TaskData.flags`:
    the task, its training data and evaluation) in place of the launcher's CLIP data."""
    from dtp_ds.seqcomp.task_data import with_data_flags

    cmd = launch_command(a.data, a.logs, name, a.nproc, a.model,
                         ["--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed),
                          "--log-every-n-steps", "5", *(["--precision", a.precision] if a.precision else []), *extra])
    return cmd if data_flags is None else with_data_flags(cmd, data_flags)


def train_run(a: argparse.Namespace, name: str, extra: list[str], reuse_run: bool = False,
              data_flags: list[str] | None = None) -> str:
    """Train ``name`` (:func:`run_command`) under the launcher (``reuse``: not if a finished run is
    there whose reuse hash matches: the same arguments, contents of the files they name, threads
    and code)."""
    run_dir = os.path.join(a.logs, name)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc)))
    cmd = run_command(a, name, extra, data_flags)
    digest = reuse.reuse_hash(cmd[1:], reuse.files_in(cmd), reuse.thread_settings(env))
    if reuse_run and finished_as(run_dir, a.model, cmd) and reuse.reusable(run_dir, digest):
        print(f"demo-seqcomp: {run_dir}: finished with these arguments and files: not trained again", flush=True)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    # a free rendezvous port: another job on the machine may hold the launcher's default 29500
    cmd[1:1] = ["--master_port", str(free_port())]
    print("demo-seqcomp:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"demo-seqcomp: training {name} failed (exit {rc}); see the output above and {run_dir}")
    reuse.record(run_dir, digest, command=cmd, threads=reuse.thread_settings(env))
    return run_dir


def run_seconds(run_dir: str, key: str = "step_time") -> float:
    """A run's training time: the sum of its rows' ``key`` (``step_time`` or ``step_cpu_time``)
    over its steps (it must log every step)."""
    from dtp_ds.train.metrics import read_metrics

    return sum({r["step"]: r[key] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if key in r}.values())


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The pilot's, the cost table's and the estimator's flags (the demo's and the benchmark's)."""
    p.add_argument("--data", default="data/synth")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--task", default="clip",
                   help="what every run trains (clip, mocov3, simclr, dino, classify): its data and evaluation in "
                        "--data follow (dtp_ds/seqcomp/task_data.py; an SSL task: the class-labelled split "
                        "DATA/classify, evaluated by kNN); the task's own flags (e.g. --moco-mlp-dim 1024) may "
                        "follow: every run, the cost table and the estimator get them")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="every run's (default: ds_configs/tiny.json's, bf16)")
    p.add_argument("--knn-bank-max-images", type=int, default=1000,
                   help="a kNN-evaluated task: the first N bank images (the training shards)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch per rank")
    p.add_argument("--lr", type=float, default=2e-3, help="of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot-samples", type=int, default=1920, help="the pilot's one epoch (30 steps of 2 x 32)")
    p.add_argument("--pilot-save-every", type=int, default=10)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--patches", type=patch_arg, nargs="+", default=[None, 16])
    p.add_argument("--cost-steps", type=int, default=3)
    p.add_argument("--batches", type=int, default=10,
                   help="K global batches per stage for the estimator (10: 5 groups of 2, so the standard error "
                        "of its tie rule has 4 degrees of freedom)")
    p.add_argument("--monotone", action="store_true")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="the cost table's clock (cpu: CPU time, which other jobs on a shared CPU do not inflate)")


def parse_pipeline_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments; the rest, the task's own flags (as ``python -m dtp_ds.train`` takes them,
    checked here), in ``task_flags``: every run, the cost table and the estimator get them."""
    from dtp_ds.seqcomp.costs import task_config

    a, rest = p.parse_known_args(argv)
    try:
        task_config(a.task, rest)
    except ValueError as e:
        p.error(str(e))
    a.task_flags = rest
    return a


def choose_schedule(a: argparse.Namespace, out: str) -> tuple[str, str]:
    """Pilot run -> cost table -> CA-MSE schedule; the schedule's and the cost table's paths in
    ``out``, and what each step cost in ``out/overhead.json`` (``clock``: the runs' step times,
    wall or rank 0's CPU; the pilot's training time on it, the cost table's and the estimator's
    time in this process on it; ``overhead_s`` their sum)."""
    from dtp_ds.seqcomp import camse, costs
    from dtp_ds.seqcomp.task_data import task_data
    from dtp_ds.train.checkpoint import list_checkpoints

    data = task_data(a.task, a.data, a.knn_bank_max_images)
    shards = data.shards()
    if not shards:
        raise SystemExit(f"demo-seqcomp: no shards in {data.train_dir}: run tools/make_synthetic_shards --out "
                         f"{a.data}")
    os.makedirs(out, exist_ok=True)
    if len(shards) < 2:
        raise SystemExit(f"demo-seqcomp: {data.train_dir} has {len(shards)} shard(s): the pilot trains on the first "
                         f"half and the estimator reads the other half; make at least 2")
    half = len(shards) // 2
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    # 1. pilot (logging every step: its training time is counted as the runs' is)
    started = time.perf_counter()
    pilot = train_run(a, "seqcomp-pilot", ["--epochs", "1", "--train-num-samples", str(a.pilot_samples),
                                            "--warmup", "5", "--save-every-n-steps", str(a.pilot_save_every),
                                            "--keep-checkpoints", "100", "--eval-frequency", "0",
                                            "--log-every-n-steps", "1", *a.task_flags],
                      data_flags=data.flags(slice(None, half)))
    spent = {"pilot_wall_s": time.perf_counter() - started,
             "pilot_s": run_seconds(pilot, "step_cpu_time" if a.clock == "cpu" else "step_time")}
    ckpts = [d for _, d in list_checkpoints(os.path.join(pilot, "checkpoints"))]
    stages = [f"init:{a.model}"] + [os.path.join(pilot, "checkpoints", d) for d in ckpts]
    print(f"demo-seqcomp: pilot stages: {', '.join(stages)}", flush=True)

    # 2. cost table (one micro-batch, the size each rank steps at)
    costs_json = os.path.join(out, "costs.json")
    patch_args = ["stored" if x is None else str(x) for x in a.patches]
    started = clock()
    costs.main(["--model", a.model, "--task", a.task, "--rates", *map(str, a.rates), "--patches", *patch_args,
                "--batch-size", str(a.batch_size), "--steps", str(a.cost_steps), "--warmup", "1", "--clock", a.clock,
                "--out", costs_json, *a.task_flags])
    spent["costs_s"] = clock() - started

    # 3. CA-MSE schedule at the runs' global batch
    # on the shards the pilot did not read
    schedule_json = os.path.join(out, "schedule.json")
    started = clock()
    camse.main(["--checkpoints", *stages, "--task", a.task, "--train-data", data.train_pattern(slice(half, None)),
                "--global-batch",
                str(a.batch_size * a.nproc), "--batches", str(a.batches), "--rates", *map(str, a.rates),
                "--patches", *patch_args, "--costs", costs_json, "--seed", str(a.seed), "--out", schedule_json,
                *(["--monotone"] if a.monotone else []), *a.task_flags])
    spent["estimator_s"] = clock() - started
    overhead = {"clock": a.clock, **spent, "overhead_s": spent["pilot_s"] + spent["costs_s"] + spent["estimator_s"]}
    with open(os.path.join(out, "overhead.json"), "w") as f:
        json.dump(overhead, f, indent=1)
    print(f"demo-seqcomp: choosing the schedule cost {overhead['overhead_s']:.1f} s ({a.clock} clock): pilot "
          f"{spent['pilot_s']:.1f} s training, cost table {spent['costs_s']:.1f} s, estimator "
          f"{spent['estimator_s']:.1f} s", flush=True)
    return schedule_json, costs_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo-seqcomp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)
    p.add_argument("--logs", default="logs")
    p.add_argument("--epochs", type=int, default=2, help="of the scheduled run")
    p.add_argument("--samples-per-epoch", type=int, default=1920)
    p.add_argument("--baseline", action="store_true", help="also train the full-sequence run and compare")
    p.add_argument("--schedule-only", action="store_true",
                   help="stop after step 3: the schedule, the cost table and overhead.json, no run trained")
    a = parse_pipeline_args(p, argv)
    from dtp_ds.seqcomp.task_data import task_data

    out = os.path.join(a.logs, "seqcomp")
    schedule_json, costs_json = choose_schedule(a, out)
    if a.schedule_only:
        print(f"demo-seqcomp: schedule {schedule_json}, costs {costs_json}, {out}/overhead.json", flush=True)
        return 0

    # 4. the scheduled run (and the full-sequence one)
    common = [*a.task_flags, "--epochs", str(a.epochs), "--train-num-samples", str(a.samples_per_epoch),
              "--warmup", "5", "--eval-frequency", str(a.epochs)]
    flags = task_data(a.task, a.data, a.knn_bank_max_images).flags()
    runs = [("scheduled", train_run(a, "seqcomp-scheduled", [*common, "--seqcomp-schedule", schedule_json],
                                    data_flags=flags))]
    if a.baseline:
        runs.append(("baseline", train_run(a, "seqcomp-baseline", common, data_flags=flags)))
    for label, run_dir in runs:
        rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        steps = [r for r in rows if "loss" in r]
        units = steps[-1].get("cost_units", float(steps[-1]["step"])) if steps else float("nan")
        print(f"demo-seqcomp: {label}: {len(steps) and steps[-1]['step']} steps, {units:.1f} cost units "
              f"(a full-sequence step = 1)")
        print("\n".join(f"  {line}" for line in summary_lines(os.path.join(run_dir, "metrics.jsonl"))))
    print(f"demo-seqcomp: schedule {schedule_json} (table {out}/schedule.md, panels {out}/schedule.png), "
          f"costs {costs_json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
