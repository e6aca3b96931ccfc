"""tools/lr_find for real: 2 ranks under the deepspeed launcher on the synthetic shards, the LR
ramp run through the engine to its stop, the result on stdout as one JSON object and nothing
written outside its own directory. (Where the suggestions land on a problem with a known good
LR range: tests/unit/test_lr_range.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_DS_CONFIG, train_data

pytestmark = pytest.mark.dist

START, END, STEPS = 1e-5, 10.0, 30


def test_lr_find_ramps_through_the_engine_and_stops_at_divergence(synth, tmp_path):
    out, logs = tmp_path / "lr", tmp_path / "logs"
    # no smoothing and a 10% rise over the lowest loss as divergence: the tiny CLIP's loss jumps
    # well past that once the LR is too high (a CLIP loss then falls back to chance rather than
    # growing fivefold, torch-lr-finder's default)
    cmd = [sys.executable, "tools/lr_find", "--nproc", "2", "--deepspeed_config", TINY_DS_CONFIG,
           "--model", "ViT-Tiny-8", "--train-data", train_data(synth), "--batch-size", "16", "--workers", "1",
           "--precision", "fp32", "--logs", str(logs), "--start-lr", str(START), "--end-lr", str(END),
           "--num-steps", str(STEPS), "--smooth", "1", "--diverge", "1.1", "--skip-start", "3", "--skip-end", "1",
           "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # all of stdout: the job's own output went to stderr
    result = json.loads((out / "lr_find.json").read_text())
    assert sorted(os.listdir(out)) == ["lr_find.json", "lr_find.png"] and not logs.exists()
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    assert summary["stop_reason"].startswith("diverged") and summary["steps"] < STEPS, summary
    assert max(result["loss"]) > 1.1 * min(result["loss"])
    # the optimizer ran at the exponential ramp, step by step
    ratio = END / START
    assert all(abs(lr / (START * ratio ** (i / (STEPS - 1))) - 1) < 1e-6 for i, lr in enumerate(result["lr"]))
    assert START <= summary["steepest"] <= END and START / 10 <= summary["min_loss_over_10"] <= END / 10
    # a second test into the same directory is refused before anything runs
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert json.loads((out / "lr_find.json").read_text()) == result
