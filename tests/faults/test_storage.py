"""Point 4: storage, on real filesystems (small tmpfs mounts; skipped where mounting is not
permitted). ViT-Tiny-8 in fp32 under ZeRO-0 writes checkpoints of about 118 MB."""
from __future__ import annotations

import time

import pytest

from dtp_ds.train import checkpoint
from dtp_ds.train.export import load_model_from_checkpoint
from tests.conftest import run_many
from tests.faults.conftest import FAST_ENV, Background, base, fill, records, run_ok, steps

pytestmark = pytest.mark.dist  # real runs under the deepspeed launcher

FP32 = ["--precision", "fp32", "--zero-stage", "0", "--lr", "1e-3"]


def test_unwritable_or_nearly_full_output_is_refused_before_anything_is_written(synth, tmpfs, tmp_path):
    """Both refusals in one launch of one rank (tests/dist/train_runs.py: each run is the entry
    point's own body, its refusal reported as the entry point reports it)."""
    small = tmpfs(100)  # less than one checkpoint
    readonly = tmpfs(400, ro=True)
    res = run_many({"full": base(synth, small / "logs", "r", *FP32, "--max-steps", "2"),
                    "readonly": base(synth, readonly / "logs", "r", *FP32, "--max-steps", "2")},
                   tmp_path / "launch", nproc=1, env=FAST_ENV)
    assert res["full"].rc == [2], res["full"].stderr
    stderr = res["full"].stderr[0]
    errors = [line for line in stderr.splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1 and "is nearly full" in errors[0] and "ZeRO stage 0" in errors[0], stderr[-2000:]
    assert "1 checkpoint(s) to write" in errors[0] and "Traceback" not in stderr
    assert list(small.iterdir()) == []  # not even the run directory

    assert res["readonly"].rc == [2], res["readonly"].stderr
    errors = [line for line in res["readonly"].stderr[0].splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1 and "is not writable" in errors[0] and "Read-only file system" in errors[0], errors


def test_a_save_failing_midway_keeps_the_previous_checkpoint_and_stops_clearly(synth, tmpfs, tmp_path):
    disk = tmpfs(320)  # room for the run's two checkpoints (keeping one), as checked at start-up
    logs = disk / "logs"
    run_dir = logs / "full"
    args = base(synth, logs, "full", *FP32, "--max-steps", "4", "--save-every-n-steps", "2", "--keep-checkpoints", "1")
    release = tmp_path / "release"
    job = Background(args, tmp_path / "job.log",
                     env={"DTP_DS_FAULT_SAVE_HOLD": "4:write", "DTP_DS_FAULT_SAVE_RELEASE": str(release)})
    job.wait_for(lambda: "fault hook: holding the save of step 4 (write)" in job.log.read_text(), what="the save")
    filler = fill(disk, 30 << 20)  # another job fills the disk while this run is about to checkpoint
    release.touch()
    job.proc.wait(timeout=120)
    job.out.close()
    out = job.log.read_text()
    assert job.proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("dtp_ds.train: error:")]
    assert len(errors) == 1, out[-3000:]
    assert "saving checkpoint step_00000004" in errors[0] and "failed" in errors[0]
    assert "the newest complete checkpoint is still step_00000002" in errors[0], errors[0]
    assert "Traceback" not in out
    root = run_dir / "checkpoints"
    assert checkpoint.latest_tag(str(root)) == "step_00000002"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002"]  # no half-written step 4
    checkpoint.verify_weights_only(str(root / "step_00000002"))
    model, _ = load_model_from_checkpoint(str(run_dir))  # intact: it loads
    assert model is not None

    # space comes back: the run resumes from step 2 and finishes
    filler.unlink()
    t0 = time.time()
    run_ok(args + ["--resume", "latest"])
    resume = [r for r in records(run_dir) if r.get("event") == "resume"][-1]
    assert resume["step"] == 2 and [r["step"] for r in steps(run_dir)] == [1, 2, 3, 4]
    assert checkpoint.latest_tag(str(root)) == "step_00000004"
    print(f"\n[disk full] resumed from step 2 in {time.time() - t0:.1f}s (checkpoint load {resume['load_s']:.2f}s)")
