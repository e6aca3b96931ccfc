"""dtp_ds's DeepSpeed engine against open_clip's own trainer (open_clip_train.main): same
model, shards, micro-batch, ranks and precision; prints each one's training throughput
(median samples/s over the measured steps, data loading included) and their ratio.

Runs alternate (dtp_ds, open_clip, dtp_ds, ...) so drifting machine load hits both; each of the
``--repeats`` rounds runs every arm in its own processes. Printed: each arm's median samples/s
over all rounds' measured steps with a 95% bootstrap interval resampling whole rounds, and each
ratio taken within a round (paired), ``mean +- half-width (n)`` over rounds (t interval); a
ratio is called above or below a threshold only where its interval lies wholly on one side
(dtp_ds.bench.stats).
Precision: fp32 against fp32; bf16 (DeepSpeed's bf16 engine) against open_clip's amp_bf16.
ZeRO stages (``--zero-stages``, default 0 and 2): stage 0 is DeepSpeed's plain data parallelism,
the like-for-like counterpart of open_clip's DDP; stage 2 shows what partitioning the optimizer
state and gradients costs at this model size (it buys memory, not speed).

``--accum-freq K`` measures GradCache instead (at the first ZeRO stage): time per sample of
``--batch-size M --accum-freq K`` (one contrastive batch of K x M per rank), of plain
accumulation (the ds_config's ``gradient_accumulation_steps`` K: K contrastive batches of M)
and of one batch of K x M where it fits; every arm trains K x M samples per rank and step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import torch

from dtp_ds.bench.stats import Interval, fmt, mean_ci, median_ci
from dtp_ds.train.metrics import read_metrics
from dtp_ds.train.runs import deepspeed_launcher

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}
BATCH_RE = re.compile(r"Batch \(t\): ([\d.]+), ([\d.]+)/s")


def _env(nproc: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    return env


def run_dtp_ds(a: argparse.Namespace, stage: int, workdir: str, tag: str, batch_size: int | None = None,
               extra: tuple[str, ...] = (), ds_config: str | None = None) -> list[float]:
    cmd = [deepspeed_launcher(), "--num_gpus", str(a.nproc), "--master_port", str(a.port), "--module", "dtp_ds.train",
           "--deepspeed_config", ds_config or a.deepspeed_config, "--zero-stage", str(stage), "--precision",
           a.precision, "--model", a.model, "--train-data", a.train_data, "--batch-size",
           str(batch_size or a.batch_size), "--workers", str(a.workers), "--max-steps", str(a.steps),
           "--log-every-n-steps", "1", "--lr", "1e-4", "--warmup", "1", "--eval-frequency", "0", "--logs",
           workdir, "--name", tag, "--keep-checkpoints", "1", *extra]
    out = subprocess.run(cmd, env=_env(a.nproc), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dtp_ds.train failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rows = [r for r in read_metrics(os.path.join(workdir, tag, "metrics.jsonl")) if "samples_per_s" in r]
    return [r["samples_per_s"] for r in rows if r["step"] > a.skip]


def run_open_clip(a: argparse.Namespace, workdir: str, tag: str) -> list[float]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    samples = a.steps * a.batch_size * a.nproc
    oc_args = ["--model", a.model, "--train-data", a.train_data,
           "--train-num-samples", str(samples), "--dataset-type", "webdataset", "--batch-size", str(a.batch_size),
           "--workers", str(a.workers), "--precision", OPEN_CLIP_PRECISION[a.precision], "--epochs", "1",
           "--lr", "1e-4", "--warmup", "1", "--log-every-n-steps", "1", "--zeroshot-frequency", "0",
           "--save-frequency", "0", "--logs", workdir, "--name", tag, "--dist-backend",
           "nccl" if torch.cuda.is_available() else "gloo", "--grad-clip-norm", "1.0"]
    if not torch.cuda.is_available():
        oc_args += ["--device", "cpu"]
    cmd = [torchrun, "--nproc_per_node", str(a.nproc), "--master_port", str(a.port + 1), "-m",
           "dtp_ds.bench.open_clip_ref"]
    out = subprocess.run(cmd, env={**_env(a.nproc), "OPEN_CLIP_ARGS": json.dumps(oc_args)}, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"open_clip_train failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rates = [float(m.group(2)) for m in BATCH_RE.finditer(out.stdout + out.stderr)]
    return rates[a.skip:]  # the first log line is step 0


GC, PLAIN, LARGE = "GradCache", "plain accumulation", "one large batch"


Rates = dict[str, list[list[float]]]  # arm -> per round, the samples/s of its measured steps


def rounds(rates: list[float] | list[list[float]]) -> list[list[float]]:
    """Rates grouped by round (a flat list: one round)."""
    return [list(r) for r in rates] if rates and isinstance(rates[0], (list, tuple)) else [list(rates)]


def summarize_rates(result: dict[str, list[float]] | Rates) -> tuple[dict[str, Interval], dict[str, list[float]]]:
    """Per arm: the median rate and its bootstrap interval over rounds; and per round its median."""
    grouped = {k: [g for g in rounds(v) if g] for k, v in result.items()}
    med = {k: median_ci(g) for k, g in grouped.items() if g}
    per_round = {k: [statistics.median(r) for r in g] for k, g in grouped.items() if g}
    return med, per_round


def paired_ratio(per_round: dict[str, list[float]], num: str, den: str, invert: bool = False) -> Interval:
    """The ratio of ``num``'s rate to ``den``'s within each round (``invert``: of times, den / num),
    mean and t interval over the rounds both ran."""
    pairs = list(zip(per_round[num], per_round[den]))
    return mean_ci([(d / n) if invert else (n / d) for n, d in pairs])


def run_accum(a: argparse.Namespace, work: str) -> Rates:
    """Alternating runs of the three arms of ``--accum-freq`` (see the module doc); an arm that
    fails (one large batch out of memory) keeps no rates."""
    k, stage = a.accum_freq, a.zero_stages[0]
    with open(a.deepspeed_config) as f:
        cfg = {**json.load(f), "gradient_accumulation_steps": k}
    cfg.pop("train_batch_size", None)
    plain_cfg = os.path.join(work, "plain_accumulation.json")
    with open(plain_cfg, "w") as f:
        json.dump(cfg, f)
    arms = {GC: {"extra": ("--accum-freq", str(k))}, PLAIN: {"ds_config": plain_cfg},
            LARGE: {"batch_size": a.batch_size * k}}
    result: Rates = {name: [] for name in arms}
    for i in range(a.repeats):
        for name, kw in arms.items():
            try:
                result[name].append(run_dtp_ds(a, stage, work, f"{name.replace(' ', '_')}_{i}", **kw))
            except RuntimeError as e:
                if name != LARGE:
                    raise
                print(f"one batch of {a.batch_size * k} per rank did not run: {str(e).splitlines()[-1]}",
                      file=sys.stderr)
    return result


def report_accum(a: argparse.Namespace, result: dict[str, list[float]] | Rates) -> int:
    med, per_round = summarize_rates(result)
    ms = {k: 1e3 / v.mean for k, v in med.items()}  # per sample over all ranks
    # time ratios within each round: GradCache's time per sample over the other arm's
    ratio = {f"{GC} / {other}": paired_ratio(per_round, GC, other, invert=True)
             for other in (PLAIN, LARGE) if other in per_round and GC in per_round}
    summary = {"model": a.model, "precision": a.precision, "zero_stage": a.zero_stages[0], "ranks": a.nproc,
               "micro_batch": a.batch_size, "accum_freq": a.accum_freq,
               "steps_measured": {k: sum(len(g) for g in rounds(v)) for k, v in result.items()},
               "samples_per_s": {k: v.mean for k, v in med.items()},
               "samples_per_s_ci95": {k: v.as_list() for k, v in med.items()},
               "samples_per_s_per_round": per_round, "ms_per_sample": ms,
               "time_ratio": {k: v.mean for k, v in ratio.items()},
               "time_ratio_ci95": {k: v.as_list() for k, v in ratio.items()}}
    if a.json:
        print(json.dumps(summary))
        return 0
    k, m = a.accum_freq, a.batch_size
    print(f"model {a.model}, {a.nproc} ranks, {k} x {m} samples per rank and step, ZeRO-{a.zero_stages[0]}, "
          f"{a.precision}, {a.steps} steps x {a.repeats} rounds each (first {a.skip} left out), "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'arm':<62} {'samples/s (median [95%])':>30} {'ms/sample':>10}")
    rows = {GC: f"{GC} (--batch-size {m} --accum-freq {k}: one batch of {k * m})",
            PLAIN: f"{PLAIN} ({k} x {m}: {k} contrastive batches of {m})",
            LARGE: f"{LARGE} (--batch-size {k * m})"}
    for name, label in rows.items():
        cells = f"{_median_cell(med[name]):>30} {ms[name]:>10.2f}" if name in med else f"{'did not fit':>41}"
        print(f"{label:<62} {cells}")
    for name, r in ratio.items():
        print(f"time per sample, {name}: {fmt(r)}x (within each round; mean +- half-width of the 95% interval, "
              f"rounds)")
    print("expected: about one more forward than plain accumulation (4/3 = 1.33x; 5/4 with activation checkpointing)")
    return 0


def _median_cell(iv: Interval) -> str:
    if iv.n < 2 or iv.lo != iv.lo:
        return f"{iv.mean:.1f} ({iv.n})"
    return f"{iv.mean:.1f} [{iv.lo:.1f}, {iv.hi:.1f}] ({iv.n})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-Tiny-8")
    p.add_argument("--train-data", default="data/synth/train/{00000..00019}.tar")
    p.add_argument("--deepspeed_config", default="ds_configs/tiny.json")
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 2], choices=[0, 1, 2, 3],
                   help="dtp_ds runs at each of these ZeRO stages (default: 0 2)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch per rank")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating rounds, each arm in its own processes (intervals need >= 2; default: %(default)s)")
    p.add_argument("--port", type=int, default=29610)
    p.add_argument("--accum-freq", type=int, metavar="K",
                   help="measure GradCache with K chunks against plain accumulation and one large batch instead")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.accum_freq:
        with tempfile.TemporaryDirectory() as work:
            return report_accum(a, run_accum(a, work))
    ours = {stage: f"dtp_ds (DeepSpeed ZeRO-{stage}, {a.precision})" for stage in a.zero_stages}
    reference = f"open_clip_train (DDP, {OPEN_CLIP_PRECISION[a.precision]})"
    result: Rates = {name: [] for name in [*ours.values(), reference]}
    with tempfile.TemporaryDirectory() as work:
        for i in range(a.repeats):
            for stage, name in ours.items():
                result[name].append(run_dtp_ds(a, stage, work, f"dtp_ds_z{stage}_{i}"))
            result[reference].append(run_open_clip(a, work, f"open_clip_{i}"))
    return report_engine(a, result, reference)


def report_engine(a: argparse.Namespace, result: dict[str, list[float]] | Rates, reference: str,
                  target: float = 0.95) -> int:
    """Each trainer's median samples/s (bootstrap interval over rounds) and its ratio to the
    reference within each round (t interval over rounds), against ``target``."""
    med, per_round = summarize_rates(result)
    ratios = {name: paired_ratio(per_round, name, reference) for name in per_round if name != reference}
    verdict = {name: ("one round: no interval" if r.n < 2 else "meets" if r.lo >= target else
                      "misses" if r.hi < target else "not separated") for name, r in ratios.items()}
    summary = {"model": a.model, "precision": a.precision, "zero_stages": a.zero_stages, "ranks": a.nproc,
               "micro_batch": a.batch_size, "steps_measured": {k: sum(len(g) for g in rounds(v))
                                                               for k, v in result.items()},
               "samples_per_s": {k: v.mean for k, v in med.items()},
               "samples_per_s_ci95": {k: v.as_list() for k, v in med.items()},
               "samples_per_s_per_round": per_round,
               "ratio_to_open_clip_train": {k: v.mean for k, v in ratios.items()},
               "ratio_to_open_clip_train_ci95": {k: v.as_list() for k, v in ratios.items()},
               "target": target, "verdict": verdict}
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"model {a.model}, {a.nproc} ranks x micro-batch {a.batch_size}, {a.steps} steps x {a.repeats} rounds "
          f"each (first {a.skip} left out), device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'trainer':<38} {'samples/s (median [95%])':>30} {'ratio (mean +- half-width, rounds)':>36}  target")
    for name, iv in med.items():
        ratio = fmt(ratios[name], "{:.3f}") if name in ratios else "1"
        print(f"{name:<38} {_median_cell(iv):>30} {ratio:>36}  {verdict.get(name, '')}")
    print(f"target: dtp_ds >= {target} x open_clip_train (like for like: ZeRO-0, plain data parallelism, against "
          f"DDP); called met or missed only where the ratio's 95% interval lies wholly on one side")
    return 0


if __name__ == "__main__":
    sys.exit(main())
