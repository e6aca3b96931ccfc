"""``make demo-seqcomp``'s pipeline at tiny sizes (a pilot under the deepspeed launcher saving
DeepSpeed checkpoints -> the cost table -> the CA-MSE estimator on them), then
``tools/bench_seqcomp`` on the schedule it wrote; what the bench reports is recomputed here
from the metrics files its arms wrote, and the same command again trains nothing."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.dist


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _curve(run_dir):
    """(times, top-1) at each evaluation, from the run's per-step rows (numpy, not the tool's code)."""
    rows = _metrics(run_dir)
    steps = {r["step"]: r["step_time"] for r in rows if "step_time" in r}
    cum = np.cumsum([steps[s] for s in sorted(steps)])
    evals = [r for r in rows if "zeroshot_top1" in r]
    return np.array([cum[r["step"] - 1] for r in evals]), np.array([r["zeroshot_top1"] for r in evals]), cum[-1]


@pytest.mark.timeout(900)
def test_demo_seqcomp_then_bench_seqcomp(synth, tmp_path):
    from dtp_ds.train.seqcomp_schedule import load_schedule

    logs = tmp_path / "logs"
    # a fixed code revision: other edits to the working tree while this runs must not retrain the baseline
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DTP_DS_CODE_REVISION": "test"}
    cmd = [sys.executable, "-m", "dtp_ds.seqcomp.demo", "--data", str(synth), "--logs", str(logs), "--nproc", "1",
           "--batch-size", "8", "--pilot-samples", "48", "--pilot-save-every", "3", "--rates", "0", "0.5",
           "--patches", "stored", "16", "--cost-steps", "1", "--batches", "2", "--schedule-only"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = logs / "seqcomp"
    schedule = json.loads((out / "schedule.json").read_text())
    # stages: a fresh model, then the pilot's DeepSpeed checkpoints at steps 3 and 6
    assert [st["step"] for st in schedule["stages"]] == [0, 3, 6]
    assert [st["fraction"] for st in schedule["stages"]] == [0.0, 0.5, 1.0]
    assert all(r["cost_source"] in ("identity", "table") for st in schedule["stages"] for r in st["strategies"])
    assert (out / "schedule.png").stat().st_size > 0 and "CA-MSE" in (out / "schedule.md").read_text()
    # the pilot trained on the first half of the 12 shards (the estimator reads the other half)
    pilot_cmd = json.loads((logs / "seqcomp-pilot" / "config.json").read_text())["command"]
    assert pilot_cmd[len(pilot_cmd) - 1 - pilot_cmd[::-1].index("--train-data") + 1].endswith("{00000..00005}.tar")
    # what choosing the schedule cost: the pilot's six logged step times, and the two in-process steps
    overhead = json.loads((out / "overhead.json").read_text())
    pilot_time = np.sum([r["step_time"] for r in _metrics(logs / "seqcomp-pilot") if "step_time" in r])
    assert overhead["pilot_s"] == pytest.approx(pilot_time)
    assert overhead["overhead_s"] == pytest.approx(pilot_time + overhead["costs_s"] + overhead["estimator_s"])
    assert overhead["costs_s"] > 0 and overhead["estimator_s"] > 0

    # tools/bench_seqcomp on that schedule: the baseline and the schedule arm
    bench = logs / "bench"
    cmd = [sys.executable, "tools/bench_seqcomp", "--data", str(synth), "--logs", str(bench), "--nproc", "1",
           "--batch-size", "8", "--steps", "6", "--eval-every", "3", "--budget-margin", "1",
           "--schedule", str(out / "schedule.json"), "--costs", str(out / "costs.json"), "--arms", "schedule"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((bench / "bench.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", "schedule"]
    base_t, base_a, base_total = _curve(bench / "bench-baseline-s0")
    sched_t, sched_a, _ = _curve(bench / "bench-schedule-s0")
    target = base_a[-1]
    assert result["target_top1"] == pytest.approx(target)
    # the schedule arm's evaluations within the baseline's measured time; sustained: from the first
    # evaluation after which none falls below the target
    inside = sched_t <= base_total * (1 + 1e-9)
    t, acc = sched_t[inside], sched_a[inside]
    below = np.flatnonzero(acc < target)
    start = below[-1] + 1 if len(below) else 0
    sustained = t[start] if start < len(t) else None
    per = rows["schedule"]["per_seed"]
    assert per["final_top1"]["0"] == pytest.approx(acc[-1])
    assert per.get("time_to_target_s", {}).get("0") == (None if sustained is None else pytest.approx(sustained))
    if sustained is not None:  # the baseline's own time to target: its sustained one (1 seed: it ends at it)
        ok = np.flatnonzero(base_a < target)
        base_time = base_t[ok[-1] + 1 if len(ok) else 0]
        assert per["ratio"]["0"] == pytest.approx((sustained + overhead["overhead_s"]) / base_time)
        assert per["ratio_without_overhead"]["0"] == pytest.approx(sustained / base_time)
    assert rows["schedule"]["overhead_s"] == pytest.approx(overhead["overhead_s"])
    assert rows["baseline"]["overhead_s"] == 0
    # the arm really trained under the schedule: its rows carry the schedule's strategies, the last full-sequence
    logged = [r for r in _metrics(bench / "bench-schedule-s0") if "seqcomp_r" in r]
    rates = {s.strategy.rate for s in load_schedule(str(out / "schedule.json"))}
    assert {r["seqcomp_r"] for r in logged} <= rates and logged[-1]["seqcomp_r"] == 0.0
    table = (bench / "bench.md").read_text()
    assert "time to target s (sustained)" in table and "ratio (with overhead)" in table
    assert (bench / "bench.png").stat().st_size > 0

    # the same command again: both finished arms are reused by their hash, nothing retrains (that
    # a changed schedule file changes the hash: tests/unit/test_bench_stats.py)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for arm in ("baseline", "schedule"):
        assert f"bench-{arm}-s0: finished with these arguments and files: not trained again" in proc.stdout
    assert "--name bench-" not in proc.stdout and len(glob.glob(str(bench / "*-s0"))) == 2
    again = {r["arm"]: r for r in json.loads((bench / "bench.json").read_text())["rows"]}
    assert {a: r["per_seed"] for a, r in again.items()} == {a: r["per_seed"] for a, r in rows.items()}
