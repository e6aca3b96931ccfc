"""Real multi-node launches of the tiny DRIP CLIP on this machine, two "nodes" (``localhost`` and
``127.0.0.1``) reached over ssh on loopback: the batch script with pdsh, ``--no_ssh --node_rank``
by hand, ``mpiexec`` with MPI discovery, a rank killed mid-run, and the pre-flight check against a
stopped sshd. A few steps each (the machine is small and shared)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtp_ds.cluster.ports import free_port
from tests.conftest import REPO, TINY_DS_CONFIG, metrics, train_data
from tests.e2e.conftest import (
    Job,
    env_of,
    is_rank_process,
    job_env,
    pids_with,
    write_ds_env,
)

pytestmark = pytest.mark.e2e
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
MODEL = "DRIP-ViT-Tiny-8-4x"
LOOPBACK = str(REPO / "hostfiles" / "loopback")


def train_args(logs: Path, name: str, data: str, *extra: str) -> list[str]:
    return ["--deepspeed_config", TINY_DS_CONFIG, "--model", MODEL, "--train-data", data, "--logs", str(logs),
            "--name", name, "--batch-size", "16", "--workers", "1", "--warmup", "2", "--eval-frequency", "0",
            "--log-every-n-steps", "1", "--seed", "0", *extra]


def assert_two_ranks_agree(run: Path, steps: int) -> None:
    recs = metrics(run)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, steps + 1))
    final = recs[-1]
    assert final.get("final") and final["params_finite"], final
    rows = final["param_fingerprint_by_rank"]
    assert len(rows) == 2 and rows[0] == rows[1], f"the two nodes disagree: {rows}"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


def test_batch_script_two_nodes_over_pdsh_with_preflight(synth, tmp_path, loopback):
    """tools/slurm/loopback_tiny.sbatch: make_hostfile from a node list, the env file, the pre-flight
    check (passes on the loopback pair), then ``deepspeed --hostfile`` over pdsh + ssh."""
    logs = tmp_path / "logs"
    env = job_env(LOGS=str(logs), NAME="pdsh", MASTER_PORT=str(free_port()), SLURM_JOB_ID="7001",
                  TRAIN_DATA=f"{synth}/train/{{00000..00011}}.tar")  # the brace range must survive pdsh
    extra = ["--batch-size", "16", "--workers", "1", "--warmup", "2", "--eval-frequency", "0",
             "--log-every-n-steps", "1", "--max-steps", "3"]
    job = Job(["bash", str(REPO / "tools" / "slurm" / "loopback_tiny.sbatch"), *extra], tmp_path / "job.log", env,
              marker=str(tmp_path))
    try:
        rc = job.wait(timeout=300)
    finally:
        job.stop()
    out = job.output()
    assert rc == 0, out[-5000:]
    assert (logs / ".launch" / "7001" / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
    # the pre-flight table: both hosts reached over ssh, same code, imports, CPU only, an all-reduce
    table = out[out.index("pre-flight of"):out.index("result:")]
    for host in ("localhost", "127.0.0.1"):
        row = next(ln for ln in table.splitlines() if ln.startswith(host + " "))
        assert " ok " in row and "0 (CPU only)" in row and "torch" in row, row
    assert re.search(r"all-reduce: gloo, 2 hosts .* bus bandwidth [\d.]+ GB/s: ok", table), table
    assert "result: ok" in out
    # both ranks ran through pdsh (its "host: " prefixes), one per node
    assert re.search(r"^localhost: ", out, re.M) and re.search(r"^127\.0\.0\.1: ", out, re.M)
    assert_two_ranks_agree(logs / "pdsh", 3)


def test_no_ssh_node_rank_by_hand(synth, tmp_path):
    """``deepspeed --hostfile F --no_ssh --node_rank N`` started on each "node" by hand."""
    logs, port = tmp_path / "logs", free_port()
    args = train_args(logs, "byhand", train_data(synth), "--max-steps", "3")
    jobs = [Job([DEEPSPEED, "--hostfile", LOOPBACK, "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1",
                 "--master_port", str(port), "--module", "dtp_ds.train", *args], tmp_path / f"node{n}.log",
                job_env(), marker=str(tmp_path)) for n in (0, 1)]
    try:
        rcs = [j.wait(timeout=240) for j in jobs]
    finally:
        for j in jobs:
            j.stop()
    assert rcs == [0, 0], "\n".join(j.output()[-3000:] for j in jobs)
    assert_two_ranks_agree(logs / "byhand", 3)


def test_mpiexec_with_mpi_discovery(synth, tmp_path):
    """``mpiexec -n 2``: ranks from mpi4py, MASTER_ADDR/PORT as exported (loopback), not DeepSpeed's
    ``hostname -I`` + 29500."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich mpi4py)")
    logs = tmp_path / "logs"
    cmd = [mpiexec, "-n", "2", sys.executable, "-u", "-m", "dtp_ds.train",
           *train_args(logs, "mpi", train_data(synth), "--max-steps", "3")]
    job = Job(cmd, tmp_path / "mpi.log", job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
              marker=str(tmp_path))
    try:
        rc = job.wait(timeout=240)
    finally:
        job.stop()
    out = job.output()
    assert rc == 0, out[-5000:]
    assert out.count("ranks from MPI (mpi4py)") == 2, out[-3000:]
    assert_two_ranks_agree(logs / "mpi", 3)


def test_killed_rank_stops_the_job(synth, tmp_path, loopback, capsys):
    """SIGKILL of rank 1 (on "node" 127.0.0.1) mid-run: the job over pdsh exits non-zero well
    within the timeout, no rank left behind; rank 0's watchdog names rank 1."""
    logs, timeout_min = tmp_path / "logs", 1.0
    data = f"'{synth}/train/{{00000..00011}}.tar'"  # quoted for pdsh's remote shell
    args = train_args(logs, "kill", data, "--max-steps", "400", "--epochs", "10", "--dist-timeout-minutes",
                      str(timeout_min))
    env = job_env(DS_ENV_FILE=str(write_ds_env(tmp_path / "deepspeed_env")))
    cmd = [DEEPSPEED, "--hostfile", LOOPBACK, "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "dtp_ds.train", *args]
    job = Job(cmd, tmp_path / "kill.log", env, marker=str(tmp_path))
    run = logs / "kill"
    try:
        job.wait_for(lambda: (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 2 for r in metrics(run)),
                     timeout=240, what="step 2")
        ranks = {env_of(pid).get("RANK"): pid for pid in pids_with(str(tmp_path)) if is_rank_process(pid)}
        assert set(ranks) >= {"0", "1"}, ranks
        t0 = time.monotonic()
        os.kill(ranks["1"], signal.SIGKILL)
        rc = job.wait(timeout=timeout_min * 60 + 60)
        elapsed = time.monotonic() - t0
        left = [p for p in pids_with(str(tmp_path)) if p == ranks["0"]]
    finally:
        job.stop()
    out = job.output()
    assert rc != 0, out[-4000:]
    assert elapsed < timeout_min * 60 + 30, f"took {elapsed:.0f} s to stop"
    assert not left, "rank 0 outlived the job"
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert 2 <= max(steps) < 400 and not any(r.get("final") for r in metrics(run))
    assert re.search(rf"dtp_ds: error: rank 0: rank 1 \(\S+, pid {ranks['1']}\)", out), out[-4000:]
    with capsys.disabled():
        print(f"\n[rank killed] the 2-node job exited {rc} {elapsed:.1f}s after SIGKILL of rank 1 "
              f"(collective timeout {timeout_min:g} min)")


def _ssh_ok(port: int) -> bool:
    p = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-p", str(port), "--", "127.0.0.1", "true"],
                       capture_output=True, timeout=30)
    return p.returncode == 0


def _start_sshd(port: int) -> subprocess.Popen:
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-o", "ListenAddress=127.0.0.1", "-o", f"Port={port}",
                             "-o", "PidFile=none", "-o", "PasswordAuthentication=no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(40):
        if _ssh_ok(port):
            return sshd
        time.sleep(0.25)
    sshd.kill()
    raise AssertionError(f"private sshd on 127.0.0.1:{port} did not come up")


def test_preflight_fails_clearly_when_sshd_is_stopped(tmp_path, loopback):
    """An sshd of the test's own on a spare port (the shared one on port 22 is left alone): up,
    stopped, the pre-flight check fails naming both hosts and the cause, sshd started again."""
    if os.geteuid() != 0:
        pytest.skip("starting a second sshd needs root")
    port = free_port()
    sshd = _start_sshd(port)
    try:
        sshd.terminate()
        sshd.wait(timeout=30)
        check = [sys.executable, "-m", "dtp_ds.launch.check", "--hostfile", LOOPBACK, "--ssh-port", str(port),
                 "--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null"]
        p = subprocess.run(check, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, p.stdout + p.stderr
        for host in ("localhost", "127.0.0.1"):
            row = next(ln for ln in p.stdout.splitlines() if ln.startswith(host + " "))
            assert " FAIL " in row and f"port {port}: Connection refused" in row, row
        assert "all-reduce: skipped: localhost, 127.0.0.1 failed the checks above" in p.stdout
        assert "result: FAILED (localhost, 127.0.0.1)" in p.stdout
        sshd = _start_sshd(port)  # and back: the same login works again
        assert _ssh_ok(port)
    finally:
        if sshd.poll() is None:
            sshd.terminate()
        sshd.wait(timeout=30)
