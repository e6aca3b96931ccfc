"""tools/bench_engine end to end, briefly: dtp_ds under the deepspeed launcher and open_clip's
own trainer under torchrun on the same shards, one JSON summary with both throughputs (the
report's arithmetic on hand-made rates: tests/unit/test_bench_accum.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, train_data

pytestmark = pytest.mark.dist


def test_bench_engine_runs_both_trainers(synth):
    cmd = [sys.executable, "tools/bench_engine", "--model", "ViT-Tiny-8", "--train-data", train_data(synth),
           "--batch-size", "16", "--steps", "4", "--skip", "1", "--repeats", "1", "--zero-stages", "0", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ref = "dtp_ds (DeepSpeed ZeRO-0, bf16)", "open_clip_train (DDP, amp_bf16)"
    # 4 steps, the first left out: dtp_ds's metrics rows of steps 2-4, open_clip's log lines after step 0's
    assert summary["steps_measured"] == {ours: 3, ref: 3}, summary
    assert all(len(rounds) == 1 and rounds[0] > 0 for rounds in summary["samples_per_s_per_round"].values())
    # one round: a ratio but no interval, so the 0.95 target is called neither way
    assert summary["ratio_to_open_clip_train_ci95"][ours] == [None, None]
    assert summary["verdict"][ours] == "one round: no interval"
