"""Several ``dtp_ds.train`` runs, one after another, in one launch of the ranks (tests/conftest.py
``run_many``): the launcher, the imports and the process group are paid once instead of once per
run (about as long as a tiny run itself on two cores).

Each run is ``train(parse_args(argv))``, the entry point's own body, with the run's environment
variables set around it and no peer watchdog (``--peer-timeout-seconds 0``: its store keys would
outlive the run that wrote them; the watchdog's own tests are tests/unit/test_launch_watchdog.py
and tests/e2e); a refusal (``dtp_ds.train.main.REFUSALS``) is reported as the entry point
reports it, its stderr kept per rank, and the next run starts. The process group stays up between
runs (DeepSpeed cannot bring it up twice in a process). Any other exception stops the launch with
its traceback. Rank 0 writes ``OUT/results.json``: per run, each rank's exit status and stderr.
A spec entry with ``call`` (``"module:function"`` and its ``args``) instead of ``argv`` runs that
function on every rank in turn, on the process group that is up: a test's own multi-rank script
shares the launch (its exception, too, stops the launch).

    deepspeed --num_gpus N tests/dist/train_runs.py SPEC.json OUT
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import time

import torch.distributed as dist

from dtp_ds.cluster.process_group import init_process_group
from dtp_ds.launch.watchdog import stop_watchdog
from dtp_ds.train.args import parse_args
from dtp_ds.train.main import REFUSALS, refuse, train


def run_one(argv: list[str], env: dict[str, str]) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    err = io.StringIO()
    start = time.time()
    try:
        with contextlib.redirect_stderr(err):
            try:
                rc = train(parse_args([*argv, "--peer-timeout-seconds", "0"]))
            except REFUSALS as e:
                rc = refuse(e)
            except SystemExit as e:  # argparse's refusal of a flag (its message is on stderr)
                rc = e.code
    finally:
        stop_watchdog()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    sys.stderr.write(err.getvalue())
    return {"rc": rc, "stderr": err.getvalue(), "seconds": round(time.time() - start, 1)}


def call_one(target: str, args: list[str]) -> dict:
    module, function = target.split(":")
    start = time.time()
    getattr(importlib.import_module(module), function)(*args)
    return {"rc": 0, "stderr": "", "seconds": round(time.time() - start, 1)}


def main() -> None:
    spec_path, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    init_process_group()  # up before the first run, which may be refused before it brings it up
    results = {}
    for run in json.loads(open(spec_path).read()):
        print(f"=== {run['name']}", flush=True)
        if "call" in run:
            results[run["name"]] = call_one(run["call"], run.get("args", []))
        else:
            results[run["name"]] = run_one(run["argv"], run.get("env", {}))
        dist.barrier()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {name: {"rc": [g[name]["rc"] for g in gathered], "stderr": [g[name]["stderr"] for g in gathered],
                         "seconds": gathered[0][name]["seconds"]} for name in results}
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(merged, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
