"""tools/compare_reducers end to end on two tiny arms for a few steps: trained by real runs,
measured, written as json/csv/png; the JSON's values recomputed from the metrics the runs wrote;
DynamicViT distils from the plain arm's export; a finished arm is not trained again."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]


def test_compare_two_arms(synth, tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(REPO / "tools" / "compare_reducers"), "--data", str(synth), "--out", str(out),
           "--arms", "plain", "dynamicvit-drop", "--steps", "3", "--batch-size", "8", "--warmup", "1",
           "--flops-images", "4", "--workers", "1", "--eval-max-images", "16"]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "DTP_DS_CODE_REVISION": "test"}  # other edits to the working tree while this runs retrain nothing
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert result["seeds"] == [0] and result["reference"] == "plain"
    arms = result["arms"]
    assert list(arms) == ["plain", "dynamicvit-drop"]
    for arm, row in arms.items():  # the per-seed values, from the run's own metrics file (numpy)
        rows = [json.loads(line) for line in (out / "runs" / f"{arm}-s0" / "metrics.jsonl").open()]
        steps = [r for r in rows if "step_time" in r][1:]
        assert row["step_time"]["0"] == pytest.approx(np.median([r["step_time"] - r.get("data_time", 0.0)
                                                                  for r in steps]))
        assert row["zeroshot_top1"]["0"] == [r for r in rows if "zeroshot_top1" in r][-1]["zeroshot_top1"]
        # one seed: the mean is the value, and there is no interval to print or to separate by
        assert row["zeroshot_top1_mean"] == row["zeroshot_top1"]["0"] and row["zeroshot_top1_ci95"] == [None, None]
    plain, dyn = ({k: v["0"] for k, v in arms[a].items() if isinstance(v, dict)} for a in arms)
    assert arms["dynamicvit-drop"]["zeroshot_top1_separated"] is False
    # the student at 0.54x, its teacher's forward on top: still less than the plain trunk's
    assert dyn["gflops"] < 0.6 * plain["gflops"] and dyn["train_gflops"] < plain["train_gflops"]
    assert plain["train_gflops"] > 2 * plain["gflops"]  # forward + backward
    assert dyn["params_m"] > plain["params_m"]  # the score predictors; the teacher is not a parameter
    assert dyn["compression"] > 1.0 and plain["image_tokens"] == 65.0 > dyn["image_tokens"]
    cfg = json.loads((out / "configs" / "Compare-dynamicvit-drop-s0.json").read_text())
    assert cfg["vision_cfg"]["reducer_cfg"]["teacher"] == str(out / "teacher" / "plain-s0.safetensors")
    assert '"distill' in (out / "runs" / "dynamicvit-drop-s0" / "metrics.jsonl").read_text()
    assert [r["arm"] for r in csv.DictReader((out / "compare.csv").open())] == ["plain", "dynamicvit-drop"]
    assert (out / "compare.png").stat().st_size > 0 and "| dynamicvit-drop" in proc.stdout
    assert "dynamicvit-drop - plain, top-1:" in proc.stdout and "over 1 seed: no interval" in proc.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "dtp_ds.train" not in again.stdout  # resumable: nothing retrained
