"""``make demo-compress``: the CA-MSE pipeline end to end on the synthetic shards, on this machine.

1. **pilot**: a short run of the tiny patch-stem trunk (``Plain-ViT-Tiny-8``: token dropout and
   patch scaling both apply) under the ``deepspeed`` launcher, checkpointing every
   ``--pilot-save-every`` steps (``LOGS/compress-pilot``);
2. **costs**: ``tools/compression_costs`` on this CPU for the grid (``LOGS/compress/costs.json``);
3. **schedule**: ``tools/compression_schedule`` on the pilot's stages (a freshly built model as
   the 0% stage, then each checkpoint; fraction = step / the pilot's last step), the global batch
   the runs train at (``LOGS/compress/schedule.{json,md,png}``);
4. **scheduled run**: the same model trained with ``--compression-schedule`` the estimator wrote
   (``LOGS/compress-scheduled``), zero-shot evaluated; ``--baseline`` also trains it uncompressed
   (``LOGS/compress-baseline``) and prints both runs' cost units and zero-shot top-1.

The defaults take a few minutes on a 2-core CPU; every size is a flag.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys

from dtp_ds.compress.costs import patch_arg
from dtp_ds.demo import finished_as, launch_command, summary_lines
from dtp_ds.train.metrics import read_metrics

MODEL = "Plain-ViT-Tiny-8"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(a: argparse.Namespace, name: str, extra: list[str], reuse: bool = False) -> str:
    """Train ``name`` under the launcher (``reuse``: not if a finished run of the same arguments is there)."""
    run_dir = os.path.join(a.logs, name)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc)))
    cmd = launch_command(a.data, a.logs, name, a.nproc, a.model,
                         ["--batch-size", str(a.batch_size), "--lr", str(a.lr), "--seed", str(a.seed),
                          "--log-every-n-steps", "5", *extra])
    if reuse and finished_as(run_dir, a.model, cmd):
        print(f"demo-compress: {run_dir}: finished with these arguments: not trained again", flush=True)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    # a free rendezvous port: another job on the machine may hold the launcher's default 29500
    cmd[1:1] = ["--master_port", str(_free_port())]
    print("demo-compress:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"demo-compress: training {name} failed (exit {rc}); see the output above and {run_dir}")
    return run_dir


def train_data(data: str) -> str:
    shards = sorted(glob.glob(os.path.join(data, "train", "*.tar")))
    first, last = (os.path.basename(s)[: -len(".tar")] for s in (shards[0], shards[-1]))
    return os.path.join(data, "train", f"{{{first}..{last}}}.tar")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The pilot's, the cost table's and the estimator's flags (the demo's and the benchmark's)."""
    p.add_argument("--data", default="data/synth")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch per rank")
    p.add_argument("--lr", type=float, default=2e-3, help="of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot-samples", type=int, default=1920, help="the pilot's one epoch (30 steps of 2 x 32)")
    p.add_argument("--pilot-save-every", type=int, default=10)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--patches", type=patch_arg, nargs="+", default=[None, 16])
    p.add_argument("--cost-steps", type=int, default=3)
    p.add_argument("--batches", type=int, default=4, help="K global batches per stage for the estimator")
    p.add_argument("--monotone", action="store_true")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="the cost table's clock (cpu: CPU time, which other jobs on a shared CPU do not inflate)")


def choose_schedule(a: argparse.Namespace, out: str) -> tuple[str, str]:
    """Pilot run -> cost table -> CA-MSE schedule; the schedule's and the cost table's paths in ``out``."""
    from dtp_ds.compress import camse, costs
    from dtp_ds.train.checkpoint import list_checkpoints

    if not glob.glob(os.path.join(a.data, "train", "*.tar")):
        raise SystemExit(f"demo-compress: no shards in {a.data}/train: run tools/make_synthetic_shards --out {a.data}")
    os.makedirs(out, exist_ok=True)

    # 1. pilot
    pilot = train_run(a, "compress-pilot", ["--epochs", "1", "--train-num-samples", str(a.pilot_samples),
                                            "--warmup", "5", "--save-every-n-steps", str(a.pilot_save_every),
                                            "--keep-checkpoints", "100", "--zeroshot-frequency", "0"])
    ckpts = [d for _, d in list_checkpoints(os.path.join(pilot, "checkpoints"))]
    stages = [f"init:{a.model}"] + [os.path.join(pilot, "checkpoints", d) for d in ckpts]
    print(f"demo-compress: pilot stages: {', '.join(stages)}", flush=True)

    # 2. cost table (one micro-batch, the size each rank steps at)
    costs_json = os.path.join(out, "costs.json")
    patch_args = ["stored" if x is None else str(x) for x in a.patches]
    costs.main(["--model", a.model, "--rates", *map(str, a.rates), "--patches", *patch_args, "--batch-size",
                str(a.batch_size), "--steps", str(a.cost_steps), "--warmup", "1", "--clock", a.clock,
                "--out", costs_json])

    # 3. CA-MSE schedule at the runs' global batch
    schedule_json = os.path.join(out, "schedule.json")
    camse.main(["--checkpoints", *stages, "--train-data", train_data(a.data), "--global-batch",
                str(a.batch_size * a.nproc), "--batches", str(a.batches), "--rates", *map(str, a.rates),
                "--patches", *patch_args, "--costs", costs_json, "--seed", str(a.seed), "--out", schedule_json,
                *(["--monotone"] if a.monotone else [])])
    return schedule_json, costs_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo-compress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_args(p)
    p.add_argument("--logs", default="logs")
    p.add_argument("--epochs", type=int, default=2, help="of the scheduled run")
    p.add_argument("--samples-per-epoch", type=int, default=1920)
    p.add_argument("--baseline", action="store_true", help="also train the uncompressed run and compare")
    a = p.parse_args(argv)
    out = os.path.join(a.logs, "compress")
    schedule_json, costs_json = choose_schedule(a, out)

    # 4. the scheduled run (and the uncompressed one)
    common = ["--epochs", str(a.epochs), "--train-num-samples", str(a.samples_per_epoch), "--warmup", "5",
              "--zeroshot-frequency", str(a.epochs)]
    runs = [("scheduled", train_run(a, "compress-scheduled", [*common, "--compression-schedule", schedule_json]))]
    if a.baseline:
        runs.append(("baseline", train_run(a, "compress-baseline", common)))
    for label, run_dir in runs:
        rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        steps = [r for r in rows if "loss" in r]
        units = steps[-1].get("cost_units", float(steps[-1]["step"])) if steps else float("nan")
        print(f"demo-compress: {label}: {len(steps) and steps[-1]['step']} steps, {units:.1f} cost units "
              f"(an uncompressed step = 1)")
        print("\n".join(f"  {line}" for line in summary_lines(os.path.join(run_dir, "metrics.jsonl"))))
    print(f"demo-compress: schedule {schedule_json} (table {out}/schedule.md, panels {out}/schedule.png), "
          f"costs {costs_json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
