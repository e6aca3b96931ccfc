"""The demo run behind ``make demo``: a tiny CLIP trained by N ranks under the ``deepspeed``
launcher (ZeRO-2; bf16 where the device has it natively, else fp32) on the synthetic shards,
zero-shot evaluated on their held-out splits. Its last lines are DRIP's boundaries as evaluation
placed them, the layout split, the zero-shot top-1 / top-5 against chance, then the per-image
segment count on the zero-shot split (mean, std, std / mean) and the eval compression against
training's, each beside issue 23's target (``dtp_ds.train.runs.summary_lines``)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch

from dtp_ds.train.runs import launch_command, summary_lines

DEMO_MODEL = "DRIP-ViT-Tiny-8-4x"


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
