"""Checkpoint saves and loads on two real ranks (one launch, tests/faults/ckpt_ranks.py): a save
failing in any phase on one rank ends promptly on both with the same error, naming the rank and
phase, and commits nothing; loading shares the file verification out and gives a rank without
saved RNG state a stream of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtp_ds.launch.discovery import free_port
from tests.conftest import REPO
from tests.faults.ckpt_ranks import FAILURES

pytestmark = pytest.mark.dist  # a real 2-rank job under the deepspeed launcher


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("ckpt_ranks")
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "faults" / "ckpt_ranks.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a hang (a rank waiting in a collective its failed peer never joins) ends here, not in the dist timeout
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return seen[0], seen[1], out


def test_a_save_failing_in_any_phase_on_one_rank_fails_on_both_and_commits_nothing(ranks):
    r0, r1, out = ranks
    for (step, phase, failing), a, b in zip(FAILURES, r0["failures"], r1["failures"]):
        assert a["error"] and a["error"] == b["error"], (phase, a["error"], b["error"])
        assert f"failed in phase '{phase}' (rank {failing}: OSError" in a["error"], a["error"]
        assert "the newest complete checkpoint is still step_00000001" in a["error"]
        assert a["latest"] == "step_00000001", (phase, a["latest"])
        assert not any(name.startswith(f"step_{step:08d}") for name in a["listing"]), (phase, a["listing"])
        assert max(a["seconds"], b["seconds"]) < 30, (phase, a["seconds"], b["seconds"])  # no wait for a timeout
    root = out / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_00000007"
    assert (root / "commits").read_text().split() == ["step_00000001", "step_00000007"]


def test_each_rank_verifies_its_share_of_the_files_once(ranks):
    r0, r1, out = ranks
    ckpt = out / "run" / "checkpoints" / "step_00000007"
    everything = sorted(str(p) for p in ckpt.glob("*.pt"))
    assert len(everything) >= 5  # model states, two optimizer partitions, two RNG files
    assert not set(r0["verified"]) & set(r1["verified"])
    assert sorted(r0["verified"] + r1["verified"]) == everything
    # a file of rank 1's share is refused on both ranks, by name
    assert r0["tampered_error"] == r1["tampered_error"] and r1["tampered_file"] in r0["tampered_error"]
    assert "will not be unpickled" in r0["tampered_error"]


def test_a_rank_without_saved_rng_state_gets_a_stream_of_its_own(ranks):
    r0, r1, _ = ranks
    assert r0["state_step"] == r1["state_step"] == 7
    assert r0["client_schedules"] == r1["client_schedules"] == {"warmup": {"step": 3, "curve": [0.5, 1.0]}}
    assert r0["draw_after_load"] != r0["shared_draw"]  # rank 0's saved state restored
    assert r1["draw_after_load"] != r1["shared_draw"]  # not the stream every rank shares before the load
    assert r1["draw_after_load"] != r0["draw_after_load"]


def test_a_zero2_run_of_two_ranks_resumes_on_one_through_the_universal_checkpoint(synth, tmp_path):
    from dtp_ds.train import checkpoint
    from tests.faults.conftest import base, records, run_ok, steps

    logs, name = tmp_path / "logs", "zero2"
    args = base(synth, logs, name, "--zero-stage", "2", "--precision", "bf16")  # ds_configs/tiny.json's
    run_ok(args + ["--max-steps", "3"], nproc=2)
    root = logs / name / "checkpoints"
    saved = root / "step_00000003"
    before = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    assert len(list(saved.glob("*zero_pp_rank_*_optim_states.pt"))) == 2

    run_ok(args + ["--max-steps", "5", "--resume", "latest"], nproc=1)
    resume = [r for r in records(logs / name) if r.get("event") == "resume"][-1]
    assert resume["step"] == 3 and resume["from"].endswith("step_00000003")
    rows = steps(logs / name)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in rows)  # finite
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == before  # the original, untouched
    assert (root / "step_00000003.universal" / "zero").is_dir()
    assert not [p for p in root.iterdir() if p.name.endswith(checkpoint.PARTIAL)]
    # the optimizer state came through: Adam's step count continues from 3 (a fresh one would say 2)
    (optim,) = (root / "step_00000005").glob("*zero_pp_rank_0_*optim_states.pt")
    import torch

    state = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    assert {int(s["step"]) for s in state["state"].values()} == {5}
