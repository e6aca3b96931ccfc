"""dtp_ds's DeepSpeed engine against open_clip's own trainer (open_clip_train.main): same
model, shards, micro-batch, ranks and precision; prints each one's training throughput
(median samples/s over the measured steps, data loading included) and their ratio.

Runs alternate (dtp_ds, open_clip, dtp_ds, ...) so drifting machine load hits both.
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

from dtp_ds.demo import deepspeed_launcher
from dtp_ds.train.metrics import read_metrics

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
           "--log-every-n-steps", "1", "--lr", "1e-4", "--warmup", "1", "--zeroshot-frequency", "0", "--logs",
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


def run_accum(a: argparse.Namespace, work: str) -> dict[str, list[float]]:
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
    result: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(a.repeats):
        for name, kw in arms.items():
            try:
                result[name] += run_dtp_ds(a, stage, work, f"{name.replace(' ', '_')}_{i}", **kw)
            except RuntimeError as e:
                if name != LARGE:
                    raise
                print(f"one batch of {a.batch_size * k} per rank did not run: {str(e).splitlines()[-1]}",
                      file=sys.stderr)
    return result


def report_accum(a: argparse.Namespace, result: dict[str, list[float]]) -> int:
    med = {k: statistics.median(v) for k, v in result.items() if v}
    ms = {k: 1e3 / v for k, v in med.items()}  # per sample over all ranks
    ratio = {f"{GC} / {other}": ms[GC] / ms[other] for other in (PLAIN, LARGE) if other in ms}
    summary = {"model": a.model, "precision": a.precision, "zero_stage": a.zero_stages[0], "ranks": a.nproc,
               "micro_batch": a.batch_size, "accum_freq": a.accum_freq,
               "steps_measured": {k: len(v) for k, v in result.items()}, "samples_per_s": med,
               "ms_per_sample": ms, "time_ratio": ratio}
    if a.json:
        print(json.dumps(summary))
        return 0
    k, m = a.accum_freq, a.batch_size
    print(f"model {a.model}, {a.nproc} ranks, {k} x {m} samples per rank and step, ZeRO-{a.zero_stages[0]}, "
          f"{a.precision}, {a.steps} steps x {a.repeats} runs each (first {a.skip} left out), "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'arm':<62} {'samples/s':>10} {'ms/sample':>10}")
    rows = {GC: f"{GC} (--batch-size {m} --accum-freq {k}: one batch of {k * m})",
            PLAIN: f"{PLAIN} ({k} x {m}: {k} contrastive batches of {m})",
            LARGE: f"{LARGE} (--batch-size {k * m})"}
    for name, label in rows.items():
        cells = f"{med[name]:>10.1f} {ms[name]:>10.2f}" if name in med else f"{'did not fit':>21}"
        print(f"{label:<62} {cells}")
    for name, r in ratio.items():
        print(f"time per sample, {name}: {r:.2f}x")
    print("expected: about one more forward than plain accumulation (4/3 = 1.33x; 5/4 with activation checkpointing)")
    return 0


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
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
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
    result: dict[str, list[float]] = {name: [] for name in [*ours.values(), reference]}
    with tempfile.TemporaryDirectory() as work:
        for i in range(a.repeats):
            for stage, name in ours.items():
                result[name] += run_dtp_ds(a, stage, work, f"dtp_ds_z{stage}_{i}")
            result[reference] += run_open_clip(a, work, f"open_clip_{i}")
    med = {k: statistics.median(v) for k, v in result.items()}
    ratios = {name: med[name] / med[reference] for name in ours.values()}
    summary = {"model": a.model, "precision": a.precision, "zero_stages": a.zero_stages, "ranks": a.nproc,
               "micro_batch": a.batch_size, "steps_measured": {k: len(v) for k, v in result.items()},
               "samples_per_s": med, "ratio_to_open_clip_train": ratios}
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"model {a.model}, {a.nproc} ranks x micro-batch {a.batch_size}, {a.steps} steps x {a.repeats} runs each "
          f"(first {a.skip} left out), device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'trainer':<38} {'samples/s (median)':>20} {'ratio':>7}")
    for name in result:
        ratio = f"{ratios[name]:.3f}" if name in ratios else "1"
        print(f"{name:<38} {med[name]:>20.1f} {ratio:>7}")
    print("target: dtp_ds >= 0.95 x open_clip_train (like for like: ZeRO-0, plain data parallelism, against DDP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
