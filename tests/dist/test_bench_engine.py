"""tools/bench_engine end to end, briefly: dtp_ds under the deepspeed launcher and open_clip's
own trainer under torchrun on the same shards, one JSON summary with both throughputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, train_data

pytestmark = pytest.mark.dist


def test_bench_engine_runs_both_trainers_and_prints_their_ratio(synth):
    cmd = [sys.executable, "tools/bench_engine", "--model", "ViT-Tiny-8", "--train-data", train_data(synth),
           "--batch-size", "16", "--steps", "4", "--skip", "1", "--repeats", "1", "--zero-stages", "0", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ref = "dtp_ds (DeepSpeed ZeRO-0, bf16)", "open_clip_train (DDP, amp_bf16)"
    assert summary["steps_measured"][ours] >= 3 and summary["steps_measured"][ref] >= 3, summary
    rates = summary["samples_per_s"]
    assert rates[ours] > 0 and rates[ref] > 0
    assert summary["ratio_to_open_clip_train"][ours] == pytest.approx(rates[ours] / rates[ref])
