"""``make demo-compress`` at tiny sizes: a pilot run under the deepspeed launcher saving
DeepSpeed checkpoints -> the cost table -> the CA-MSE estimator on those checkpoints -> a run
trained under the schedule it wrote (its rows log the schedule's strategies and measured costs);
then ``tools/bench_compression`` on that schedule."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.dist


@pytest.mark.timeout(900)
def test_demo_compress_then_bench_compression(synth, tmp_path):
    from dtp_ds.train.compression_schedule import load_schedule

    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "dtp_ds.compress.demo", "--data", str(synth), "--logs", str(logs), "--nproc", "1",
           "--batch-size", "8", "--pilot-samples", "48", "--pilot-save-every", "3", "--rates", "0", "0.5",
           "--patches", "stored", "16", "--cost-steps", "1", "--batches", "2", "--epochs", "1",
           "--samples-per-epoch", "48"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = logs / "compress"
    schedule = json.loads((out / "schedule.json").read_text())
    # stages: a fresh model, then the pilot's DeepSpeed checkpoints at steps 3 and 6
    assert [st["step"] for st in schedule["stages"]] == [0, 3, 6]
    assert [st["fraction"] for st in schedule["stages"]] == [0.0, 0.5, 1.0]
    assert all(r["cost_source"] in ("identity", "table") for st in schedule["stages"] for r in st["strategies"])
    assert (out / "schedule.png").stat().st_size > 0 and "CA-MSE" in (out / "schedule.md").read_text()
    segments = load_schedule(str(out / "schedule.json"))
    rows = [json.loads(line) for line in open(logs / "compress-scheduled" / "metrics.jsonl") if '"loss"' in line]
    # 6 steps (rows every 5th and the last); each row has its step's segment's strategy and cost,
    # the last 10% uncompressed
    ends = [round(6 * sum(s.fraction for s in segments[: i + 1])) for i in range(len(segments))]
    expect = [next(s for s, e in zip(segments, ends) if r["step"] - 1 < e) for r in rows]
    assert rows[-1]["step"] == 6
    assert [r["compression_r"] for r in rows] == [s.strategy.rate for s in expect]
    assert [r["compression_cost"] for r in rows] == pytest.approx([s.cost or 1.0 for s in expect])
    assert rows[-1]["compression_r"] == 0.0 and rows[-1]["compression_cost"] == 1.0
    assert "demo-compress: scheduled: 6 steps" in proc.stdout

    # tools/bench_compression on the schedule and cost table just written (no second pilot): the
    # baseline and the schedule, the schedule's arm at the baseline's cost budget
    bench = logs / "bench"
    cmd = [sys.executable, "tools/bench_compression", "--data", str(synth), "--logs", str(bench), "--nproc", "1",
           "--batch-size", "8", "--steps", "6", "--eval-every", "3", "--schedule", str(out / "schedule.json"),
           "--costs", str(out / "costs.json"), "--arms", "schedule"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((bench / "bench.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "schedule"] and rows["baseline"]["ratio"] == 1.0
    # the schedule's mean cost: its segments' measured costs weighted by their fractions; its steps the
    # baseline's over that, rounded up to whole evaluation intervals
    mean = sum(s.fraction * (s.cost or 1.0) for s in segments) + 1.0 - sum(s.fraction for s in segments)
    assert rows["schedule"]["mean_cost"] == pytest.approx(mean, abs=1e-4)
    assert rows["schedule"]["steps"] == 3 * -(-6 // (3 * mean))
    for arm in result["arms"]:  # an evaluation every 3 steps, training time growing
        assert [p["step"] for p in arm["curve"]] == list(range(3, arm["steps"] + 1, 3))
        assert all(a["time_s"] < b["time_s"] for a, b in zip(arm["curve"], arm["curve"][1:]))
    assert (bench / "bench.png").stat().st_size > 0 and "time to target" in (bench / "bench.md").read_text()
