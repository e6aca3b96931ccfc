"""LR range test through the DeepSpeed engine (``tools/lr_find``): the run's own set-up
(:func:`dtp_ds.train.main.prepare`, :func:`~dtp_ds.train.main.build_engine`: any task, model,
ZeRO stage and precision, ``--init-from``) with the LR scheduler replaced by an exponential
ramp (:mod:`dtp_ds.train.lr_range`), stopped at divergence.

Nothing of a real run is touched: no checkpoint is read (``--resume`` is ignored) or written,
and everything goes to ``--out`` (default ``LOGS/lr_find-DATE``), which must not exist yet:
``lr_find.json`` (the curve, both suggestions, the settings) and ``lr_find.png``.

    tools/lr_find --nproc 2 --model DRIP-ViT-B-32-10x --train-data 'DIR/{00000..00099}.tar' [--json]

``tools/lr_find`` starts the ranks under the deepspeed launcher (``--nproc``, ``--hostfile``)
and prints the suggestions (``--json``: one JSON object); under another launcher (srun,
mpirun, torchrun) run ``python -m dtp_ds.train.lr_find`` with the same flags and read
``OUT/lr_find.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from dtp_ds.cluster.ports import free_port
from dtp_ds.train.args import ConfigError, build_parser, from_namespace
from dtp_ds.train.lr_range import ExponentialRamp, RangeTest, RangeTestConfig, plot

# The launcher side (main) imports nothing that imports deepspeed, whose first import prints its
# accelerator notice on stdout (where --json goes): the ranks' side imports it in its functions.

RESULT, PLOT = "lr_find.json", "lr_find.png"


def build_lr_parser() -> argparse.ArgumentParser:
    """The training flags plus the range test's (defaults from :class:`RangeTestConfig`)."""
    p = build_parser()
    p.prog, p.description = "lr_find", "LR range test through the DeepSpeed engine (see dtp_ds/train/lr_find.py)"
    g = p.add_argument_group("LR range test")
    helps = {"start_lr": "the ramp's first LR", "end_lr": "the ramp's last LR",
             "num_steps": "optimizer steps of the ramp (fewer if the loss diverges first)",
             "smooth": "weight of the newest loss in the smoothed loss (torch-lr-finder's smooth_f; 1: none)",
             "diverge": "stop once the smoothed loss exceeds this multiple of its minimum",
             "skip_start": "points left out of the suggestions at the low end",
             "skip_end": "points left out of the suggestions at the high end"}
    for f in dataclasses.fields(RangeTestConfig):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                       help=f"{helps[f.name]} (default {f.default})")
    p.set_defaults(**{f.name: f.default for f in dataclasses.fields(RangeTestConfig)})
    g.add_argument("--out", help="the test's own directory (default: LOGS/lr_find-DATE); must not exist yet")
    g.add_argument("--nproc", type=int, default=1, help="tools/lr_find: ranks on this node (deepspeed launcher)")
    g.add_argument("--hostfile", help="tools/lr_find: the deepspeed launcher's hostfile (multi-node)")
    g.add_argument("--json", action="store_true", help="tools/lr_find: print one JSON object (the result)")
    return p


def range_config(ns: argparse.Namespace) -> RangeTestConfig:
    cfg = RangeTestConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(RangeTestConfig)})
    try:
        cfg.check()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return cfg


def run_ranks(argv: Sequence[str] | None = None) -> int:
    """One rank of the test (``python -m dtp_ds.train.lr_find`` under a launcher)."""
    from dtp_ds.train.main import guarded

    return guarded(lambda: _run(argv), prog="lr_find")


def _run(argv: Sequence[str] | None) -> int:
    from dtp_ds.train.main import build_engine, prepare, start_distributed
    from dtp_ds.train.metrics import write_json_atomic

    ns = build_lr_parser().parse_args(argv)
    cfg = range_config(ns)
    if not ns.out:
        raise ConfigError("--out is required here (tools/lr_find picks one)")
    args = from_namespace(ns)
    out = os.path.abspath(ns.out)
    # its own directory, a fresh model, no checkpoint read or written, no evaluation
    args.run.logs, args.run.name, args.run.resume = os.path.dirname(out), os.path.basename(out), None
    args.run.eval_frequency, args.optim.lr = 0, cfg.start_lr
    rank, world, device = start_distributed(args)
    s = prepare(args, world, rank)
    task, engine = build_engine(s, rank, world, lambda opt: LambdaLR(opt, ExponentialRamp(cfg)))
    test = ramp(s, task, engine, cfg, device, rank, world)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        result = {**test.result(), "model": args.model.model, "task": args.model.task, "world_size": world,
                  "global_batch": s.micro * s.accum * world, "ds_config": s.ds_config,
                  "init_from": s.init.summary() if s.init else None, "skipped_steps": engine.skipped_steps,
                  "png": os.path.join(out, PLOT)}
        if s.init:
            s.init.write(out)
        write_json_atomic(os.path.join(out, RESULT), result)
        plot(result, result["png"], f"{args.model.model}, global batch {result['global_batch']}: "
                                    f"{test.stop_reason}")
    dist.barrier()
    return 0


def ramp(s: Any, task: Any, engine: Any, cfg: RangeTestConfig, device: torch.device, rank: int, world: int
         ) -> RangeTest:
    """Optimizer steps up the LR ramp until it ends or the loss diverges (all ranks stop together:
    they decide on the same rank-mean loss). Each loader batch runs as in training (the run's
    :class:`~dtp_ds.train.trainer.BatchStep`: GradCache's under ``--accum-freq``)."""
    from dtp_ds.data.shards import make_train_loader
    from dtp_ds.train.ds_config import precision_of
    from dtp_ds.train.guard import NonFiniteGuard, TrainingError
    from dtp_ds.train.main import make_stepper
    from dtp_ds.train.trainer import current_lr

    test = RangeTest(cfg)
    # the run's loss scaling and skips; the range test itself stops at the first non-finite loss
    nonfinite = NonFiniteGuard(engine, precision_of(s.ds_config), cfg.num_steps + 1, rank, "")
    stepper = make_stepper(s, task, engine, nonfinite, device)
    stage, epoch = task.data_stage(), 0
    while not test.done:
        loader = make_train_loader(s.args.data, s.shards, s.plan, stage, s.loader_batch, epoch, s.args.run.seed,
                                   rank, world, 0)
        total, batches = torch.zeros((), dtype=torch.float64, device=device), 0
        for *tensors, _bad in loader:
            batches += 1
            lr = current_lr(engine)
            try:
                out, done = stepper(dict(zip(task.batch_keys, tensors)), len(test.lrs) + 1)
            except TrainingError as e:  # fp16: overflowing at every loss scale is divergence too
                test.stop(f"diverged at lr {lr:.3g}: {e}")
                break
            total += out["loss"].detach().double()
            if done is not None:
                dist.all_reduce(total)
                if test.record(done, float(total) / (s.loader_accum * world)):
                    break
                total.zero_()
        if not batches:
            raise ConfigError("the training data gave no batch: nothing to run the range test on")
        epoch += 1
    return test


def default_out(ns: argparse.Namespace) -> str:
    return os.path.join(ns.logs, f"lr_find-{datetime.now().strftime('%Y_%m_%d-%H_%M_%S')}")


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/lr_find``: the ranks under the deepspeed launcher, then the result on stdout (the
    job's own output goes to stderr)."""
    import dtp_ds

    with contextlib.redirect_stdout(sys.stderr):  # dtp_ds.train.runs imports deepspeed (see above)
        from dtp_ds.train.runs import deepspeed_launcher
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_lr_parser()
    ns = p.parse_args(argv)
    try:
        range_config(ns)
        from_namespace(ns)
    except ConfigError as e:
        p.error(str(e))
    out = ns.out or default_out(ns)
    if os.path.exists(out) and os.listdir(out):
        p.error(f"--out {out} exists and is not empty: the range test writes only to a directory of its own")
    launch = [deepspeed_launcher(), "--master_port", str(free_port())]
    launch += ["--hostfile", ns.hostfile] if ns.hostfile else ["--num_gpus", str(ns.nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [dtp_ds.IMPORT_ROOT,
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([*launch, "--module", "dtp_ds.train.lr_find", *argv, *([] if ns.out else ["--out", out])],
                          stdout=sys.stderr, env=env)
    result_file = os.path.join(out, RESULT)
    if proc.returncode != 0 or not os.path.isfile(result_file):
        print(f"lr_find: error: the range test failed (exit {proc.returncode}); see its output above", file=sys.stderr)
        return proc.returncode or 1
    with open(result_file) as f:
        result = json.load(f)
    if ns.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("lr", "loss", "smoothed_loss", "ds_config")}
                         | {"result": result_file}))
        return 0
    print(f"{result['model']}, global batch {result['global_batch']}, {result['steps']} steps: {result['stop_reason']}")
    if result.get("steepest") is None:
        print(f"no suggestion: {result['why_none']}")
    else:
        print(f"suggested LR (steepest gradient): {result['steepest']:.3g}\n"
              f"suggested LR (minimum loss / 10): {result['min_loss_over_10']:.3g}")
    print(f"plot: {result['png']}\nresult: {result_file}")
    return 0


if __name__ == "__main__":
    sys.exit(run_ranks())
