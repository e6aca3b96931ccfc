"""The demo run behind ``make demo``: a tiny CLIP trained by N ranks under the ``deepspeed``
launcher (ZeRO-2; bf16 where the device has it natively, else fp32) on the synthetic shards,
zero-shot evaluated on their held-out splits. Its last lines are DRIP's boundaries as evaluation
placed them, the layout split, and the zero-shot top-1 / top-5 against chance."""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import torch

from dtp_ds.train.metrics import read_metrics

DEMO_MODEL = "DRIP-ViT-Tiny-8-4x"


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this interpreter's environment."""
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return here if os.path.exists(here) else (shutil.which("deepspeed") or "deepspeed")


def launch_command(data: str, logs: str, name: str, nproc: int, model: str, extra: list[str]) -> list[str]:
    shards = sorted(glob.glob(os.path.join(data, "train", "*.tar")))
    if not shards:
        raise SystemExit(f"demo: no shards in {data}/train: run tools/make_synthetic_shards --out {data}")
    first, last = (os.path.basename(s)[: -len(".tar")] for s in (shards[0], shards[-1]))
    train_data = os.path.join(data, "train", f"{{{first}..{last}}}.tar")
    return [
        deepspeed_launcher(), "--num_gpus", str(nproc), "--module", "dtp_ds.train",
        "--deepspeed_config", "ds_configs/tiny.json", "--model", model,
        "--train-data", train_data, "--zeroshot-data", os.path.join(data, "zeroshot"),
        *(["--zeroshot-extra", os.path.join(data, "layout")] if os.path.isdir(os.path.join(data, "layout")) else []),
        "--logs", logs, "--name", name, "--workers", "1", *extra,
    ]


def finished_as(run_dir: str, model: str, cmd: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run (its final row) of this launch command's
    training arguments and of this model config (when ``model`` is a JSON file)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # the final row, not an evaluation row: a run stopped after an epoch's evaluation has those too
    if not os.path.isfile(metrics) or not any(r.get("final") for r in read_metrics(metrics)):
        return False
    with open(os.path.join(run_dir, "config.json")) as f:
        recorded = json.load(f)
    same = [a for a in recorded["command"][1:] if not a.startswith("--local_rank")] == \
        cmd[cmd.index("dtp_ds.train") + 1:]
    if same and os.path.isfile(model):
        with open(model) as f:
            same = json.load(f) == recorded.get("model_cfg")
    if not same:
        print(f"{run_dir}: trained with other arguments or another model config: training it again", flush=True)
    return same


def summary_lines(metrics_path: str) -> list[str]:
    """The demo's last lines: DRIP's boundaries as evaluation ran them (when the model has
    them), the layout split, then zero-shot top-1 / top-5 against chance (the last line)."""
    evals = [r for r in read_metrics(metrics_path) if "zeroshot_top1" in r]
    if not evals:
        raise SystemExit(f"demo: no zero-shot result in {metrics_path}")
    r = evals[-1]
    lines = []
    if "zeroshot_compression" in r:
        train = r.get("train_compression")
        gap = f" ({100 * (r['zeroshot_compression'] / train - 1):+.1f}%)" if train else ""
        lines.append(f"demo: boundaries: eval compression {r['zeroshot_compression']:.2f}x vs training "
                     f"{train or float('nan'):.2f}x{gap}; segment purity {r.get('zeroshot_purity', float('nan')):.3f} "
                     f"vs {r.get('zeroshot_purity_even', float('nan')):.3f} for evenly spaced boundaries; "
                     f"boundary probability spread (q95 - q05) {r['zeroshot_prob_spread']:.3f}")
    if "layout_top1" in r:
        ratio = r["layout_top1"] / r["layout_chance_top1"]
        lines.append(f"demo: layout split: top-1 {r['layout_top1']:.1f}% = {ratio:.1f}x "
                     f"chance ({r['layout_chance_top1']:.2f}%), {r['layout_classes']} classes (which shape is left)")
    chance1 = r["zeroshot_chance_top1"]
    chance5 = min(100.0, 5 * chance1)
    lines.append(f"demo: zero-shot top-1 {r['zeroshot_top1']:.1f}% = {r['zeroshot_top1'] / chance1:.1f}x chance "
                 f"({chance1:.2f}%), top-5 {r['zeroshot_top5']:.1f}% = {r['zeroshot_top5'] / chance5:.1f}x chance "
                 f"({chance5:.2f}%), {r['zeroshot_classes']} held-out classes, step {r['step']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/synth", help="made by tools/make_synthetic_shards")
    p.add_argument("--logs", default="logs")
    p.add_argument("--name", default="demo")
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2, help="ranks (GPUs, or CPU processes)")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples-per-epoch", type=int, default=19200,
                   help="samples per epoch (of the 20,000 made): 75 steps of 2 x 128 per epoch")
    p.add_argument("--batch-size", type=int, default=128,
                   help="micro-batch per rank: contrastive negatives come from the whole global batch")
    a, extra = p.parse_known_args(argv)
    run_dir = os.path.join(a.logs, a.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run: start clean each time
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # one intra-op thread per rank per core: oversubscribed cores run slower, not faster
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // a.nproc)))
    cmd = launch_command(a.data, a.logs, a.name, a.nproc, a.model,
                         ["--epochs", str(a.epochs), "--train-num-samples", str(a.samples_per_epoch),
                          "--batch-size", str(a.batch_size), "--lr", "2e-3", "--warmup", "30",
                          "--log-every-n-steps", "10", "--eval-frequency", "1", *extra])
    print("demo:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"demo: training failed (exit {rc}); see the output above and {run_dir}", file=sys.stderr)
        return rc
    print(f"demo: run written to {run_dir}/ (metrics.jsonl, config.json, loss.png, checkpoints/)")
    print("\n".join(summary_lines(os.path.join(run_dir, "metrics.jsonl"))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
