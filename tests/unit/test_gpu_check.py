"""``tools/gpu_check``: the whole plan at tiny sizes on the CPU (every check in the JSON with a
status and in the markdown with a row, memory predictions from the memory model), and, without
a GPU, the parts that only a GPU run would reach: OOM as a result with its fraction, measured
against predicted, the card's peak, timeouts, the deadline and the report written check by check."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from dtp_ds.bench import gpu_check
from dtp_ds.bench.gpu_check import DEFAULT_DEADLINE_S, Check, Isolated, ProcessResult, Runner, build_plan
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    return proc, report, md


@pytest.mark.run
def test_tiny_plan_runs_every_check_on_the_cpu(tiny_run):
    proc, report, _ = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    planned = [c.name for c in build_plan(tiny=True)]
    assert [c["name"] for c in report["checks"]] == planned and report["finished"]
    assert report["mode"].startswith("tiny") and report["done"] == len(planned)
    for c in report["checks"]:
        assert c["status"] == "ok", (c["name"], c.get("result"), c.get("error"))
        assert c["seconds"] <= c["budget_s"] and c["result"]


@pytest.mark.run
def test_markdown_has_a_row_per_check_and_the_memory_models_prediction(tiny_run):
    _, report, md = tiny_run
    header = next(line for line in md.splitlines() if line.startswith("| check |"))
    cols = [h.strip() for h in header.strip("|").split("|")]
    pred_col = cols.index("predicted peak GiB (memory model)")
    for c in report["checks"]:
        rows = [line for line in md.splitlines() if line.startswith(f"| {c['name']} |")]
        assert len(rows) == 1, c["name"]
        cells = [x.strip() for x in rows[0].strip("|").split("|")]
        assert cells[cols.index("status")] == c["status"]
        if c["kind"] == "bench":
            assert cells[pred_col].startswith("not modelled")
            continue
        # the memory model's peak for the tiny model at the batch that ran (a CPU process: no CUDA context)
        assert float(cells[pred_col].split()[0]) == c["prediction"]["peak_gib"] > 0, rows[0]
        assert c["prediction"]["phase"] in cells[pred_col]


@pytest.mark.run
def test_each_check_reports_its_figures(tiny_run):
    _, report, _ = tiny_run
    by = {c["name"]: c for c in report["checks"]}
    memory = [c for c in report["checks"] if c["kind"] == "memory"]
    assert len(memory) == 9 and {c["stand_in_for"] for c in memory} == {"ViT-B-32", "ViT-L-14", "ViT-H-14"}
    for c in memory:  # the tuner chose the config for the (tiny) card; the batch is capped for the CPU
        assert c["tuner"].startswith("tools/autotune_batch --model") and c["tuner_choice"] and c["tuner_micro"] > 0
        assert 0 < c["micro"] <= gpu_check.TINY_MAX_MICRO and c["prediction"]["allocated_gib"] > 0
        assert c["ds_config"]["train_micro_batch_size_per_gpu"] == c["micro"]
    bench = by["drip-bench-bf16"]
    assert [r["model"] for r in bench["rows"]] == bench["model"].split(", ")
    for r in bench["rows"][1:]:  # the reducers against the plain ViT: FLOPs cut, both ratios there
        assert r["clip_train_gflops_ratio"] < 1 and r["step_vs_flops"] > 0 and len(r["step_s_ci95"]) == 2
    mfu = by["mfu-ViT-L-14"]
    assert mfu["flops_per_step"] > 0 and mfu["achieved_tflops"] > 0 and mfu["mfu"] is None  # no CPU peak figure
    assert math.isfinite(by["zero3-step"]["losses"][0]) and by["zero3-step"]["setup"].startswith(("bf16 zero3",
                                                                                                   "fp32 zero3"))
    fp16 = by["fp16-step"]
    assert fp16["setup"].startswith("fp16") and fp16["steps_run"] - fp16["skipped_steps"] >= 1
    assert all(math.log2(s).is_integer() for s in fp16["loss_scales"]) and fp16["loss_scales"][0] == 2.0**16


def test_the_plan_keeps_its_structure_and_fits_eight_minutes():
    full, tiny = build_plan(tiny=False), build_plan(tiny=True)
    assert [(c.name, c.kind, c.budget_s) for c in full] == [(c.name, c.kind, c.budget_s) for c in tiny]
    assert sum(c.budget_s for c in full) <= DEFAULT_DEADLINE_S < 8 * 60
    memory = [c for c in full if c.kind == "memory"]
    assert {(c.params["model"], c.params["card"]) for c in memory} == {
        (m, card) for m in ("ViT-B-32", "ViT-L-14", "ViT-H-14") for card in ("16GB", "32GB", "40GB")}
    bench = next(c for c in full if c.kind == "bench")
    assert bench.params["models"] == ["ViT-B-32", "DRIP-ViT-B-32-4x", "DRIP-ViT-B-32-10x"]
    assert len(set(next(c for c in tiny if c.kind == "bench").params["models"])) == 3
    assert {c.kind for c in full} == {"memory", "bench", "mfu", "zero3", "fp16"}


def test_peak_tflops_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB") == 125.0
    assert gpu_check.peak_tflops("cpu") is None


def _memory_check(name: str = "memory-ViT-B-32-16GB") -> Check:
    return next(c for c in build_plan(tiny=False) if c.name == name)


def test_an_oom_on_the_gpu_is_a_result_with_its_fraction(monkeypatch, tmp_path):
    """What the parent makes of a CUDA worker's OOM (the tuner and memory model run for real)."""
    seen = {}

    def worker(self, name, spec, timeout):
        seen.update(spec)
        return ProcessResult("done", 3.0, {"status": "oom", "fraction": 0.1912, "oom_in": "step 1", "micro": 368,
                                           "detail": "OutOfMemoryError: CUDA out of memory. Tried to allocate"})

    monkeypatch.setattr(Isolated, "worker", worker)
    row = Runner("cuda", False, Isolated("exec", tmp_path / "log")).run(_memory_check(), 30)
    assert seen["card_gib"] == 15.78 and seen["device"] == "cuda" and seen["micro"] == row["tuner_micro"] > 0
    assert row["status"] == "oom" and row["result"].startswith("OOM at fraction 0.1912 (15.78 GiB card) in step 1")
    # a GPU process's prediction counts the CUDA context (the tuner's own peak for its choice)
    assert row["prediction"]["peak_gib"] == pytest.approx(row["tuner_peak_gib"], abs=0.01)
    assert row["prediction"]["breakdown_gib"]["cuda_context"] == 0.5


def test_measured_against_predicted_on_the_gpu(monkeypatch, tmp_path):
    def worker(self, name, spec, timeout):
        return ProcessResult("done", 3.0, {"status": "ok", "micro": spec["micro"], "fraction": 0.19,
                                           "peak_allocated_gib": 12.0, "peak_reserved_gib": 12.5,
                                           "outside_allocator_gib": 0.6, "losses": [9.0, 8.9],
                                           "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}})

    monkeypatch.setattr(Isolated, "worker", worker)
    runner = Runner("cuda", False, Isolated("exec", tmp_path / "log"))
    row = runner.run(_memory_check(), 30)
    pred, m = row["prediction"], row["measured"]
    assert m["measured_peak_gib"] == 13.1 and m["peak_ratio"] == pytest.approx(13.1 / pred["peak_gib"], abs=1e-3)
    assert m["allocated_ratio"] == pytest.approx(12.0 / pred["allocated_gib"], abs=1e-3)
    assert row["status"] == "ok" and row["result"].startswith("fits: allocated 12.0 GiB")
    assert runner.device_info["name"] == "NVIDIA H100 80GB HBM3"
    report = {"mode": "full (cuda, exec)", "device_type": "cuda", "command": "tools/gpu_check", "started": "now",
              "done": 1, "finished": False, "seconds": None, "versions": {"torch": "x"},
              "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_gib": 79.19, "capability": "9.0",
                         "cuda": "13.0", "peak_tflops_16bit": 989.0},
              "checks": [{"name": "memory-ViT-B-32-16GB", "kind": "memory", "budget_s": 35, "seconds": 3.0, **row}]}
    md = gpu_check.markdown(report)
    assert "989.0 TFLOP/s" in md and f"| {pred['peak_gib']} ({pred['phase']}) | 13.1 | {m['peak_ratio']} |" in md


def test_a_check_past_its_budget_is_killed(monkeypatch, tmp_path):
    iso = Isolated("exec", tmp_path / "log")
    t0 = time.monotonic()
    pr = iso.command("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0)
    assert pr.status == "timeout" and time.monotonic() - t0 < 30
    monkeypatch.setattr(gpu_check, "run_engine", lambda spec: time.sleep(60))  # the fork inherits it
    pr = Isolated("fork", tmp_path / "log").worker("sleeper", {"device": "cpu"}, 1.0)
    assert pr.status == "timeout" and pr.result is None and pr.seconds < 30


def test_the_report_is_written_as_each_check_ends_and_the_deadline_skips(monkeypatch, tmp_path):
    out = tmp_path / "report"
    calls = []

    def run(self, check, timeout):
        report = json.loads((out / "gpu_check.json").read_text())
        statuses = [c["status"] for c in report["checks"]]
        assert statuses[len(calls)] == "pending" and all(s != "pending" for s in statuses[:len(calls)])
        calls.append(check.name)
        if len(calls) == 2:
            raise RuntimeError("the parent's side broke")
        return {"status": "ok", "result": "fake"}

    monkeypatch.setattr(Runner, "run", run)
    only = ["memory-ViT-B-32-16GB", "zero3-step", "fp16-step"]  # in the plan's order
    assert gpu_check.main(["--tiny", "--isolation", "exec", "--out", str(out), "--only", *only]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert calls == only and [c["status"] for c in report["checks"]] == ["ok", "error", "ok"]
    assert "the parent's side broke" in report["checks"][1]["result"] and report["finished"]
    assert gpu_check.main(["--tiny", "--isolation", "exec", "--out", str(out), "--only", *only,
                           "--deadline", "1"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert {c["status"] for c in report["checks"]} == {"skipped"} and len(calls) == 3
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {name} | skipped |" in md for name in only)
