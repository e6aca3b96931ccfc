"""Point 1: ``kill -9`` of the whole job, then ``--resume latest``, loses nothing.

One rank in fp32 so that the resumed curve can be compared bit for bit with a straight run.
Epochs of 4 steps (``--train-num-samples 64``) so the runs cross epoch boundaries; checkpoints
every 3 steps and at each epoch end. The job is killed twice: once at an arbitrary step, once
inside a checkpoint save (after every file of it is written, before it is committed).
"""
from __future__ import annotations

import time

import pytest

from dtp_ds.train import checkpoint
from dtp_ds.train.export import resolve_checkpoint_dir
from tests.faults.conftest import Background, base, records, run_ok, steps

pytestmark = pytest.mark.dist  # real runs under the deepspeed launcher

STEPS = 10
COMMON = ["--precision", "fp32", "--zero-stage", "0", "--lr", "2e-3", "--train-num-samples", "64", "--epochs", "3",
          "--max-steps", str(STEPS), "--save-every-n-steps", "3", "--keep-checkpoints", "3"]
HOLD_AT = 9  # the save held (and killed) in the second run


def _curve(run_dir):
    return [(r["step"], r["epoch"], r["lr"], r["loss"], r["samples_seen"]) for r in steps(run_dir)]


def test_kill9_then_resume_latest_loses_nothing(synth, tmp_path, capsys):
    logs = tmp_path / "logs"
    run_dir = logs / "split"
    root = run_dir / "checkpoints"
    args = base(synth, logs, "split", *COMMON)

    # the straight run alongside the first job (one rank each, on separate ports and directories):
    # its launch overlaps the first job's instead of adding to it
    straight_job = Background(base(synth, logs, "straight", *COMMON), tmp_path / "straight.log")
    try:
        # 1. kill -9 at an arbitrary step (whatever step the job is in once step 4 was logged)
        job = Background(args, tmp_path / "a.log")
        job.wait_for(lambda: any(r.get("step", 0) >= 4 for r in steps(run_dir)), what="step 4")
        job.kill()
    finally:
        straight_job.finish_ok()
    straight = _curve(logs / "straight")
    assert [s for s, *_ in straight] == list(range(1, STEPS + 1))
    assert {e for _, e, *_ in straight} == {0, 1, 2}  # the curve crosses two epoch boundaries
    logged = max(r["step"] for r in steps(run_dir))
    latest = checkpoint.latest_tag(str(root))
    committed = [t for _, t in checkpoint.list_checkpoints(str(root))]
    assert latest in committed and int(latest[5:]) <= logged, (latest, committed, logged)

    # 2. resume, and kill -9 inside the save of step 9: its files are written, it is not committed
    job = Background(args + ["--resume", "latest"], tmp_path / "b.log",
                     env={"DTP_DS_FAULT_SAVE_HOLD": f"{HOLD_AT}:commit"})
    job.wait_for(lambda: "fault hook: holding the save of step 9 (commit)" in job.log.read_text(), what="the held save")
    job.kill()
    partial = root / f"step_{HOLD_AT:08d}{checkpoint.PARTIAL}"
    assert (partial / "mp_rank_00_model_states.pt").is_file() and (partial / "rng_rank0000.pt").is_file()
    latest = checkpoint.latest_tag(str(root))
    assert latest == "step_00000008", latest  # the epoch-2 end: the newest committed one, not the one being written
    assert f"step_{HOLD_AT:08d}" not in [t for _, t in checkpoint.list_checkpoints(str(root))]
    assert resolve_checkpoint_dir(str(run_dir)).endswith(latest)  # the export tool takes the same one

    # 3. resume again: from step 8, to the end
    t_kill = time.time()
    run_ok(args + ["--resume", "latest"])
    recovery_s = time.time() - t_kill
    resume = [r for r in records(run_dir) if r.get("event") == "resume"][-1]
    assert resume["step"] == 8 and resume["from"].endswith("step_00000008")
    assert resume["discarded"] == [partial.name]
    assert not partial.exists()
    assert checkpoint.latest_tag(str(root)) == f"step_{STEPS:08d}"

    # the curves continue: every step once, LR, loss, epoch and samples seen as in the straight run
    assert _curve(run_dir) == straight
    final = records(run_dir)[-1]
    assert final["final"] and final["samples_seen"] == STEPS * 16 == records(logs / "straight")[-1]["samples_seen"]
    with capsys.disabled():
        print(f"\n[kill -9] resumed from step {resume['step']}: checkpoint load {resume['load_s']:.2f}s, process start "
              f"to training {resume['startup_s']:.1f}s, relaunch to finished (2 steps) {recovery_s:.1f}s")
