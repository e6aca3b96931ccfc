"""tools/compare_reducers end to end on two tiny arms for a few steps: trained by real runs,
measured, written as json/csv/png; DynamicViT distils from the plain arm's export; a finished arm
is not trained again."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]


def test_compare_two_arms(synth, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(REPO / "tools" / "compare_reducers"), "--data", str(synth), "--out", str(out),
           "--arms", "plain", "dynamicvit-drop", "--steps", "3", "--batch-size", "8", "--warmup", "1",
           "--flops-images", "4", "--workers", "1", "--zeroshot-max-images", "16"]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["arm"] for r in rows] == ["plain", "dynamicvit-drop"]
    plain, dyn = rows
    # the student at 0.54x, its teacher's forward on top: still less than the plain trunk's
    assert dyn["gflops"] < 0.6 * plain["gflops"] and dyn["train_gflops"] < plain["train_gflops"]
    assert plain["train_gflops"] > 2 * plain["gflops"]  # forward + backward
    assert dyn["params_m"] > plain["params_m"]  # the score predictors; the teacher is not a parameter
    assert dyn["compression"] > 1.0 and plain["image_tokens"] == 65.0 > dyn["image_tokens"]
    cfg = json.loads((out / "configs" / "Compare-dynamicvit-drop.json").read_text())
    assert cfg["vision_cfg"]["reducer_cfg"]["teacher"] == str(out / "teacher" / "plain.safetensors")
    logged = (out / "runs" / "dynamicvit-drop" / "metrics.jsonl").read_text()
    assert '"distill' in logged
    assert all(0 <= r["zeroshot_top1"] <= r["zeroshot_top5"] <= 100 and r["step_time"] > 0 for r in rows)
    assert len(list(csv.DictReader((out / "compare.csv").open()))) == 2
    assert (out / "compare.png").stat().st_size > 0 and "| dynamicvit-drop" in proc.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "dtp_ds.train" not in again.stdout  # resumable: nothing retrained
